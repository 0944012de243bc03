"""Lining the stages up: one ``LayerRow`` per FX node (or per ONNX layer), each stage's tensors
paired with the stage before it and measured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..metrics import tensor_error, worst
from ..verify import flatten_outputs
from .backends import Backends
from .original import OriginalMap
from .result import LayerRow, Metric, fmt_shape
from .tolerance import Tolerance

__all__ = ["build_rows", "layer_metric"]


def layer_metric(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], tol: Tolerance, against: str,
                 step: float = 0.0) -> Metric:
    """The worst error over ``(reference, actual)`` pairs (``fxcompress.metrics`` rules); the layer
    drifts when any pair does."""
    errors = [tensor_error(r, a) for r, a in pairs]
    w = worst(errors)
    drift = any(tol.drifts(e.max_abs, e.cosine, e.ref_max, step) for e in errors)
    return Metric(w.max_abs, w.cosine, w.ref_max, drift, against)


def _pairs(refs: list[torch.Tensor], acts: list[torch.Tensor]
           ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str | None]:
    """Tensors to compare (same shapes), and a note for those that could not be paired."""
    if not refs or not acts:
        return [], "no tensor value"
    if len(refs) == len(acts) and all(r.shape == a.shape for r, a in zip(refs, acts)):
        return list(zip(refs, acts)), None
    used: set[int] = set()
    pairs = []
    for r in refs:
        found = [i for i, a in enumerate(acts) if i not in used and a.shape == r.shape]
        if found:
            i = found[-1] if len(refs) == 1 else found[0]
            used.add(i)
            pairs.append((r, acts[i]))
    if len(pairs) == len(refs):
        return pairs, None
    ref_shapes = ", ".join(fmt_shape(tuple(r.shape)) for r in refs)
    act_shapes = ", ".join(fmt_shape(tuple(a.shape)) for a in acts)
    if pairs:
        return pairs, (f"compared {len(pairs)} of {len(refs)} tensors ({ref_shapes}); the others have no "
                       f"counterpart of the same shape ({act_shapes})")
    return pairs, f"shapes differ: {ref_shapes} vs {act_shapes} (a layout change?); skipped"


def _fill(row: LayerRow, stage: str, refs: list[torch.Tensor], acts: list[torch.Tensor], tol: Tolerance,
          against: str, step: float = 0.0) -> None:
    pairs, note = _pairs(refs, acts)
    if pairs:
        row.metrics[stage] = layer_metric(pairs, tol, against, step)
    if note:
        row.notes[stage] = note


def build_rows(gm: GraphModule | None, fx_values: dict[str, Any] | None, origin: OriginalMap | None,
          side: Backends, stages: dict[str, str], tol: Tolerance) -> list[LayerRow]:
    rows: list[LayerRow] = []
    have_ort = bool(side.ort) or bool(side.ort_finals)

    def backends(row: LayerRow, fx_tensors: list[torch.Tensor] | None, names: list[str] | None) -> None:
        """The ort and trt cells of ``row``: the tensors ``names``, or the model outputs for None."""
        if names is None:
            ort, trt, label, step = side.ort_finals, side.trt_finals, "model outputs", 0.0
        else:
            ort = [side.ort[t] for t in names]
            trt = [side.trt[t] for t in names if t in side.trt]
            label, step = ", ".join(names), side.step(names)
        if not ort:
            if have_ort and fx_tensors is not None:
                row.notes["ort"] = "no ONNX tensor (exported into its neighbours, or removed by an ONNX pass)"
            return
        if fx_tensors is not None and stages.get("ort") == "ran":
            _fill(row, "ort", fx_tensors, ort, tol, label, step)
        if trt and stages.get("trt") == "ran":
            _fill(row, "trt", ort, trt, tol, label, step)

    if gm is not None and fx_values is not None:
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            fx_tensors = flatten_outputs(fx_values.get(node.name))
            if not fx_tensors:
                continue
            row = LayerRow(len(rows), node.name, node.op, _kind(gm, node), tuple(fx_tensors[0].shape))
            if origin is not None:
                found = origin.counterpart(node)
                if isinstance(found, str):
                    row.notes["fx"] = found
                else:
                    _fill(row, "fx", flatten_outputs(found[0]), fx_tensors, tol, found[1])
            backends(row, fx_tensors, None if node.op == "output" else side.layers.get(node.name, []))
            rows.append(row)
        return rows
    for fx, names in side.layers.items():
        row = LayerRow(len(rows), fx, "onnx", side.kinds.get(fx, "?"), tuple(side.ort[names[0]].shape))
        backends(row, None, names)
        rows.append(row)
    if side.ort_finals:
        row = LayerRow(len(rows), "output", "output", "output", tuple(side.ort_finals[0].shape))
        backends(row, None, None)
        rows.append(row)
    return rows


def _kind(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "output":
        return "output"
    return getattr(node.target, "__name__", str(node.target))
