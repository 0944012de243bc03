"""Graph lint, shape propagation, numeric comparison and first-divergent-node search."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.shape_prop import ShapeProp

from .errors import PassError

RTOL = 1e-4
ATOL = 1e-5


class _NodeError(Exception):
    def __init__(self, node: Node, cause: BaseException) -> None:
        super().__init__(f"{node.name}: {type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


class _TrackingShapeProp(ShapeProp):
    def run_node(self, n: Node) -> Any:
        try:
            return super().run_node(n)
        except _NodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the node attached
            raise _NodeError(n, exc) from exc


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """Run ShapeProp so every node carries ``meta["tensor_meta"]`` (shape, dtype); returns ``gm``.

    A failure raises ``PassError`` naming the node that could not run."""
    try:
        with torch.no_grad():
            _TrackingShapeProp(gm).propagate(*fresh_inputs(example_inputs))
    except _NodeError as err:
        raise PassError(
            f"node '{err.node.name}' ({_describe_target(gm, err.node)}) fails on the example inputs: "
            f"{type(err.cause).__name__}: {err.cause}", node=err.node.name) from err.cause
    return gm


def lint(gm: GraphModule) -> None:
    """``graph.lint()`` with the offending node named in a ``PassError``."""
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001
        node = _node_in_message(gm, str(exc))
        raise PassError(f"graph fails lint: {exc}", node=node) from exc


def _node_in_message(gm: GraphModule, message: str) -> str | None:
    for n in gm.graph.nodes:
        if f"'{n.name}'" in message or f" {n.name} " in message or message.endswith(n.name):
            return n.name
    return None


def _describe_target(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        try:
            return f"{type(gm.get_submodule(str(node.target))).__name__} '{node.target}'"
        except AttributeError:
            return f"missing module '{node.target}'"
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) model output, in a stable order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten_outputs(item)]
    return []


@dataclass(frozen=True)
class ErrorMetrics:
    """How far outputs are from a reference: worst over all output tensors."""

    max_abs: float
    mean_abs: float
    cosine: float
    top1: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def output_mismatch(reference: Any, actual: Any) -> str | None:
    """Why ``actual`` cannot be compared with ``reference`` element-wise (a different number of
    output tensors, or a different shape), or None when the structures match."""
    refs, outs = flatten_outputs(reference), flatten_outputs(actual)
    if len(refs) != len(outs):
        return f"output count differs: reference has {len(refs)}, actual has {len(outs)}"
    for i, (r, a) in enumerate(zip(refs, outs)):
        if r.shape != a.shape:
            which = "output shape" if len(refs) == 1 else f"shape of output {i}"
            return f"{which} differs: reference {tuple(r.shape)}, actual {tuple(a.shape)}"
    return None


def error_metrics(reference: Any, actual: Any) -> ErrorMetrics:
    """Max/mean absolute error, cosine similarity, and top-1 agreement for 2-D logits.

    Raises ``ValueError`` (the ``output_mismatch`` text) when the outputs cannot be compared."""
    mismatch = output_mismatch(reference, actual)
    if mismatch is not None:
        raise ValueError(mismatch)
    refs, outs = flatten_outputs(reference), flatten_outputs(actual)
    max_abs, mean_abs, cosine, top1 = 0.0, 0.0, 1.0, None
    for r, a in zip(refs, outs):
        r = r.detach().to("cpu", torch.float64)
        a = a.detach().to("cpu", torch.float64)
        if r.numel() == 0:
            continue
        diff = (r - a).abs()
        max_abs = max(max_abs, float(diff.max()))
        mean_abs = max(mean_abs, float(diff.mean()))
        rn, an = r.flatten(), a.flatten()
        denom = float(rn.norm() * an.norm())
        cos = float(rn @ an) / denom if denom > 0 else (1.0 if float(diff.max()) == 0 else 0.0)
        cosine = min(cosine, cos)
        if r.ndim == 2 and r.shape[1] > 1:
            agree = float((r.argmax(1) == a.argmax(1)).double().mean())
            top1 = agree if top1 is None else min(top1, agree)
    if math.isnan(max_abs):
        cosine = float("nan")
    return ErrorMetrics(max_abs, mean_abs, cosine, top1)


def allclose(reference: Any, actual: Any, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """Same structure and values within tolerance; NaN matches NaN (an exact pass keeps them)."""
    refs, outs = flatten_outputs(reference), flatten_outputs(actual)
    return len(refs) == len(outs) and all(
        r.shape == a.shape and torch.allclose(a.detach().cpu().to(r.dtype), r.detach().cpu(), rtol=rtol, atol=atol,
                                              equal_nan=True)
        for r, a in zip(refs, outs))


def snapshot(value: Any) -> Any:
    """A copy of every tensor in ``value`` (a later in-place op must not change what was recorded)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value) if not hasattr(value, "_fields") \
            else type(value)(*(snapshot(v) for v in value))
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    return value


def fresh_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Clones of ``inputs`` for one run of a graph or model: an in-place op in the model (``x.mul_(2)``)
    must change neither the caller's tensors nor what the next run sees."""
    return tuple(snapshot(x) for x in inputs)


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = snapshot(out)
        return out


def node_values(gm: GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """Output of every node of ``gm`` on ``inputs``, keyed by node name."""
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*fresh_inputs(inputs))
    return rec.values


def first_divergent_node(before: GraphModule, after: GraphModule, inputs: Sequence[Any],
                         rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """Name of the first node of ``after`` (in graph order) whose output differs from the node of
    the same name in ``before``. Nodes without a same-named, same-shaped counterpart are skipped;
    if no counterpart differs, the output node is named when the outputs differ."""
    old = node_values(before, inputs)
    new = node_values(after, inputs)
    for n in after.graph.nodes:
        if n.op in ("placeholder", "output") or n.name not in old:
            continue
        a, b = flatten_outputs(old[n.name]), flatten_outputs(new[n.name])
        if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            continue
        if not allclose(a, b, rtol, atol):
            return n.name
    out_node = next(n for n in reversed(after.graph.nodes) if n.op == "output")
    before_out = next(n for n in reversed(before.graph.nodes) if n.op == "output")
    if not allclose(old[before_out.name] if before_out.name in old else None,
                    new.get(out_node.name), rtol, atol):
        return out_node.name
    return None


def first_divergent_onnx_node(before: Any, after: Any, inputs: Sequence[Any],
                              rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """Name of the first node of the ONNX model ``after`` (in graph order) with an output tensor
    that ``before`` also produces, of the same shape, but with different values in ONNX Runtime.
    Best effort: None when no such tensor differs or the models cannot be run with it exposed."""
    import numpy as np

    from .onnx_graph import expose_outputs, run_onnx

    produced = {o for n in before.graph.node for o in n.output if o}
    owners = [(n.name or n.op_type, o) for n in after.graph.node for o in n.output if o in produced]
    if not owners:
        return None
    names = list(dict.fromkeys(o for _, o in owners))
    try:
        old = dict(zip(names, run_onnx(expose_outputs(before, names), inputs, output_names=names)))
        new = dict(zip(names, run_onnx(expose_outputs(after, names), inputs, output_names=names)))
    except Exception:  # noqa: BLE001 - naming the node is a hint; the failure is reported anyway
        return None
    for node, tensor in owners:
        a, b = np.asarray(old[tensor]), np.asarray(new[tensor])
        if a.shape != b.shape or a.dtype.kind not in "fiub" or b.dtype.kind not in "fiub":
            continue
        if not np.allclose(b.astype(np.float64), a.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
            return node
    return None
