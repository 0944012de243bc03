"""What every channel rule shares: the analyser's state, track helpers, shape helpers, and the
exception a rule raises to block the channels it cannot follow."""

from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..depgraph import INPUT_KIND, DependencyGraph, ModuleEdit, ParamSlice, Track, TupleTrack

OUTPUT_REASON = "reaches the model output '{}' (its shape must not change)"
#: choices of ``norm_stats``: what to do with a normalization whose statistics span the channels
NORM_STATS = ("block", "prune")
NORM_STATS_REASON = ("{what} computes its statistics over the channel axis: removing any channel (even an "
                     "all-zero one) changes them and so every output; set norm_stats='prune' to prune it anyway")


class _Block(Exception):
    """The current node's channels cannot be handled; the message is the reason."""


# ------------------------------------------------------------------------------------ helpers

def _shape(node: Any) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    shape = getattr(tm, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _nodes_in(value: Any) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg(value, lambda n: out.append(n) or n)
    return out


def _prefix(shape: tuple[int, ...]) -> list[int]:
    out = [1]
    for s in shape:
        out.append(out[-1] * s)
    return out


def _target_text(node: Node) -> str:
    if node.op == "call_method":
        return f"method '{node.target}'"
    if node.op == "call_module":
        return f"module '{node.target}'"
    name = getattr(node.target, "__name__", str(node.target))
    return f"function '{name}'"


def map_reshape_axis(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int
                     ) -> tuple[str, int, int, int] | None:
    """Where axis ``axis`` of ``in_shape`` goes in a reshape to ``out_shape``.

    ``("move", a, a, a+1)``: it is output axis ``a``; ``("split", a, lo, hi)``: it becomes output
    axes ``lo:hi`` (``a`` unused); ``("merge", a, s, e)``: input axes ``s:e`` (containing it) merge
    into output axis ``a``. None when the reshape mixes it with other axes in any other way.
    """
    pin, pout = _prefix(in_shape), _prefix(out_shape)
    lo, hi = pin[axis], pin[axis + 1]
    if lo == hi or 0 in in_shape:
        return None
    starts = [a for a in range(len(out_shape) + 1) if pout[a] == lo]
    ends = [b for b in range(len(out_shape) + 1) if pout[b] == hi]
    for a in reversed(starts):
        later = [b for b in ends if b > a]
        if later:
            b = min(later)
            big = [i for i in range(a, b) if out_shape[i] > 1]
            if len(big) == 1:
                return ("move", big[0], big[0], big[0] + 1)
            if len(big) > 1:
                return ("split", -1, a, b)
    for a in range(len(out_shape)):
        s_cands = [s for s in range(axis + 1) if pin[s] == pout[a]]
        e_cands = [e for e in range(axis + 1, len(in_shape) + 1) if pin[e] == pout[a + 1]]
        if s_cands and e_cands:
            return ("merge", a, max(s_cands), min(e_cands))
    return None


# ------------------------------------------------------------------------------------ analyser

class RuleBase:
    """State and helpers of the channel analysis; the rule mixins (one module per op kind) build on it."""

    def __init__(self, gm: GraphModule, exclude: tuple[str, ...], norm_stats: str = "block") -> None:
        if norm_stats not in NORM_STATS:
            raise ValueError(f"norm_stats={norm_stats!r}; choose one of {', '.join(NORM_STATS)}")
        self.gm = gm
        self.exclude = exclude
        self.norm_stats = norm_stats
        self.dg = DependencyGraph()
        self.tracks: dict[Node, Track | TupleTrack | None] = {}
        self.modules = dict(gm.named_modules())
        self.calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        self.attr_users: dict[str, set[str]] = {}
        self.out_edit: dict[str, ModuleEdit] = {}
    # ---------------------------------------------------------------- track helpers

    def _track(self, value: Any) -> Track | None:
        t = self.tracks.get(value) if isinstance(value, Node) else None
        return t if isinstance(t, Track) else None

    def _block_value(self, node: Node, reason: str) -> None:
        t = self.tracks.get(node)
        if isinstance(t, Track):
            self.dg.block(t.labels, reason)
        elif isinstance(t, TupleTrack):
            for item in t.items:
                if item is not None:
                    self.dg.block(item.labels, reason)

    def _block_inputs(self, node: Node, reason: str) -> None:
        for n in _nodes_in((node.args, node.kwargs)):
            self._block_value(n, reason)

    def _excluded(self, name: str) -> str | None:
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return pattern
        return None

    def _new_space(self, name: str, kind: str, node: Node, size: int) -> np.ndarray:
        labels = self.dg.new_space(name, kind, node.name, size)
        pattern = self._excluded(name)
        if pattern is not None:
            self.dg.block(labels, f"excluded by pattern '{pattern}'")
        return labels

    def _input_space(self, node: Node, size: int, why: str) -> np.ndarray:
        labels = self.dg.new_space(f"<{node.name}>", INPUT_KIND, node.name, size)
        self.dg.block(labels, why)
        return labels

    def _slice(self, owner: str, param: str, dim: int, labels: np.ndarray, role: str, node: Node) -> None:
        self.dg.slices.append(ParamSlice(owner, param, dim, labels, role, node.name))
        self.dg.link(labels, owner, role)

    def _single_call(self, node: Node, mod: nn.Module) -> None:
        if self.calls[str(node.target)] > 1:
            raise _Block(f"the module is called {self.calls[str(node.target)]} times (shared weights)")
    def _edit(self, edit: ModuleEdit) -> None:
        self.dg.edits[edit.path] = edit
        if edit.out_labels is not None and edit.kind in ("conv", "conv_transpose", "linear", "embedding"):
            self.out_edit[edit.node] = edit
