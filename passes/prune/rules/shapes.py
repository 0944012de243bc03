"""Channel rules of shape ops: permute, reshape (including channel splits and shuffles), expand,
indexing, split and cat."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.fx import Node

from fxcompress import ops

from ..depgraph import ShapeFix, Track, TupleTrack
from ._base import RuleBase, _arg, _Block, _norm_dim, _shape, map_reshape_axis


class ShapeRules(RuleBase):

    def _permute(self, node: Node) -> Track:
        x = node.args[0] if node.args else node.kwargs.get("input")
        t = self._track(x)
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        perm = self._perm_of(node, len(_shape(x) or ()))
        return Track(perm.index(t.axis), t.labels)

    @staticmethod
    def _perm_of(node: Node, nd: int) -> list[int]:
        name = ops.op_name(node.target)
        if name in ("transpose", "swapaxes"):
            d0, d1 = (_norm_dim(int(d), nd) for d in node.args[1:3])
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return perm
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) \
            else node.args[1]
        if not dims:
            dims = node.kwargs.get("dims", ())
        return [_norm_dim(int(d), nd) for d in dims]

    def _reshape(self, node: Node) -> Track:
        x = node.args[0] if node.args else node.kwargs.get("input")
        t = self._track(x)
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        return self._reshape_map(node, x, t)

    def _fix_kind(self, node: Node) -> str | None:
        if node.op == "call_module":
            return "unflatten" if isinstance(self.modules[str(node.target)], nn.Unflatten) else None
        name = ops.op_name(node.target)
        return {"view": "reshape", "reshape": "reshape", "unflatten": "unflatten"}.get(name)

    def _reshape_map(self, node: Node, x: Node, t: Track) -> Track:
        in_shape, out_shape = _shape(x), _shape(node)
        if in_shape is None or out_shape is None:
            raise _Block("shapes unknown (run shape propagation first)")
        where = map_reshape_axis(in_shape, out_shape, t.axis)
        if where is None:
            raise _Block(f"reshape {list(in_shape)} -> {list(out_shape)} mixes the channel axis with others")
        how, a, lo, hi = where
        kind = self._fix_kind(node)
        if how == "move":
            out, block = Track(a, t.labels), (a,)
        elif how == "merge":
            grid = in_shape[lo:hi]
            view = [1] * len(grid)
            view[t.axis - lo] = -1
            labels = np.broadcast_to(t.labels.reshape(view), grid).reshape(-1)
            out, block = Track(a, np.ascontiguousarray(labels)), (a,)
        else:
            big = [i for i in range(lo, hi) if out_shape[i] > 1]
            p = self._split_axis(node, big)
            grid = t.labels.reshape(out_shape[lo:hi])
            along = np.moveaxis(grid, p - lo, 0).reshape(out_shape[p], -1)
            for row in along:
                self.dg.couple_all(row)
            out, block = Track(p, np.ascontiguousarray(along[:, 0])), tuple(range(lo, hi))
        if kind is not None:
            self.dg.fixes.append(ShapeFix(node.name, kind, out.axis, [out.labels], out_shape, block))
        return out

    def _split_axis(self, node: Node, big: list[int]) -> int:
        """Which sub-axis of a channel split stays prunable: the inner one of a channel shuffle,
        else the outermost one not selected by an integer index downstream (e.g. q/k/v, heads)."""
        if len(big) == 2 and self._is_shuffle(node, big):
            return big[1]
        for axis in big:
            if not self._int_indexed(node, axis, depth=0):
                return axis
        raise _Block("every axis the channels are split into is indexed by an integer downstream")

    def _is_shuffle(self, node: Node, big: list[int]) -> bool:
        users = list(node.users)
        if len(users) != 1 or not self._is_permute(users[0]):
            return False
        perm = self._perm_of(users[0], len(_shape(node) or ()))
        if perm.index(big[0]) != big[1] or perm.index(big[1]) != big[0]:
            return False
        nxt = users[0]
        while True:
            users = list(nxt.users)
            if len(users) != 1:
                return False
            nxt = users[0]
            if _name(nxt) not in ("contiguous", "clone"):
                break
        shape_in, shape_out = _shape(users[0].args[0]) if users[0].args else None, _shape(nxt)
        return (self._fix_kind(nxt) == "reshape" or _name(nxt) == "flatten") and \
            shape_in is not None and shape_out is not None and len(shape_out) < len(shape_in)

    @staticmethod
    def _is_permute(node: Node) -> bool:
        return _name(node) in ("transpose", "permute", "swapaxes")

    def _int_indexed(self, node: Node, axis: int, depth: int) -> bool:
        if depth > 8:
            return False
        nd = len(_shape(node) or ())
        for user in node.users:
            if self._is_permute(user) and user.args[0] is node:
                if self._int_indexed(user, self._perm_of(user, nd).index(axis), depth + 1):
                    return True
            elif _name(user) in ("contiguous", "clone"):
                if self._int_indexed(user, axis, depth + 1):
                    return True
            elif _name(user) == "getitem" and user.args[0] is node:
                items = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
                pos = self._index_position(items, nd, axis)
                if pos is not None and isinstance(items[pos], (int, Node)):
                    return True
            elif _name(user) in ("unbind", "select"):
                dim = _arg(user, 1, "dim", 0)
                if isinstance(dim, int) and _norm_dim(dim, nd) == axis:
                    return True
        return False

    @staticmethod
    def _index_position(items: tuple, nd: int, axis: int) -> int | None:
        """Position in an index tuple of the item that indexes input axis ``axis``."""
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        in_ax = 0
        for pos, it in enumerate(items):
            if it is None:
                continue
            if it is Ellipsis:
                skip = nd - consuming
                if in_ax <= axis < in_ax + skip:
                    return None
                in_ax += skip
                continue
            if in_ax == axis:
                return pos
            in_ax += 1
        return None

    def _expand(self, node: Node) -> Track:
        t = self._track(node.args[0])
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        nd_in, out_shape = len(_shape(node.args[0]) or ()), _shape(node)
        axis = t.axis + len(out_shape or ()) - nd_in
        self.dg.fixes.append(ShapeFix(node.name, "expand", axis, [t.labels], out_shape or (), (axis,)))
        return Track(axis, t.labels)

    # ---------------------------------------------------------------- indexing / split / cat

    def _getitem(self, node: Node) -> Track | None:
        src, index = node.args[0], node.args[1]
        tt = self.tracks.get(src)
        if isinstance(tt, TupleTrack):
            if not isinstance(index, int):
                raise _Block("tuple indexed by a non-literal")
            return tt.items[index]
        t = self._track(src)
        if t is None:
            return None
        nd = len(_shape(src) or ())
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(it, Node) and _shape(it) is not None for it in items) or \
                any(isinstance(it, (list, torch.Tensor)) for it in items):
            raise _Block("advanced (tensor) indexing")
        consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
        in_ax = out_ax = 0
        for pos, it in enumerate(items):
            if it is None:
                out_ax += 1
            elif it is Ellipsis:
                skip = nd - consuming
                if in_ax <= t.axis < in_ax + skip:
                    return Track(out_ax + t.axis - in_ax, t.labels)
                in_ax += skip
                out_ax += skip
            elif isinstance(it, slice):
                if in_ax == t.axis:
                    return self._sliced(node, pos, it, t, out_ax)
                in_ax += 1
                out_ax += 1
            else:  # an integer (literal or computed)
                if in_ax == t.axis:
                    raise _Block("selects a single channel with an integer index")
                in_ax += 1
        return Track(out_ax + t.axis - in_ax, t.labels)

    def _sliced(self, node: Node, pos: int, sl: slice, t: Track, out_axis: int) -> Track:
        if sl == slice(None):
            return Track(out_axis, t.labels)
        if any(isinstance(v, Node) for v in (sl.start, sl.stop, sl.step)) or sl.step not in (None, 1):
            raise _Block("slices the channel axis with non-literal bounds or a step")
        start, stop, _ = sl.indices(len(t.labels))
        self.dg.fixes.append(ShapeFix(node.name, "slice", pos, [t.labels], (start, stop)))
        return Track(out_axis, t.labels[start:stop])

    def _split(self, node: Node) -> TupleTrack:
        x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
        t = self._track(x)
        metas = node.meta.get("tensor_meta")
        if t is None or not isinstance(metas, (tuple, list)):
            raise _Block("channels are tracked on an argument this rule does not read")
        nd = len(_shape(x) or ())
        dim = _norm_dim(int(_arg(node, 2, "dim", 0)), nd)
        if dim != t.axis:
            return TupleTrack([Track(t.axis, t.labels) for _ in metas])
        sizes = [int(m.shape[dim]) for m in metas]
        sections = np.split(t.labels, np.cumsum(sizes)[:-1])
        self.dg.fixes.append(ShapeFix(node.name, "split", dim, list(sections)))
        return TupleTrack([Track(dim, s) for s in sections])

    def _cat(self, node: Node) -> Track | None:
        tensors = list(_arg(node, 0, "tensors", ()))
        out_shape = _shape(node)
        if out_shape is None or not all(isinstance(n, Node) for n in tensors):
            raise _Block("concatenated values are unknown")
        dim = _norm_dim(int(_arg(node, 1, "dim", 0)), len(out_shape))
        tracks = [self._track(n) for n in tensors]
        if all(t is None or t.axis != dim for t in tracks):
            return self._align(node, tensors, out_shape, skip_axis=None)
        if any(t is not None and t.axis != dim for t in tracks):
            raise _Block("operands carry channels on different axes")
        parts = []
        for n, t in zip(tensors, tracks):
            if t is None:
                parts.append(self._input_space(n, (_shape(n) or ())[dim], f"channels of '{n.name}' are not "
                                               f"produced by a prunable layer"))
            else:
                parts.append(t.labels)
                self.dg.link(t.labels, node.name, "cat")
        return Track(dim, np.concatenate(parts))


def _name(node: Node) -> str | None:
    """The op's plain name (``fxcompress.ops.op_name``) for function and method calls, else None."""
    return ops.op_name(node.target) if node.op in ("call_function", "call_method") else None
