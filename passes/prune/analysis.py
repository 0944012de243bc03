"""Build a ``DependencyGraph`` from a GraphModule: one transfer rule per op kind.

The walk follows the graph in topological order and gives every tensor value at most one
*tracked* axis (its channel axis) with a label per position (see ``depgraph``). A rule either
proves how channels flow through its op (pass-through, coupling, concatenation, reshape...) or
blocks the channels it sees, with a reason: anything not understood stays unpruned.
"""

from __future__ import annotations

import fnmatch
import operator
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .depgraph import INPUT_KIND, DependencyGraph, ModuleEdit, ParamSlice, ShapeFix, Track, TupleTrack

__all__ = ["analyse"]

# ------------------------------------------------------------------------------------ op tables

_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.pow, torch.where, torch.fmax, torch.fmin,
    torch.eq, torch.ne, torch.gt, torch.ge, torch.lt, torch.le, operator.eq, operator.ne, operator.gt,
    operator.ge, operator.lt, operator.le, torch.lerp, torch.addcmul, torch.addcdiv,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "maximum", "minimum", "where", "add_", "sub_",
    "mul_", "div_", "eq", "ne", "gt", "ge", "lt", "le", "expand_as", "lerp", "masked_fill",
}
_UNARY_FUNCS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.threshold, F.sigmoid,
    F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt,
    torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.sin, torch.cos, torch.erf, torch.sign,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.nan_to_num, torch.clone, torch.detach, torch.dropout, operator.neg, operator.abs,
    torch.nn.functional.relu_, torch.relu_,
}
_UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt", "rsqrt",
    "square", "clamp", "clamp_", "clip", "contiguous", "clone", "detach", "float", "half", "double",
    "bfloat16", "to", "type", "type_as", "cpu", "cuda", "sin", "cos", "sign", "erf", "nan_to_num",
    "requires_grad_", "zero_", "fill_", "exp_", "neg_", "abs_", "clamp_min", "clamp_max", "hardtanh_",
}
_POOL_FUNCS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate, F.upsample, F.upsample_nearest,
    F.upsample_bilinear, torch.avg_pool1d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
}
_REDUCE_FUNCS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
                 torch.std: "std", torch.var: "var", torch.logsumexp: "logsumexp", torch.prod: "prod",
                 torch.norm: "norm", torch.max: "max", torch.min: "min", torch.argmax: "argmax",
                 torch.argmin: "argmin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm", "max", "min",
                   "argmax", "argmin"}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.normalize}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_RESHAPE_FUNCS = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten"}
_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}

_PASS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Threshold, nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Identity,
)
_POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)
_PAD_MODULES: tuple[type, ...] = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d,
)

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

class _Analyser:
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

    # ---------------------------------------------------------------- walk

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
        if node.op == "call_function":
            rule = self._function_rule(node.target)
        else:
            rule = self._method_rule(str(node.target))
        if rule is None:
            if node.meta.get("tensor_meta") is None:
                return None  # a size, a dtype, a shape: reading it does not constrain channels
            raise _Block("no channel rule for this op")
        return rule(node)

    def _function_rule(self, fn: Any) -> Callable[[Node], Any] | None:
        if fn in _ELEMENTWISE_FUNCS:
            return self._elementwise
        if fn in _UNARY_FUNCS:
            return self._unary
        if fn in _POOL_FUNCS:
            return self._pool
        if fn is F.pad:
            return self._pad
        if fn in _REDUCE_FUNCS:
            return self._reduce
        if fn in _SOFTMAX_FUNCS:
            return self._softmax
        if fn in _RESHAPE_FUNCS:
            return self._reshape
        if fn in (torch.transpose, torch.swapaxes, torch.permute):
            return self._permute
        if fn in _MATMUL_FUNCS:
            return self._matmul
        if fn in _CAT_FUNCS:
            return self._cat
        if fn in (torch.split, torch.chunk, torch.tensor_split):
            return self._split
        if fn is operator.getitem:
            return self._getitem
        if fn is F.scaled_dot_product_attention:
            return self._sdpa
        if fn is getattr:
            return lambda node: None
        return None

    def _method_rule(self, name: str) -> Callable[[Node], Any] | None:
        if name in _ELEMENTWISE_METHODS:
            return self._elementwise
        if name in _UNARY_METHODS:
            return self._unary
        if name in _REDUCE_METHODS:
            return self._reduce
        if name in _SOFTMAX_METHODS:
            return self._softmax
        if name in _RESHAPE_METHODS:
            return self._reshape
        if name in ("transpose", "permute", "swapaxes"):
            return self._permute
        if name in _MATMUL_METHODS:
            return self._matmul
        if name in ("split", "chunk", "tensor_split"):
            return self._split
        if name == "expand":
            return self._expand
        if name in ("size", "dim", "numel"):
            return lambda node: None
        return None

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

    # ---------------------------------------------------------------- modules

    def _module(self, node: Node, mod: nn.Module) -> Track | TupleTrack | None:
        x = node.args[0] if node.args else None
        t = self._track(x)
        path = str(node.target)
        if isinstance(mod, nn.modules.conv._ConvNd):
            self._single_call(node, mod)
            return self._conv_transpose(node, mod, t) if mod.transposed else self._conv(node, mod, t)
        if isinstance(mod, nn.Linear):
            self._single_call(node, mod)
            return self._linear(node, mod, t)
        if isinstance(mod, nn.Embedding):
            self._single_call(node, mod)
            labels = self._new_space(path, type(mod).__name__, node, mod.embedding_dim)
            nd = len(_shape(node) or (0, 0))
            self._slice(path, "weight", 1, labels, "out", node)
            self._edit(ModuleEdit(path, "embedding", node.name, out_labels=labels, out_dim=1))
            return Track(nd - 1, labels)
        if t is None:
            if any(self.tracks.get(n) is not None for n in _nodes_in((node.args, node.kwargs))):
                raise _Block("channels are tracked on an argument this module rule does not read")
            return None
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            self._single_call(node, mod)
            return self._batchnorm(node, mod, t, x)
        if isinstance(mod, nn.LayerNorm):
            self._single_call(node, mod)
            return self._layernorm(node, mod, t)
        if isinstance(mod, nn.GroupNorm):
            self._single_call(node, mod)
            return self._groupnorm(node, mod, t)
        if isinstance(mod, nn.PReLU):
            if mod.num_parameters == 1:
                return t
            self._single_call(node, mod)
            if t.axis != 1:
                raise _Block("PReLU with per-channel slopes applies them on dim 1")
            self._slice(path, "weight", 0, t.labels, "norm", node)
            self._edit(ModuleEdit(path, "prelu", node.name, in_labels=t.labels, out_labels=t.labels))
            return t
        if isinstance(mod, _PASS_MODULES):
            return t
        if isinstance(mod, _POOL_MODULES):
            return self._spatial(node, t)
        if isinstance(mod, _PAD_MODULES):
            return self._padded(node, t, len(mod.padding) // 2)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            nd = len(_shape(x) or ())
            if mod.dim is None or _norm_dim(mod.dim, nd) == t.axis:
                raise _Block("normalizes over the channel axis")
            return t
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self._reshape_map(node, x, t)
        if isinstance(mod, nn.ChannelShuffle):
            raise _Block("nn.ChannelShuffle is not analysed; write it as view-transpose-view")
        raise _Block(f"{type(mod).__name__} is not understood by the channel analysis")

    def _edit(self, edit: ModuleEdit) -> None:
        self.dg.edits[edit.path] = edit
        if edit.out_labels is not None and edit.kind in ("conv", "conv_transpose", "linear", "embedding"):
            self.out_edit[edit.node] = edit

    def _conv(self, node: Node, mod: nn.modules.conv._ConvNd, t: Track | None) -> Track:
        path = str(node.target)
        cin, cout, groups = mod.in_channels, mod.out_channels, mod.groups
        if t is not None and t.axis != 1:
            self.dg.block(t.labels, f"conv '{path}' reads channels on dim 1, not on dim {t.axis}")
            t = None
        edit = ModuleEdit(path, "conv", node.name, in_labels=None if t is None else t.labels)
        if groups == 1:
            if t is not None:
                self._slice(path, "weight", 1, t.labels, "in", node)
            out = self._new_space(path, type(mod).__name__, node, cout)
        elif t is None:
            out = self._new_space(path, type(mod).__name__, node, cout)
            self.dg.block(out, f"grouped conv '{path}' reads channels no layer produces, so its groups are fixed")
        elif groups == cin:
            edit.mode = "depthwise"
            out = np.repeat(t.labels, cout // cin)
        else:
            edit.mode, edit.group_size = "grouped", cin // groups
            blocks = t.labels.reshape(groups, cin // groups)
            for row in blocks:
                self.dg.couple_all(row)
            out = np.repeat(blocks[:, 0], cout // groups)
        edit.out_labels = out
        self._slice(path, "weight", 0, out, "out", node)
        if mod.bias is not None:
            self._slice(path, "bias", 0, out, "out", node)
        self._edit(edit)
        return Track(1, out)

    def _conv_transpose(self, node: Node, mod: nn.modules.conv._ConvNd, t: Track | None) -> Track:
        path = str(node.target)
        if t is not None and (t.axis != 1 or mod.groups != 1):
            self.dg.block(t.labels, f"conv-transpose '{path}' with groups={mod.groups} on dim {t.axis} "
                                    f"is not analysed")
            t = None
        if t is not None:
            self._slice(path, "weight", 0, t.labels, "in", node)
        out = self._new_space(path, type(mod).__name__, node, mod.out_channels)
        if mod.groups != 1:
            self.dg.block(out, f"grouped conv-transpose '{path}' is not pruned")
        self._slice(path, "weight", 1, out, "out", node)
        if mod.bias is not None:
            self._slice(path, "bias", 0, out, "out", node)
        self._edit(ModuleEdit(path, "conv_transpose", node.name, in_labels=None if t is None else t.labels,
                              out_labels=out, out_dim=1))
        return Track(1, out)

    def _linear(self, node: Node, mod: nn.Linear, t: Track | None) -> Track:
        path = str(node.target)
        nd = len(_shape(node) or (0, 0))
        out = self._new_space(path, type(mod).__name__, node, mod.out_features)
        if t is not None and t.axis != nd - 1:
            # the linear maps another axis; the channels it sees pass through untouched
            self.dg.block(out, f"Linear '{path}' is applied on an axis while channels are tracked on "
                               f"axis {t.axis}")
            self._edit(ModuleEdit(path, "linear", node.name, out_labels=out))
            return t
        if t is not None:
            self._slice(path, "weight", 1, t.labels, "in", node)
        self._slice(path, "weight", 0, out, "out", node)
        if mod.bias is not None:
            self._slice(path, "bias", 0, out, "out", node)
        self._edit(ModuleEdit(path, "linear", node.name, in_labels=None if t is None else t.labels,
                              out_labels=out))
        return Track(nd - 1, out)

    def _batchnorm(self, node: Node, mod: nn.Module, t: Track, x: Node) -> Track:
        path = str(node.target)
        if t.axis != 1:
            raise _Block(f"normalizes dim 1 but channels are on dim {t.axis}")
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mod, name, None) is not None:
                self._slice(path, name, 0, t.labels, "norm", node)
        self._edit(ModuleEdit(path, "norm", node.name, in_labels=t.labels, out_labels=t.labels))
        producer = self.out_edit.get(x.name) if isinstance(x, Node) else None
        if producer is not None and len(x.users) == 1 and producer.kind in ("conv", "linear"):
            producer.norm = path
        return t

    def _layernorm(self, node: Node, mod: nn.LayerNorm, t: Track) -> Track:
        path = str(node.target)
        nd = len(_shape(node) or ())
        k = len(mod.normalized_shape)
        if t.axis < nd - k:
            return t
        if k != 1:
            raise _Block(f"normalizes over {k} axes including the channel axis")
        if self.norm_stats == "block":
            raise _Block(NORM_STATS_REASON.format(what="LayerNorm"))
        for name in ("weight", "bias"):
            if getattr(mod, name, None) is not None:
                self._slice(path, name, 0, t.labels, "norm", node)
        self._edit(ModuleEdit(path, "layernorm", node.name, in_labels=t.labels, out_labels=t.labels))
        return t

    def _groupnorm(self, node: Node, mod: nn.GroupNorm, t: Track) -> Track:
        path = str(node.target)
        if t.axis != 1:
            raise _Block(f"normalizes dim 1 but channels are on dim {t.axis}")
        g, c = mod.num_groups, mod.num_channels
        edit = ModuleEdit(path, "groupnorm", node.name, in_labels=t.labels, out_labels=t.labels,
                          group_size=c // g)
        if g == 1:
            if self.norm_stats == "block":
                raise _Block(NORM_STATS_REASON.format(what="GroupNorm with one group"))
            edit.mode = "single"
        elif g == c:
            edit.mode = "per-channel"
        else:
            edit.mode = "groups"
            for row in t.labels.reshape(g, c // g):
                self.dg.couple_all(row)
        if mod.affine:
            self._slice(path, "weight", 0, t.labels, "norm", node)
            self._slice(path, "bias", 0, t.labels, "norm", node)
        self._edit(edit)
        return t

    # ---------------------------------------------------------------- element-wise

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
        name = node.target if isinstance(node.target, str) else _REDUCE_FUNCS.get(node.target, "")
        if name in ("max", "min") and dim is not None:
            return TupleTrack([out, out])
        return out

    def _softmax(self, node: Node) -> Track:
        x = node.args[0] if node.args else node.kwargs.get("input")
        t = self._track(x)
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        nd = len(_shape(x) or ())
        default = 1 if node.target is F.normalize else None
        dim = _arg(node, 1 if node.target is not F.normalize else 2, "dim", default)
        if not isinstance(dim, int) or _norm_dim(dim, nd) == t.axis:
            raise _Block("normalizes over the channel axis")
        return t

    # ---------------------------------------------------------------- shapes

    def _permute(self, node: Node) -> Track:
        x = node.args[0] if node.args else node.kwargs.get("input")
        t = self._track(x)
        if t is None:
            raise _Block("channels are tracked on an argument this rule does not read")
        perm = self._perm_of(node, len(_shape(x) or ()))
        return Track(perm.index(t.axis), t.labels)

    @staticmethod
    def _perm_of(node: Node, nd: int) -> list[int]:
        name = node.target if isinstance(node.target, str) else node.target.__name__
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
        name = node.target if isinstance(node.target, str) else node.target.__name__
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
            if not (nxt.op == "call_method" and nxt.target in ("contiguous", "clone")):
                break
        shape_in, shape_out = _shape(users[0].args[0]) if users[0].args else None, _shape(nxt)
        return (self._fix_kind(nxt) == "reshape" or nxt.target in (torch.flatten, "flatten")) and \
            shape_in is not None and shape_out is not None and len(shape_out) < len(shape_in)

    @staticmethod
    def _is_permute(node: Node) -> bool:
        return (node.op == "call_method" and node.target in ("transpose", "permute", "swapaxes")) or \
            (node.op == "call_function" and node.target in (torch.transpose, torch.permute, torch.swapaxes))

    def _int_indexed(self, node: Node, axis: int, depth: int) -> bool:
        if depth > 8:
            return False
        nd = len(_shape(node) or ())
        for user in node.users:
            if self._is_permute(user) and user.args[0] is node:
                if self._int_indexed(user, self._perm_of(user, nd).index(axis), depth + 1):
                    return True
            elif user.op == "call_method" and user.target in ("contiguous", "clone"):
                if self._int_indexed(user, axis, depth + 1):
                    return True
            elif user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
                items = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
                pos = self._index_position(items, nd, axis)
                if pos is not None and isinstance(items[pos], (int, Node)):
                    return True
            elif (user.op == "call_method" and user.target in ("unbind", "select")) or \
                    (user.op == "call_function" and user.target in (torch.unbind, torch.select)):
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

    # ---------------------------------------------------------------- matmul / attention

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


def analyse(gm: GraphModule, *, exclude: Iterable[str] = (), norm_stats: str = "block") -> DependencyGraph:
    """The channel-dependency graph of ``gm``; nodes must carry ``meta["tensor_meta"]``.

    ``norm_stats="block"`` keeps the channels a LayerNorm or one-group GroupNorm normalizes over
    (removing one changes the statistics, so pruning there is never exact); ``"prune"`` allows it.
    """
    return _Analyser(gm, tuple(exclude), norm_stats).run()
