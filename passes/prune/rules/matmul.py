"""Channel rules of matmul and scaled-dot-product attention, and the consistency of sliced ``get_attr``
tensors they contract with."""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from ..depgraph import Track
from ._base import RuleBase, _arg, _Block, _nodes_in, _shape


class MatmulRules(RuleBase):

    def _matmul(self, node: Node) -> Track | None:
        a, b = node.args[0], node.args[1]
        sa, sb, so = _shape(a), _shape(b), _shape(node)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
            raise _Block("matmul of vectors or unknown shapes")
        nd = len(so)
        roles: dict[str, list[tuple[Node, Track | None, int]]] = {"contract": [], "out": []}
        batch: list[tuple[Node, Track | None, int]] = []
        outputs: list[tuple[int, np.ndarray]] = []
        for n, shape, is_a in ((a, sa, True), (b, sb, False)):
            t = self._track(n)
            if t is None:
                continue
            k = len(shape)
            if t.axis == k - 1:
                (roles["contract"] if is_a else roles["out"]).append((n, t, nd - 1))
            elif t.axis == k - 2:
                (roles["out"] if is_a else roles["contract"]).append((n, t, nd - 2))
            else:
                batch.append((n, t, t.axis + nd - k))
        if roles["contract"]:
            if len(roles["contract"]) == 2:
                self.dg.couple(roles["contract"][0][1].labels, roles["contract"][1][1].labels)
            else:
                n, t, _ = roles["contract"][0]
                other = b if n is a else a
                if other.op == "get_attr" and len(other.users) == 1:
                    dim = len(_shape(other) or ()) - (2 if n is a else 1)
                    self._slice(str(other.target), "", dim, t.labels, "param", node)
                    self.attr_users.setdefault(str(other.target), set()).add(other.name)
                else:
                    raise _Block(f"contracts channels with '{other.name}', whose channels no layer produces")
        for n, t, axis in roles["out"]:
            outputs.append((axis, t.labels))
        if batch:
            axes = {axis for _, _, axis in batch}
            if len(axes) > 1:
                raise _Block("operands carry channels on different batch axes")
            axis = axes.pop()
            if len(batch) == 2:
                self.dg.couple(batch[0][1].labels, batch[1][1].labels)
            else:
                n, t, _ = batch[0]
                other = b if n is a else a
                so_other = _shape(other) or ()
                oa = axis - (nd - len(so_other))
                if oa >= 0 and so_other[oa] != 1:
                    raise _Block(f"batch axis carries channels of one operand only ('{other.name}' has "
                                 f"{so_other[oa]} there)")
            outputs.append((axis, batch[0][1].labels))
        if len(outputs) > 1:
            raise _Block("output would carry channels on two axes")
        return Track(*outputs[0]) if outputs else None

    def _sdpa(self, node: Node) -> Track | None:
        q, k, v = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
        tracks = [(n, self._track(n)) for n in (q, k, v)]
        axes = set()
        for n, t in tracks:
            if t is None:
                continue
            nd = len(_shape(n) or ())
            if t.axis >= nd - 2:
                raise _Block("channels on the sequence or embedding axis of attention (the scale depends on it)")
            axes.add(t.axis - nd)
        if len(axes) != 1 or any(t is None for _, t in tracks):
            raise _Block("query, key and value must all carry the same head axis")
        base = tracks[0][1]
        for _, t in tracks[1:]:
            self.dg.couple(base.labels, t.labels)  # type: ignore[union-attr]
        if any(isinstance(x, Node) for x in _nodes_in(node.kwargs.get("attn_mask"))):
            mask = node.kwargs["attn_mask"]
            if self._track(mask) is not None:
                raise _Block("attention mask carries channels")
        nd = len(_shape(node) or ())
        return Track(nd + axes.pop(), base.labels)  # type: ignore[union-attr]

    # ---------------------------------------------------------------- get_attr consistency

    def _check_attr_slices(self) -> None:
        """A ``get_attr`` tensor is sliced only if every use of it was analysed as a slice."""
        for attr, users in self.attr_users.items():
            nodes = [n for n in self.gm.graph.nodes if n.op == "get_attr" and str(n.target) == attr]
            if {n.name for n in nodes} != users:
                for s in self.dg.slices:
                    if s.owner == attr and s.param == "":
                        self.dg.block(s.labels, f"tensor '{attr}' is also used where its channels are not "
                                                f"tracked")
        by_key: dict[tuple[str, int], np.ndarray] = {}
        for s in self.dg.slices:
            if s.param == "":
                key = (s.owner, s.dim)
                if key in by_key:
                    self.dg.couple(by_key[key], s.labels)
                else:
                    by_key[key] = s.labels
