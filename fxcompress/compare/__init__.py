"""Per-layer fidelity across stages: original torch -> rewritten FX -> ONNX Runtime -> TensorRT.

``compare(original, graph_module, onnx_model, inputs)`` runs every stage it is given on the same
inputs and lines the intermediate results up per FX node, in graph order:

* **original** (eager ``nn.Module``, a private eval-mode copy): per-module outputs captured with
  forward hooks, keyed by module path and call order. An FX ``call_module`` node is paired with
  the eager output of its module path. When the original traces, the mapping goes through that
  trace: a node absorbed by a rewrite (a BatchNorm folded into its Conv, a dropout removed) moves
  the counterpart to the end of the absorbed chain, so a folded Conv is compared with the eager
  BatchNorm output. A ``call_function``/``call_method`` node has a counterpart only in the original
  trace, when a node of the same name applies the same target to corresponding inputs (in the
  unchanged original trace: every node).
* **fx** (the rewritten ``GraphModule``): every node's output (cloned as produced, so in-place
  modules such as ``ReLU(inplace=True)`` cannot overwrite a recorded value).
* **ort**: the ONNX model with every intermediate tensor exposed as a graph output; each tensor
  maps back to its FX node through the exporter's provenance (``fxcompress.onnx_graph``). The
  ``output`` row comes from the unmodified model (the deployed session, with its fusions).
* **trt**: on an NVIDIA GPU, a TensorRT engine of the exposed model (per layer) and the given
  engine (``output`` row). Elsewhere the stage is ``"not run: <reason>"``.

Each stage is compared with the one before it: fx vs original, ort vs fx, trt vs ort. Tensors of
different shapes (a layout change) are skipped with a note. ``Comparison.first_divergent(stage)``
is the first row where that stage leaves the tolerance (``Tolerance``).

Modules, one job each: ``tolerance`` (the drift rule), ``result`` (what ``compare`` returns),
``original`` (eager model -> FX node mapping), ``backends`` (the ONNX Runtime and TensorRT
stages), ``rows`` (pairing and measuring per layer, by ``fxcompress.metrics``), ``run``
(``compare`` itself). Input files are read by ``fxcompress.input_files``.
"""

from __future__ import annotations

from ..input_files import load_inputs, not_numpy
from .backends import TRT_TARGETS, layer_engine
from .result import STAGES, Comparison, LayerRow, Metric
from .run import compare, rebuild_graph
from .tolerance import Tolerance

__all__ = ["STAGES", "TRT_TARGETS", "Comparison", "LayerRow", "Metric", "Tolerance", "compare",
           "layer_engine", "load_inputs", "not_numpy", "rebuild_graph"]
