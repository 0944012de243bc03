"""Build a ``DependencyGraph`` from a GraphModule: one transfer rule per op kind.

The walk follows the graph in topological order and gives every tensor value at most one
*tracked* axis (its channel axis) with a label per position (see ``depgraph``). A rule either
proves how channels flow through its op (pass-through, coupling, concatenation, reshape...) or
blocks the channels it sees, with a reason: anything not understood stays unpruned.

What an op is comes from the op table (``fxcompress.ops``), so symbolically traced and exported
graphs read the same; the rules live in ``passes.prune.rules``, one module per family of kinds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch.fx import GraphModule, Node

from fxcompress import ops

from .depgraph import DependencyGraph, Track, TupleTrack
from .rules._base import OUTPUT_REASON, _Block, _nodes_in, _target_text
from .rules.matmul import MatmulRules
from .rules.modules import ModuleRules
from .rules.pointwise import PointwiseRules
from .rules.shapes import ShapeRules

__all__ = ["analyse"]

#: op kind -> the rule that follows channels through it; ``None``: the op reads no channels (a size,
#: a guard). Kinds not listed (factories, functional conv/linear/norm, scans, ...) block.
_RULES_BY_KIND: dict[str, str | None] = {
    "elementwise": "_unary", "activation": "_unary", "dropout": "_unary", "cast": "_unary",
    "broadcast": "_elementwise", "pool": "_pool", "reduction": "_reduce", "softmax": "_softmax",
    "reshape": "_reshape", "permute": "_permute", "split": "_split", "cat": "_cat", "index": "_getitem",
    "matmul": "_matmul", "attention": "_sdpa", "shape": None, "assert": None,
}
#: ops whose kind's rule does not fit their arguments: their own rule, or ``""`` to block
_RULES_BY_NAME: dict[str, str] = {
    "pad": "_pad", "constant_pad_nd": "_pad", "expand": "_expand",
    **dict.fromkeys(("prelu", "glu", "view_as", "reshape_as", "_unsafe_view", "t", "movedim", "unbind",
                     "split_with_sizes", "stack", "slice", "select", "gather", "index", "index_select", "narrow",
                     "take_along_dim", "baddbmm", "addmm", "einsum", "var_mean", "multi_head_attention_forward"),
                    ""),
}


class _Analyser(ModuleRules, PointwiseRules, ShapeRules, MatmulRules):
    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.tracks[node] = None
                continue
            if node.op == "output":
                for n in _nodes_in(node.args):
                    self._block_value(n, OUTPUT_REASON.format(n.name))
                continue
            try:
                self.tracks[node] = self._visit(node)
            except _Block as exc:
                self._block_inputs(node, f"{_target_text(node)} at node '{node.name}': {exc}")
                self.tracks[node] = None
        self._check_attr_slices()
        return self.dg

    def _visit(self, node: Node) -> Track | TupleTrack | None:
        if node.op == "call_module":
            return self._module(node, self.modules[str(node.target)])
        inputs = _nodes_in((node.args, node.kwargs))
        if not any(self.tracks.get(n) is not None for n in inputs):
            return None
        rule = self._rule(node)
        if rule is None:
            if node.meta.get("tensor_meta") is None:
                return None  # a size, a dtype, a shape: reading it does not constrain channels
            raise _Block("no channel rule for this op")
        return rule(node)

    def _rule(self, node: Node) -> Callable[[Node], Track | TupleTrack | None] | None:
        name = ops.op_name(node.target)
        method = _RULES_BY_NAME.get(name) if name is not None else None
        if method is None:
            kind = ops.kind_of_target(node.target)
            if kind in _RULES_BY_KIND and _RULES_BY_KIND[kind] is None:
                return lambda _: None
            method = _RULES_BY_KIND.get(kind or "")
        return getattr(self, method) if method else None


def analyse(gm: GraphModule, *, exclude: Iterable[str] = (), norm_stats: str = "block") -> DependencyGraph:
    """The channel-dependency graph of ``gm``; nodes must carry ``meta["tensor_meta"]``.

    ``norm_stats="block"`` keeps the channels a LayerNorm or one-group GroupNorm normalizes over
    (removing one changes the statistics, so pruning there is never exact); ``"prune"`` allows it.
    """
    return _Analyser(gm, tuple(exclude), norm_stats).run()
