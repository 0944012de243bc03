"""Pass order: the hard constraints a pipeline must keep and the soft preferences passes declare.

Checked before any pass runs. Hard constraints are errors: an FX pass after an ONNX pass, a pass
whose ``requires`` neither the context (``CONTEXT_CAPABILITIES``) nor an earlier pass provides, a
one-shot calibration iterator read by several passes. Soft preferences (``Pass.order_preferences``)
are warnings that name the suggested order and the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

from .errors import FxCompressError, PassOrderWarning, PipelineError
from .options import children_field, format_pipeline
from .pass_base import Diagnostic, OrderPreference, Pass, PassContext
from .registry import available

#: capabilities the context provides before any pass runs, and how the user provides them
CONTEXT_CAPABILITIES: dict[str, str] = {
    "example-inputs": "pass example_inputs=... to compile()",
    "calibration-data": "pass calibration=<iterable of batches> to compile()",
    "train-data": "pass train_data=<iterable of (inputs, targets) batches> to compile()",
    "train-labels": "pass train_data=<iterable of (inputs, targets) batches> to compile(): the targets are the labels",
    "teacher": "compile() provides the original model as the teacher",
}

#: whether the context provides each capability before any pass runs
_PROVIDED_BY_CONTEXT: dict[str, Callable[[PassContext], bool]] = {
    "example-inputs": lambda ctx: bool(ctx.example_inputs),
    "calibration-data": lambda ctx: ctx.calibration is not None,
    "train-data": lambda ctx: ctx.train_data is not None,
    "train-labels": lambda ctx: ctx.train_data is not None,
    "teacher": lambda ctx: ctx.original is not None,
}


def check_order(schedule: list[Pass], top: list[Pass], ctx: PassContext, stage: str = "fx") -> list[Diagnostic]:
    """Raise ``PipelineError`` on an order of ``schedule`` (the passes as they execute) that breaks a
    hard constraint; return a warning ``Diagnostic`` for every soft preference it goes against, with
    the suggested order of ``top`` (the pipeline's own items) and the reason.

    Positions are the report rows the passes would get (``#0`` is the ``input`` row, the
    ``export-onnx`` row comes before the first ONNX pass), as in run-time errors."""
    provided = {cap for cap, given in _PROVIDED_BY_CONTEXT.items() if given(ctx)}
    onnx_seen: Pass | None = None
    lowered = stage == "onnx"
    pos = 0
    steps: list[tuple[int, Pass]] = []
    for p in schedule:
        if p.stage == "onnx" and not lowered:
            lowered = True
            pos += 1
        pos += 1
        if p.stage == "fx" and lowered:
            after = f"after ONNX pass '{onnx_seen.name}'" if onnx_seen else "after lowering to ONNX"
            raise PipelineError(f"pass '{p.name}' (#{pos}) works on the FX graph but comes {after}; "
                                f"move it before the ONNX passes")
        if p.stage == "onnx":
            onnx_seen = p
        for need in p.requires:
            if need not in provided:
                how = CONTEXT_CAPABILITIES.get(need)
                givers = _providers_of(need)
                fix = how or (f"add one of {', '.join(givers)} before it" if givers else "nothing provides it")
                raise PipelineError(f"pass '{p.name}' (#{pos}) requires '{need}': {fix}")
        provided.update(p.provides)
        steps.append((pos, p))
    readers = [p.name for p in schedule if "calibration-data" in p.requires]
    if isinstance(ctx.calibration, Iterator) and len(readers) > 1:
        raise PipelineError(f"calibration= is a one-shot iterator (e.g. a generator), but passes "
                            f"{', '.join(readers)} each read it: the first would consume it; pass a list "
                            "(e.g. list(batches)) or a DataLoader, which every pass can iterate again")
    return _order_warnings(steps, top)


def emit_order_warnings(diagnostics: list[Diagnostic], ctx: PassContext) -> None:
    """Show pass-order warnings before any work: as ``PassOrderWarning`` and, when logging is set up
    (the logger has a handler somewhere), in the log too; without handlers logging would print the
    same line to stderr a second time."""
    for d in diagnostics:
        warnings.warn(d.message, PassOrderWarning, stacklevel=3)
        if ctx.logger.hasHandlers():
            ctx.logger.warning("%s", d.message)


def _order_warnings(steps: list[tuple[int, Pass]], top: list[Pass]) -> list[Diagnostic]:
    """One warning per declared preference the order of ``steps`` ((position, pass) as scheduled)
    goes against. ``top`` (the pipeline's own items) is reordered into the suggested pipeline when
    it holds no nested pipeline; otherwise the message says which pass to move where."""
    found: list[tuple[tuple[int, Pass], OrderPreference, list[tuple[int, Pass]]]] = []
    seen: set[tuple[str, OrderPreference, tuple[str, ...]]] = set()
    for i, (pos, p) in enumerate(steps):
        for pref in p.order_preferences:
            if pref.relation == "before":
                offenders = [(q_pos, q) for q_pos, q in steps[:i] if q is not p and pref.matches(q)]
            else:
                offenders = [(q_pos, q) for q_pos, q in steps[i + 1:] if q is not p and pref.matches(q)]
            key = (str(p), pref, tuple(str(q) for _, q in offenders))
            if offenders and key not in seen:
                seen.add(key)
                found.append(((pos, p), pref, offenders))
    if not found:
        return []
    flat = all(children_field(type(p)) is None for p in top)
    suggested = _suggested_order(top, [(p, pref) for (_, p), pref, _ in found]) if flat else None
    out = []
    for (pos, p), pref, offenders in found:
        names = ", ".join(f"'{q}' (#{q_pos})" for q_pos, q in offenders)
        side = "after" if pref.relation == "before" else "before"
        move = (f"move it before '{offenders[0][1]}'" if pref.relation == "before"
                else f"move it after '{offenders[-1][1]}'")
        if suggested is not None:
            move += f"; suggested order: {format_pipeline(suggested)}"
        out.append(Diagnostic("warning", f"pass order: '{p}' (#{pos}) comes {side} {names}, but it should run "
                                         f"{pref.relation} {pref.describe()}: {pref.reason} ({move})"))
    return out


def _suggested_order(passes: list[Pass], prefs: list[tuple[Pass, OrderPreference]]) -> list[Pass]:
    """``passes`` reordered as little as possible (stable topological order) so that every preference
    in ``prefs`` holds, FX passes stay before ONNX passes and no pass moves before what it requires
    from an earlier pass. When the preferences contradict each other, the first ones win."""
    n = len(passes)
    edges: set[tuple[int, int]] = set()
    for a in range(n):
        for b in range(a + 1, n):
            pa, pb = passes[a], passes[b]
            if (pa.stage == "fx" and pb.stage == "onnx") or set(pa.provides) & set(pb.requires):
                edges.add((a, b))
    for p, pref in prefs:
        i = next(k for k, q in enumerate(passes) if q is p)
        for j, q in enumerate(passes):
            if j == i or not pref.matches(q):
                continue
            edge = (i, j) if pref.relation == "before" else (j, i)
            if not _reaches(edges, edge[1], edge[0]):
                edges.add(edge)
    order: list[int] = []
    remaining = set(range(n))
    while remaining:
        ready = [k for k in sorted(remaining) if not any(e[1] == k and e[0] in remaining for e in edges)]
        order.append(ready[0])
        remaining.discard(ready[0])
    return [passes[k] for k in order]


def _reaches(edges: set[tuple[int, int]], start: int, goal: int) -> bool:
    """Whether ``goal`` can be reached from ``start`` along ``edges`` (an edge would close a cycle)."""
    todo, seen = [start], {start}
    while todo:
        k = todo.pop()
        if k == goal:
            return True
        for a, b in edges:
            if a == k and b not in seen:
                seen.add(b)
                todo.append(b)
    return False


def _providers_of(capability: str) -> list[str]:
    try:
        return [name for name, cls in available().items() if capability in cls.provides]
    except FxCompressError:
        return []
