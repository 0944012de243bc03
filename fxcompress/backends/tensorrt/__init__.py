"""TensorRT and TensorRT-RTX: build a serialized engine from ONNX, and run it on torch CUDA tensors.

Two targets share this code, as both modules have the same Builder / OnnxParser / IBuilderConfig API:

* ``target="tensorrt"`` imports ``tensorrt`` (pip ``tensorrt``). Building and running need a GPU.
* ``target="tensorrt-rtx"`` imports ``tensorrt_rtx`` (pip ``tensorrt-rtx-cu12``). It builds engines
  ahead of time on a CPU (portable across RTX GPUs); running one needs a GPU.

Precision (``BuildOptions.precision``) maps onto the builder like this; we quantize explicitly
(Q/DQ in the graph), never with calibrators:

============  ==========================================  ===========================================
precision     module with FP16/INT8 flags (TensorRT 10)   strongly typed only (TensorRT-RTX, TRT 11)
============  ==========================================  ===========================================
``fp32``      strongly typed network, no flags            same
``fp16``      weakly typed, ``FP16`` (+``INT8`` if Q/DQ)  graph must already hold float16 tensors (run
                                                          ``convert-fp16`` first), else BackendUnavailable
``int8``      graph must hold INT8 Q/DQ (PipelineError    same
              otherwise); strongly typed, no flags
``best``      weakly typed, ``FP16`` (+``INT8`` if Q/DQ)  strongly typed; the graph's types decide
============  ==========================================  ===========================================

TensorRT documents weak typing as deprecated since 10.12 and removes the precision flags in 11;
the ``fp16``/``best`` rows therefore fall to the right-hand column on a module without them.
TensorRT-RTX documents its timing cache as a no-op (since RTX 1.2): the file is still read and
written so artifacts look the same for both targets, and the build notes say so.
"""

from ...onnx_facts import GraphTraits, constant_tensors, graph_inputs, graph_traits, input_dims, qdq_type
from .build import EngineBuild, ParserIssue, TensorRTParseError, build_engine, network_flags, parser_report
from .options import (
                      PRECISIONS,
                      BuildOptions,
                      PrecisionPlan,
                      builder_flags,
                      derive_profiles,
                      precision_plan,
                      translate_config,
)
from .runner import TrtRunner, load_engine_bytes
from .runtime import (
                      FALLBACK_HINT,
                      TARGETS,
                      TensorRTUnavailable,
                      capture_log,
                      gpu_available,
                      import_trt,
                      module_available,
                      trt_logger,
)

__all__ = ["FALLBACK_HINT", "PRECISIONS", "TARGETS", "BuildOptions", "EngineBuild", "GraphTraits", "ParserIssue",
           "PrecisionPlan", "TensorRTParseError", "TensorRTUnavailable", "TrtRunner", "build_engine", "builder_flags",
           "capture_log", "constant_tensors", "derive_profiles", "gpu_available", "graph_inputs", "graph_traits",
           "import_trt", "input_dims", "load_engine_bytes", "module_available", "network_flags", "parser_report",
           "precision_plan", "qdq_type", "translate_config", "trt_logger"]
