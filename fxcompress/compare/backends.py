"""The ONNX Runtime and TensorRT stages: which ONNX tensor stands for which FX node, and the values
each backend produces for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..backends import tensorrt as trt_backend
from ..backends.onnxruntime import OrtRunner
from ..onnx_facts import constant_tensors
from ..onnx_graph import expose_outputs, fx_node_outputs
from ..verify import flatten_outputs

__all__ = ["TRT_TARGETS", "Backends", "layer_engine", "run_ort", "run_trt", "trt_status"]

TRT_TARGETS = ("tensorrt", "tensorrt-rtx")


@dataclass
class Backends:
    """What the ONNX side produced: FX node -> ONNX result tensors, the op type making each layer's
    result, the quantization step of DequantizeLinear outputs, and the values per backend."""

    layers: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    ort: dict[str, torch.Tensor] = field(default_factory=dict)
    ort_finals: list[torch.Tensor] = field(default_factory=list)
    trt: dict[str, torch.Tensor] = field(default_factory=dict)
    trt_finals: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "Backends":
        layers = fx_node_outputs(model)
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        constants = constant_tensors(model)
        steps = {}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] in constants:
                scale = numpy_helper.to_array(constants[n.input[1]])
                steps[n.output[0]] = float(np.abs(scale).max()) if scale.size else 0.0
        return cls(layers, {fx: producer.get(names[-1], "?") for fx, names in layers.items()}, steps)

    def step(self, names: Sequence[str]) -> float:
        return max((self.steps.get(n, 0.0) for n in names), default=0.0)


def run_ort(model: onnx.ModelProto, names: list[str], inputs: tuple[torch.Tensor, ...],
             optimization: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Intermediate tensors ``names`` (from a copy exposing them) and the unmodified model's outputs."""
    deployed = OrtRunner(model, optimization=optimization)
    finals = [torch.from_numpy(np.asarray(o)) for o in deployed.run_numpy(*inputs)]
    exposed = OrtRunner(expose_outputs(model, names), optimization=optimization)
    outs = exposed.session.run(names, exposed.feed(*inputs)) if names else []
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, outs)}, finals


def trt_status(engine: bytes | None, target: str | None) -> str | None:
    """None when TensorRT can run here, else why not."""
    if target is None:
        return ("not run: no TensorRT engine or target given (pass target='tensorrt-rtx' or 'tensorrt')"
                if engine is None else "not run: an engine was given without its target ('tensorrt' or "
                "'tensorrt-rtx')")
    if target not in TRT_TARGETS:
        return f"not run: target {target!r} is not a TensorRT target ({', '.join(TRT_TARGETS)})"

    if not trt_backend.gpu_available():
        return (f"not run: running a {target} engine needs an NVIDIA GPU; torch.cuda.is_available() is False "
                f"here (torch {torch.__version__})")
    if not trt_backend.module_available(target):
        module, package = trt_backend.TARGETS[target]
        return f"not run: module '{module}' is not installed (pip install {package})"
    return None


def layer_engine(model: onnx.ModelProto, names: Sequence[str], inputs: tuple[torch.Tensor, ...], target: str,
                 precision: str = "fp32") -> Any:
    """A TensorRT ``EngineBuild`` of ``model`` with the tensors ``names`` marked as outputs (what the
    TRT column runs; building needs no GPU for ``tensorrt-rtx``)."""
    exposed = expose_outputs(model, list(names))
    options = trt_backend.BuildOptions.from_compile(precision=precision, example_inputs=inputs, onnx_model=exposed)
    return trt_backend.build_engine(exposed, target, options)


def run_trt(model: onnx.ModelProto, names: list[str], inputs: tuple[torch.Tensor, ...], engine: bytes | None,
             target: str, precision: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """Per-layer values from an engine built with ``names`` marked as outputs, and the given
    engine's outputs."""
    finals = None
    if engine is not None:
        out = trt_backend.TrtRunner(engine, target)(*inputs)
        finals = [t.cpu() for t in flatten_outputs(out)]
    values: dict[str, torch.Tensor] = {}
    if names:
        runner = trt_backend.TrtRunner(layer_engine(model, names, inputs, target, precision).engine, target)
        outs = runner(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        values = {n: t.cpu() for n, t in zip(runner.output_names, outs)}
    return values, finals
