"""Channel rules of modules: conv, linear, embedding, normalizations, pass-through and pooling modules."""

from __future__ import annotations

import numpy as np
from torch import nn
from torch.fx import Node

from fxcompress import ops

from ..depgraph import ModuleEdit, Track, TupleTrack
from ._base import NORM_STATS_REASON, RuleBase, _Block, _nodes_in, _norm_dim, _shape


class ModuleRules(RuleBase):

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
        kind = ops.module_kind(mod)
        if kind in ("activation", "dropout", "elementwise"):
            if isinstance(mod, nn.GLU):
                raise _Block("GLU halves the axis it gates")
            return t
        if kind == "pool":
            if isinstance(mod, ops.PAD_MODULES):
                return self._padded(node, t, len(mod.padding) // 2)
            return self._spatial(node, t)
        if kind == "softmax":
            nd = len(_shape(x) or ())
            if mod.dim is None or _norm_dim(mod.dim, nd) == t.axis:
                raise _Block("normalizes over the channel axis")
            return t
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self._reshape_map(node, x, t)
        if isinstance(mod, nn.ChannelShuffle):
            raise _Block("nn.ChannelShuffle is not analysed; write it as view-transpose-view")
        raise _Block(f"{type(mod).__name__} is not understood by the channel analysis")

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
