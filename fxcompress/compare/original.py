"""The original (eager) model's value for each node of the rewritten FX graph: forward hooks on a
private copy, mapped through a trace of the original (see ``fxcompress.compare``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from ..trace import trace
from ..verify import fresh_inputs, node_values, snapshot

__all__ = ["OriginalMap"]


def _eager_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[str, list[Any]], Any]:
    """Outputs of every submodule call of a private eval copy of ``model``: path -> one entry per call."""
    model = copy.deepcopy(model).eval()
    calls: dict[str, list[Any]] = {}
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(_m: nn.Module, _args: Any, out: Any, path: str = path) -> None:
            calls.setdefault(path, []).append(snapshot(out))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            final = snapshot(model(*fresh_inputs(inputs)))
    finally:
        for h in handles:
            h.remove()
    return calls, final


class OriginalMap:
    """Finds the original model's value for a node of the (possibly rewritten) FX graph."""

    def __init__(self, original: nn.Module, gm: GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
        self.calls, self.final = _eager_outputs(original, inputs)
        self.gm_nodes = {n.name: n for n in gm.graph.nodes}
        self.gm_occurrence = _occurrences(gm)
        self.g0: GraphModule | None = None
        self.g0_values: dict[str, Any] = {}
        self.trace_note: str | None = None
        try:
            self.g0 = trace(original, inputs)
            self.g0_values = node_values(self.g0, inputs)
        except Exception as exc:  # noqa: BLE001 - without the trace, modules still map by path
            self.trace_note = (f"the original model does not trace ({type(exc).__name__}: {str(exc)[:120]}); "
                               "call_module nodes map by module path only and call_function nodes have no "
                               "counterpart")
        self.g0_nodes = {n.name: n for n in self.g0.graph.nodes} if self.g0 is not None else {}
        self.g0_occurrence = _occurrences(self.g0) if self.g0 is not None else {}

    def _resolve(self, n0: Node) -> Node:
        """The last node of the original trace's chain ``n0 -> a -> b ...`` absorbed by the rewrite.

        A node is absorbed (a folded BatchNorm, a removed dropout) when it is gone from the rewritten
        graph, was the only user of the node before it, and the nodes that read it in the original
        now read the rewritten ``n0`` instead. A node gone for another reason (replaced by a node of
        another name) ends nothing: ``n0`` is then compared as it is.
        """
        best = cur = n0
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.name in self.gm_nodes or user.op not in ("call_module", "call_function", "call_method"):
                break
            if not user.args or user.args[0] is not cur:
                break
            cur = user
            readers = [self.gm_nodes.get(u.name) for u in cur.users]
            mine = self.gm_nodes.get(n0.name)
            if readers and all(r is not None and mine in r.all_input_nodes for r in readers):
                best = cur
        return best

    def _value_of(self, n0: Node) -> tuple[Any, str] | None:
        if n0.op == "call_module":
            k = self.g0_occurrence.get(n0.name, 0)
            outs = self.calls.get(str(n0.target), [])
            if k < len(outs):
                return outs[k], _call_label(str(n0.target), k, len(outs))
            return None
        if n0.name in self.g0_values:
            return self.g0_values[n0.name], f"original trace %{n0.name}"
        return None

    def counterpart(self, node: Node) -> tuple[Any, str] | str:
        """``(value, label)`` of the original's counterpart, or a note saying why there is none."""
        if node.op == "output":
            return self.final, "original output"
        n0 = self.g0_nodes.get(node.name)
        if node.op == "call_module":
            path = str(node.target)
            if n0 is not None and n0.op == "call_module" and str(n0.target) == path:
                end = self._resolve(n0)
                found = self._value_of(end)
                if found is not None:
                    value, label = found
                    if end is not n0:
                        label += f" ({_absorbed(n0, end)} absorbed)"
                    return value, label
            outs = self.calls.get(path)
            if not outs:
                return f"module {path!r} is not called by the original model"
            k = self.gm_occurrence.get(node.name, 0)
            if k >= len(outs):
                return (f"module {path!r} is called {len(outs)} time(s) by the original model, "
                        f"this is call #{k + 1}")
            return outs[k], _call_label(path, k, len(outs))
        if node.op not in ("call_function", "call_method"):
            return f"{node.op} node"
        if n0 is None or n0.op != node.op or n0.target != node.target:
            return "no node of this name and target in the original trace" if self.g0 is not None \
                else "no eager counterpart for a call_function node (the original does not trace)"
        if not self._same_inputs(node, n0):
            return "its inputs are not those of the original trace's node of the same name (rewritten)"
        end = self._resolve(n0)
        found = self._value_of(end)
        if found is None:
            return "no recorded value in the original trace"
        value, label = found
        return value, label + (f" ({_absorbed(n0, end)} absorbed)" if end is not n0 else "")

    def _same_inputs(self, node: Node, n0: Node) -> bool:
        def mine(a: Node) -> str:
            twin = self.g0_nodes.get(a.name)
            return self._resolve(twin).name if twin is not None else f"<new {a.name}>"

        try:
            return map_arg((node.args, node.kwargs), mine) == map_arg((n0.args, n0.kwargs), lambda b: b.name)
        except Exception:  # noqa: BLE001 - arguments that do not compare (tensors) mean "not the same"
            return False


def _occurrences(gm: GraphModule) -> dict[str, int]:
    """call_module node name -> how many earlier call_module nodes target the same module."""
    seen: dict[str, int] = {}
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.name] = seen.get(str(n.target), 0)
            seen[str(n.target)] = out[n.name] + 1
    return out


def _call_label(path: str, k: int, total: int) -> str:
    return f"module {path}" + (f" call #{k + 1}" if total > 1 else "")


def _absorbed(n0: Node, end: Node) -> str:
    names = []
    cur = n0
    while cur is not end:
        (cur,) = cur.users
        names.append(cur.name)
    return ", ".join(names)
