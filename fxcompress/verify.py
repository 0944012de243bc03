"""Graph lint, shape propagation, numeric comparison and first-divergent-node search.

Exactness rule (``check_exact``, used by the pipeline for passes declared ``exact``). A fixed
tolerance cannot tell a wrong rewrite from float32 rounding once a network is deep, so an exact
pass is judged against the model's own precision. Per output tensor, with ``ref`` a float64
evaluation of the graph before the pass, ``old`` the float32 graph before and ``new`` the graph
after (max absolute errors over finite elements):

    accept  iff  max|new - ref| <= EXACT_FACTOR * max|old - ref| + floor,
    floor = FLOOR_RTOL * max|old| + FLOOR_ATOL

``EXACT_FACTOR`` (K = 16) leaves room for a rewrite that rounds differently but no worse: the
ratio of two float32 errors of the same computation is heavy-tailed on small outputs (measured up
to 12.5 on 50-block plain conv-BN-ReLU stacks, 2.9 over a thousand node values), while a wrong
rewrite is off by orders of magnitude more. ``FLOOR_RTOL = 1e-6`` and ``FLOOR_ATOL = 1e-7`` make
the floor, for outputs too small or too exactly computed for float32 noise to show. Fast path,
rigorous by the triangle inequality: if ``max|new - old| <= floor`` the pass is accepted without
any float64 run. NaN and infinite positions of ``new`` and ``old`` must be equal. The float64 graph is a copy of
the graph before with parameters, buffers and plain tensor attributes converted and floating
inputs cast (integer inputs untouched); its outputs are cached per graph object (a graph accepted
by the pipeline is never changed in place). Where float64 is unavailable (an op raises, the
graph casts back to a lower precision, the reference is not finite where ``old`` is, ONNX graphs)
the rule falls back to ``rtol = RTOL`` and ``atol = ATOL * max(1, max|old|)``.

``first_divergent_node`` compares each node of the new graph with the node of the old graph whose
value it stands for (a pass's ``PassResult.replaces``, else the node a shared consumer took at
the same argument position, else the same-named node) and names the first whose own error
exceeds what float32 explains by the same rule.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.fx import GraphModule, Interpreter, Node
from torch.fx.passes.shape_prop import ShapeProp

from .backends.onnxruntime import run_onnx
from .copying import shared_copy
from .errors import InputError, PassError
from .metrics import AGREE, tensor_error, worst
from .onnx_graph import expose_outputs

RTOL = 1e-4
ATOL = 1e-5
#: K: an exact pass may be at most this many times as far from float64 as float32 was before it
EXACT_FACTOR = 16.0
#: floor of the exactness rule, relative to the largest float32 output magnitude
FLOOR_RTOL = 1e-6
#: absolute floor of the exactness rule (outputs near zero)
FLOOR_ATOL = 1e-7


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
    run_with_shapes(gm, example_inputs)
    return gm


def run_with_shapes(gm: GraphModule, example_inputs: Sequence[Any]) -> Any:
    """``propagate_shapes`` returning the graph's outputs on ``example_inputs``: one run of a large
    graph gives both (the pass manager needs both after every pass)."""
    try:
        with torch.no_grad():
            return _TrackingShapeProp(gm).propagate(*fresh_inputs(example_inputs))
    except _NodeError as err:
        raise PassError(
            f"node '{err.node.name}' ({_describe_target(gm, err.node)}) fails on the example inputs: "
            f"{type(err.cause).__name__}: {err.cause}", node=err.node.name) from err.cause


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
    """Max/mean absolute error, cosine similarity, and top-1 agreement for 2-D logits: the worst
    over all output tensors, by the rules of ``fxcompress.metrics`` (a NaN gives NaN, an infinity
    gives an infinite error and a NaN cosine; the cosine never exceeds 1).

    Raises ``InputError`` (the ``output_mismatch`` text) when the outputs cannot be compared."""
    mismatch = output_mismatch(reference, actual)
    if mismatch is not None:
        raise InputError(mismatch)
    refs, outs = flatten_outputs(reference), flatten_outputs(actual)
    total = worst([AGREE, *(tensor_error(r, a) for r, a in zip(refs, outs))])
    top1 = None
    for r, a in zip(refs, outs):
        if r.ndim == 2 and r.shape[1] > 1 and r.numel():
            r, a = (t.detach().to("cpu", torch.float64) for t in (r, a))
            agree = float((r.argmax(1) == a.argmax(1)).double().mean())
            top1 = agree if top1 is None else min(top1, agree)
    return ErrorMetrics(total.max_abs, total.mean_abs, total.cosine, top1)


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


def as_inputs(value: Any, argument: str = "example_inputs") -> tuple[torch.Tensor, ...]:
    """A model's positional inputs from what a user passes: one tensor or array, or a non-empty tuple or
    list of them (numpy arrays become tensors); an ``InputError`` naming ``argument`` otherwise."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = (value,)
    if isinstance(value, (list, tuple)) and value:
        return tuple(torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in value)
    raise InputError(f"{argument} must be a tensor or a non-empty tuple of tensors, e.g. "
                     f"{argument}=(torch.randn(1, 3, 32, 32),); got {type(value).__name__}")


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


@dataclass(frozen=True)
class ExactVerdict:
    """Whether outputs after a pass are as exact as float32 allows (the module docstring's rule).

    ``reason`` is one line for messages; ``max_abs`` is the largest change ``max|new - old|``;
    ``float64`` tells whether a float64 reference decided (False: fast path or fallback)."""

    ok: bool
    reason: str
    max_abs: float = 0.0
    float64: bool = False


def _cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _finite_max(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def _nonfinite_equal(old: torch.Tensor, new: torch.Tensor) -> bool:
    bad_old, bad_new = ~torch.isfinite(old), ~torch.isfinite(new)
    if not torch.equal(bad_old, bad_new):
        return False
    o, n = old[bad_old], new[bad_new]
    return torch.equal(torch.isnan(o), torch.isnan(n)) and torch.equal(o[~torch.isnan(o)], n[~torch.isnan(n)])


def exactness_floor(old: torch.Tensor) -> float:
    """The rule's floor for one float32 tensor: ``FLOOR_RTOL * max|old| + FLOOR_ATOL``."""
    return FLOOR_RTOL * _finite_max(_cpu64(old)) + FLOOR_ATOL


def _usable_reference(old: torch.Tensor, ref: Any) -> bool:
    return (isinstance(ref, torch.Tensor) and ref.dtype == torch.float64 and ref.shape == old.shape
            and old.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and bool(torch.isfinite(ref.detach().cpu())[torch.isfinite(old.detach().cpu())].all()))


def _judge_tensor(old: torch.Tensor, new: torch.Tensor, ref: Callable[[], Any]) -> tuple[bool, str, float, bool]:
    """(ok, why-not, max|new - old|, decided by float64) for one tensor; ``ref()`` gives its float64
    reference (or None) and is only called when the fast path cannot decide."""
    if not (old.is_floating_point() or old.is_complex()):
        equal = torch.equal(old.detach().cpu(), new.detach().cpu().to(old.dtype))
        return equal, "" if equal else f"{old.dtype} values differ", 0.0 if equal else math.inf, False
    if old.is_complex():
        ok = allclose(old, new)
        return ok, "" if ok else f"beyond rtol {RTOL:g}, atol {ATOL:g}", 0.0, False
    o, n = _cpu64(old), _cpu64(new)
    if not _nonfinite_equal(o, n):
        return False, "NaN/inf positions or values differ", math.inf, False
    finite = torch.isfinite(o)
    change = float((n - o)[finite].abs().max()) if bool(finite.any()) else 0.0
    floor = FLOOR_RTOL * _finite_max(o) + FLOOR_ATOL
    if change <= floor:
        return True, "", change, False
    r = ref()
    if _usable_reference(old, r):
        r = _cpu64(r)
        e_new = float((n - r)[finite].abs().max())
        e_old = float((o - r)[finite].abs().max())
        allowed = EXACT_FACTOR * e_old + floor
        if e_new <= allowed:
            return True, "", change, True
        why = f"error vs float64 {e_new:.3g} > {EXACT_FACTOR:g} x float32's own {e_old:.3g} + floor {floor:.3g}"
        return False, why, change, True
    atol = ATOL * max(1.0, _finite_max(o))
    ok = bool(torch.allclose(n, o, rtol=RTOL, atol=atol, equal_nan=True))
    return ok, "" if ok else f"beyond rtol {RTOL:g}, atol {atol:.3g} (no float64 reference)", change, False


def _judge(old: Any, new: Any, ref: Callable[[], Any]) -> ExactVerdict:
    """The rule over every output tensor of ``old``/``new``; ``ref()`` yields the float64 outputs
    (same structure) or None."""
    mismatch = output_mismatch(old, new)
    if mismatch is not None:
        return ExactVerdict(False, mismatch, math.inf)
    olds, news = flatten_outputs(old), flatten_outputs(new)
    refs: list[Any] | None = None

    def ref_of(i: int) -> Callable[[], Any]:
        def get() -> Any:
            nonlocal refs
            if refs is None:
                r = ref()
                refs = flatten_outputs(r) if r is not None else []
                if len(refs) != len(olds):
                    refs = [None] * len(olds)
            return refs[i]
        return get

    worst, used64 = 0.0, False
    for i, (o, n) in enumerate(zip(olds, news)):
        ok, why, change, by64 = _judge_tensor(o, n, ref_of(i))
        worst, used64 = max(worst, change), used64 or by64
        if not ok:
            where = "" if len(olds) == 1 else f"output {i}: "
            return ExactVerdict(False, f"{where}max abs change {change:.3g}, {why}", change, by64)
    return ExactVerdict(True, f"max abs change {worst:.3g}, within float32's own error", worst, used64)


def _as_float64(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        items = [_as_float64(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _as_float64(v) for k, v in value.items()}
    return value


def to_float64(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` computing in float64: floating parameters, buffers and plain tensor
    attributes converted; ``gm`` itself is untouched (its parameters are not copied in float32 first)."""
    g = shared_copy(gm)
    g.double()
    for module in g.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(module, name, value.double())
    return g


def float64_values(gm: GraphModule, inputs: Sequence[Any], every_node: bool = False) -> Any:
    """Outputs (or ``{node name: value}`` with ``every_node``) of the float64 copy of ``gm`` on
    ``inputs`` with floating inputs cast to float64; None when the graph cannot run in float64."""
    try:
        g = to_float64(gm)
        args = tuple(_as_float64(x) for x in fresh_inputs(inputs))
        if every_node:
            rec = _Recorder(g)
            with torch.no_grad():
                rec.run(*args)
            return rec.values
        with torch.no_grad():
            return g(*args)
    except Exception:  # noqa: BLE001 - any op without a float64 kernel: the rule falls back
        return None


_REFERENCES: weakref.WeakKeyDictionary[GraphModule, tuple[Sequence[Any], Any]] = weakref.WeakKeyDictionary()


def _cached_float64_outputs(gm: GraphModule, inputs: Sequence[Any]) -> Any:
    cached = _REFERENCES.get(gm)
    if cached is not None and cached[0] is inputs:
        return cached[1]
    out = float64_values(gm, inputs)
    _REFERENCES[gm] = (inputs, out)
    return out


def check_exact(before: GraphModule | None, inputs: Sequence[Any], old: Any, new: Any) -> ExactVerdict:
    """Judge outputs ``new`` of a pass declared exact against ``old``, the outputs of graph
    ``before`` (float32) on ``inputs``, by the module docstring's rule. ``before`` None (an ONNX
    graph) uses the fallback tolerance. The float64 outputs of ``before`` are computed only when
    the fast path cannot decide, and at most once per graph object and inputs."""
    return _judge(old, new, lambda: None if before is None else _cached_float64_outputs(before, inputs))


def _arg_nodes(value: Any) -> list[Any]:
    """Leaves of a node's (args, kwargs) in a fixed order, Nodes and constants alike."""
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _arg_nodes(v)]
    if isinstance(value, dict):
        return [leaf for k in sorted(value, key=str) for leaf in _arg_nodes(value[k])]
    if isinstance(value, slice):
        return _arg_nodes((value.start, value.stop, value.step))
    return [value]


def counterparts(before: GraphModule, after: GraphModule,
                 replaces: Mapping[str, str] | None = None) -> dict[str, str]:
    """For each node of ``after``, the name of the node of ``before`` whose value it stands for:
    ``replaces`` (a pass's own mapping) first; else, when a consumer present in both graphs takes
    it at the argument position where it took node m before, m; else the same-named node."""
    old_nodes = {n.name: n for n in before.graph.nodes}
    by_consumer: dict[str, str] = {}
    for user in after.graph.nodes:
        old_user = old_nodes.get(user.name)
        if old_user is None:
            continue
        new_args = _arg_nodes((user.args, user.kwargs))
        old_args = _arg_nodes((old_user.args, old_user.kwargs))
        if len(new_args) != len(old_args):
            continue
        for a, b in zip(new_args, old_args):
            if isinstance(a, Node) and isinstance(b, Node):
                by_consumer.setdefault(a.name, b.name)
    mapping: dict[str, str] = {}
    for n in after.graph.nodes:
        if replaces and n.name in replaces and replaces[n.name] in old_nodes:
            mapping[n.name] = replaces[n.name]
        elif n.name in by_consumer:
            mapping[n.name] = by_consumer[n.name]
        elif n.name in old_nodes:
            mapping[n.name] = n.name
    return mapping


def first_divergent_node(before: GraphModule, after: GraphModule, inputs: Sequence[Any],
                         replaces: Mapping[str, str] | None = None) -> str | None:
    """Name of the first node of ``after`` (in graph order) whose output differs from the value
    of its counterpart in ``before`` (see ``counterparts``) by more than float32 explains (the
    exactness rule, against the counterpart's float64 value). Nodes without a counterpart of the
    same structure and shapes are skipped; if none diverges, the output node is named when the
    outputs differ."""
    old = node_values(before, inputs)
    new = node_values(after, inputs)
    ref: dict[str, Any] | None = None

    def ref_of(name: str) -> Callable[[], Any]:
        def get() -> Any:
            nonlocal ref
            if ref is None:
                ref = float64_values(before, inputs, every_node=True) or {}
            return ref.get(name)
        return get

    mapping = counterparts(before, after, replaces)
    for n in after.graph.nodes:
        m = mapping.get(n.name)
        if n.op == "placeholder" or m is None or m not in old:
            continue
        a, b = flatten_outputs(old[m]), flatten_outputs(new[n.name])
        if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
            continue
        if not _judge(old[m], new[n.name], ref_of(m)).ok:
            return n.name
    out_node = next(n for n in reversed(after.graph.nodes) if n.op == "output")
    before_out = next(n for n in reversed(before.graph.nodes) if n.op == "output")
    if output_mismatch(old.get(before_out.name), new.get(out_node.name)) is not None:
        return out_node.name
    return None


def first_divergent_onnx_node(before: Any, after: Any, inputs: Sequence[Any],
                              rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """Name of the first node of the ONNX model ``after`` (in graph order) with an output tensor
    that ``before`` also produces, of the same shape, but with different values in ONNX Runtime
    (beyond ``rtol`` and ``atol`` scaled by the tensor's magnitude, as the fallback rule).
    Best effort: None when no such tensor differs or the models cannot be run with it exposed."""
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
        a, b = a.astype(np.float64), b.astype(np.float64)
        finite = a[np.isfinite(a)]
        scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
        if not np.allclose(b, a, rtol=rtol, atol=atol * scale, equal_nan=True):
            return node
    return None
