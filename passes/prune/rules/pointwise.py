"""Channel rules of point-wise ops: unary, broadcasting, pooling and padding, reductions, softmax."""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from fxcompress import ops

from ..depgraph import Track, TupleTrack
from ._base import RuleBase, _arg, _Block, _nodes_in, _norm_dim, _shape


class PointwiseRules(RuleBase):

    def _unary(self, node: Node) -> Track | None:
        first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
        t = self._track(first)
        others = [n for n in _nodes_in((node.args[1:], node.kwargs)) if self._track(n) is not None]
        if t is None or others:
            raise _Block("channels are tracked on an argument this rule does not read")
        return t

    def _elementwise(self, node: Node) -> Track | None:
        tensors = [n for n in _nodes_in((node.args, node.kwargs)) if _shape(n) is not None]
        return self._align(node, tensors, _shape(node))

    def _align(self, node: Node, tensors: list[Node], out_shape: tuple[int, ...] | None,
               skip_axis: int | None = None) -> Track | None:
        """Couple the channel axes of broadcast operands; returns the output's track."""
        if out_shape is None:
            raise _Block("output shape unknown")
        nd = len(out_shape)
        tracked = [(n, t) for n in tensors if (t := self._track(n)) is not None]
        if not tracked:
            return None
        axes = {t.axis + nd - len(_shape(n) or ()) for n, t in tracked}
        if len(axes) != 1:
            raise _Block(f"operands carry channels on different axes {sorted(axes)}")
        k = axes.pop()
        if k == skip_axis:
            raise _Block("concatenates along the channel axis of some operands only")
        rep: np.ndarray | None = None
        for n, t in tracked:
            if len(t.labels) != out_shape[k]:
                self.dg.block(t.labels, f"node '{node.name}' broadcasts {len(t.labels)} channels to "
                                        f"{out_shape[k]}")
                continue
            if rep is None:
                rep = t.labels
            else:
                self.dg.couple(rep, t.labels)
                self.dg.link(t.labels, node.name, "couple")
        if rep is None:
            return None
        for n in tensors:
            if self._track(n) is not None:
                continue
            shape = _shape(n) or ()
            ax = k - (nd - len(shape))
            if ax < 0 or shape[ax] == 1:
                continue
            if n.op == "get_attr" and len(n.users) == 1:
                self._slice(str(n.target), "", ax, rep, "param", node)
                self.attr_users.setdefault(str(n.target), set()).add(n.name)
            else:
                self.dg.block(rep, f"node '{node.name}' combines the channels with tensor '{n.name}', "
                                   f"whose channels no prunable layer produces")
        return Track(k, rep)

    # ---------------------------------------------------------------- spatial / reductions

    def _spatial(self, node: Node, t: Track) -> Track:
        if t.axis != 1:
            raise _Block(f"pools spatial axes; channels must be on dim 1, not {t.axis}")
        return t

    def _pool(self, node: Node) -> Track:
        t = self._track(node.args[0] if node.args else node.kwargs.get("input"))
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        return self._spatial(node, t)

    def _padded(self, node: Node, t: Track, n_padded: int) -> Track:
        nd = len(_shape(node) or ())
        if t.axis >= nd - n_padded:
            raise _Block("pads the channel axis")
        return t

    def _pad(self, node: Node) -> Track:
        t = self._track(node.args[0])
        pad = _arg(node, 1, "pad", ())
        if t is None or not isinstance(pad, (tuple, list)):
            raise _Block("channels are tracked on an argument this rule does not read")
        return self._padded(node, t, len(pad) // 2)

    def _reduce(self, node: Node) -> Track | TupleTrack | None:
        x = node.args[0] if node.args else node.kwargs.get("input")
        other = _arg(node, 1, "other", None)
        if isinstance(other, Node) and _shape(other) is not None:  # torch.max(a, b): element-wise
            return self._elementwise(node)
        t = self._track(x)
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        nd = len(_shape(x) or ())
        dim = _arg(node, 1, "dim", None)
        if isinstance(dim, Node) or (dim is not None and not isinstance(dim, (int, tuple, list))):
            raise _Block("reduction dims are not literal")
        dims = set(range(nd)) if dim is None else {_norm_dim(d, nd) for d in
                                                   (dim if isinstance(dim, (tuple, list)) else (dim,))}
        if t.axis in dims:
            raise _Block("reduces over the channel axis")
        keepdim = bool(_arg(node, 2, "keepdim", False))
        axis = t.axis if keepdim else t.axis - sum(1 for d in dims if d < t.axis)
        out = Track(axis, t.labels)
        name = ops.op_name(node.target)
        if name in ("max", "min") and dim is not None:
            return TupleTrack([out, out])
        return out

    def _softmax(self, node: Node) -> Track:
        x = node.args[0] if node.args else node.kwargs.get("input")
        t = self._track(x)
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        nd = len(_shape(x) or ())
        normalize = ops.op_name(node.target) == "normalize"
        dim = _arg(node, 2 if normalize else 1, "dim", 1 if normalize else None)
        if not isinstance(dim, int) or _norm_dim(dim, nd) == t.axis:
            raise _Block("normalizes over the channel axis")
        return t
