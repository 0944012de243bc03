"""``compare``: run every stage given and build the per-layer comparison; ``rebuild_graph`` for an
artifact's FX graph."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.fx import GraphModule

from ..api import compile as fx_compile
from ..errors import FxCompressError, InputError
from ..verify import as_inputs, flatten_outputs, node_values
from .backends import Backends, run_ort, run_trt, trt_status
from .original import OriginalMap
from .result import STAGES, Comparison
from .rows import build_rows
from .tolerance import Tolerance


def compare(
    original: nn.Module | None,
    graph_module: GraphModule | None,
    onnx_model: onnx.ModelProto | None,
    inputs: Any,
    *,
    engine: bytes | None = None,
    target: str | None = None,
    tolerance: Tolerance | None = None,
    precision: str = "fp32",
    ort_optimization: str = "all",
) -> Comparison:
    """Run every stage given on ``inputs`` and compare them layer by layer (see the module doc).

    ``original``: the source ``nn.Module`` (never modified: hooks go on a private copy).
    ``graph_module``: the rewritten FX graph; the rows follow its node order. Without it, rows follow
    the FX nodes recorded in the ONNX model. ``onnx_model``: the lowered graph, run in ONNX Runtime
    (``ort_optimization`` as in ``OrtRunner``; every exposed tensor keeps the nodes around it from
    fusing, the ``output`` row uses the unmodified graph). ``engine`` / ``target``: a TensorRT
    engine and/or target (``"tensorrt"``, ``"tensorrt-rtx"``); on a GPU, a per-layer engine is built
    with ``precision``. A stage without what it needs is reported as not run, never an error.
    """
    args = as_inputs(inputs, "inputs")
    tol = tolerance or Tolerance()
    if graph_module is None and onnx_model is None:
        raise InputError("compare needs a graph_module or an onnx_model (or both) to compare")
    notes: list[str] = []
    fx_values = node_values(graph_module, args) if graph_module is not None else None
    fx_status, origin = _fx_stage(original, graph_module, args, notes)
    ort_status, side = _ort_stage(graph_module, onnx_model, fx_values, args, ort_optimization, notes)
    trt = _trt_stage(onnx_model, side, args, engine, target, precision)
    stages = {"fx": fx_status, "ort": ort_status, "trt": trt}
    rows = build_rows(graph_module, fx_values, origin, side, stages, tol)
    return Comparison(rows=rows, stages={s: stages[s] for s in STAGES}, tolerance=tol, notes=notes)


def _fx_stage(original: nn.Module | None, graph_module: GraphModule | None, args: tuple[torch.Tensor, ...],
              notes: list[str]) -> tuple[str, OriginalMap | None]:
    """The FX stage's status, and the original's values mapped onto the FX graph when it runs."""
    if graph_module is None:
        return "omitted: no FX graph given" + (" (the original has nothing to be compared with)"
                                               if original is not None else ""), None
    if original is None:
        return "omitted: no original model given", None
    origin = OriginalMap(original, graph_module, args)
    if origin.trace_note:
        notes.append(origin.trace_note)
    return "ran", origin


def _ort_stage(graph_module: GraphModule | None, onnx_model: onnx.ModelProto | None,
               fx_values: dict[str, Any] | None, args: tuple[torch.Tensor, ...], optimization: str,
               notes: list[str]) -> tuple[str, Backends]:
    """The ONNX Runtime stage's status, and the per-layer ONNX tensors with their ORT values."""
    if onnx_model is None:
        return "omitted: no ONNX model given", Backends()
    side = Backends.of(onnx_model)
    if not side.layers:
        notes.append("the ONNX model records no FX node provenance (not exported by fxcompress?): "
                     "only its outputs are compared")
    if graph_module is not None and fx_values is not None:
        unknown = sorted(set(side.layers) - set(fx_values))
        if unknown:
            listed = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            notes.append(f"{len(unknown)} ONNX layer(s) name FX nodes absent from the FX graph "
                         f"({listed}): the ONNX model was not exported from this graph")
        notes += _weight_mismatches(graph_module, onnx_model)
        side.layers = {fx: ts for fx, ts in side.layers.items()
                       if fx in fx_values and flatten_outputs(fx_values[fx])}
    names = [t for ts in side.layers.values() for t in ts]
    side.ort, side.ort_finals = run_ort(onnx_model, names, args, optimization)
    return ("ran" if fx_values is not None else "omitted: no FX graph to compare with"), side


def _trt_stage(onnx_model: onnx.ModelProto | None, side: Backends, args: tuple[torch.Tensor, ...],
               engine: bytes | None, target: str | None, precision: str) -> str:
    """The TensorRT stage's status; when it runs, its values land in ``side``."""
    why_not = trt_status(engine, target)
    if why_not is None and onnx_model is None:
        why_not = "omitted: no ONNX model (the ONNX Runtime reference TensorRT is compared with)"
    if why_not is not None:
        return why_not
    try:
        names = [t for ts in side.layers.values() for t in ts if side.ort[t].is_floating_point()]
        side.trt, side.trt_finals = run_trt(onnx_model, names, args, engine, str(target), precision)
    except (FxCompressError, RuntimeError) as exc:  # e.g. no engine for this GPU, CUDA errors
        return f"not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "ran"


def _weight_mismatches(gm: GraphModule, model: onnx.ModelProto, limit: int = 5) -> list[str]:
    """ONNX initializers whose values differ from the FX graph's parameter/buffer of the same name."""
    state = gm.state_dict()
    differ = []
    for init in model.graph.initializer:
        ref = state.get(init.name)
        if ref is None:
            continue
        value = numpy_helper.to_array(init)
        if tuple(value.shape) != tuple(ref.shape):
            continue
        expected = ref.detach().cpu().double().numpy()
        if not np.allclose(value.astype(np.float64), expected, rtol=1e-6, atol=1e-7):
            differ.append(init.name)
    if not differ:
        return []
    shown = ", ".join(differ[:limit]) + (", ..." if len(differ) > limit else "")
    return [f"{len(differ)} ONNX initializer(s) differ from the FX graph's parameter of the same name: "
            f"{shown}"]


def rebuild_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor], pipeline: str
                  ) -> tuple[Optional[GraphModule], Optional[str]]:
    """The FX graph an artifact was compiled to, rebuilt by running its pipeline on ``model`` again
    (``target="fx"``); ``(None, reason)`` when that fails (e.g. a pass needs calibration data)."""
    try:
        compiled = fx_compile(model, tuple(example_inputs), pipeline, target="fx", progress=False)
    except FxCompressError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"the FX graph could not be rebuilt with pipeline {pipeline!r}: {first}"
    return compiled.graph_module, None
