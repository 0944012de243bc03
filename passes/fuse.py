"""Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear that feeds it (exact).

``bn(conv(x)) == conv'(x)`` with ``W' = W * s`` per output channel and ``b' = (b - mean) * s + beta``,
``s = gamma / sqrt(var + eps)``; computed in float64 and cast back to the weight's dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.pass_base import Pass, PassContext, PassResult, prefer_after

from ._fx_utils import (call_arg, delete_submodules_if_unused, delete_unused_attributes, get_attr_value,
                        get_module, meta_shape, replace_call_module)

__all__ = ["FoldBatchNorm"]

#: foldable producer type -> rank of its output the BatchNorm must see (channels on dim 1)
_PRODUCERS: dict[type, int] = {
    nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5,
    nn.ConvTranspose1d: 3, nn.ConvTranspose2d: 4, nn.ConvTranspose3d: 5,
    nn.Linear: 2,
}


@dataclass
class _BatchNormParams:
    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    eps: float


class _Skip(Exception):
    """Why one BatchNorm node cannot be folded."""


def _bn_params(gm: GraphModule, node: Node) -> _BatchNormParams | None:
    """Running statistics and affine parameters of a BatchNorm node; None if the node is not BatchNorm.

    Raises ``_Skip`` when it is a BatchNorm that normalizes with batch statistics.
    """
    if node.op == "call_module":
        bn = get_module(gm, node)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            return None
        if bn.training:
            raise _Skip("BatchNorm is in training mode (uses batch statistics); put the model in eval()")
        if bn.running_mean is None or bn.running_var is None:
            raise _Skip("BatchNorm has track_running_stats=False (always uses batch statistics)")
        return _BatchNormParams(bn.running_mean, bn.running_var, bn.weight, bn.bias, float(bn.eps))
    if node.op == "call_function" and node.target is F.batch_norm:
        if call_arg(node, 5, "training", False) is not False:
            raise _Skip("F.batch_norm is called with training=True (uses batch statistics)")
        tensors = []
        for index, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
            arg = call_arg(node, index, name)
            if arg is None and index >= 3:
                tensors.append(None)
            elif isinstance(arg, Node) and arg.op == "get_attr":
                tensors.append(get_attr_value(gm, str(arg.target)))
            else:
                raise _Skip(f"F.batch_norm argument {name!r} is not a stored parameter/buffer")
        eps = call_arg(node, 7, "eps", 1e-5)
        if not isinstance(eps, (int, float)):
            raise _Skip("F.batch_norm eps is not a constant")
        return _BatchNormParams(*tensors, eps=float(eps))
    return None


def _check_producer(gm: GraphModule, bn_node: Node, params: _BatchNormParams) -> Node:
    """The Conv/Linear node feeding ``bn_node`` if it can absorb the BatchNorm, else ``_Skip``."""
    src = bn_node.args[0] if bn_node.args else bn_node.kwargs.get("input")
    if not (isinstance(src, Node) and src.op == "call_module" and type(get_module(gm, src)) in _PRODUCERS):
        what = f"{src.op} {src.target}" if isinstance(src, Node) else repr(src)
        raise _Skip(f"input is not a Conv/ConvTranspose/Linear module (it is {what})")
    mod = get_module(gm, src)
    others = [u.name for u in src.users if u is not bn_node]
    if others:
        raise _Skip(f"output of {src.name} is also used by {', '.join(sorted(others))}; "
                    "folding would change them")
    if not mod.weight.is_floating_point():
        raise _Skip(f"{src.name} weight has dtype {mod.weight.dtype}, not floating point")
    shape = meta_shape(src)
    if shape is None:
        raise _Skip(f"no shape information on {src.name}; run fxcompress.verify.propagate_shapes first")
    out_channels = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
    if len(shape) != _PRODUCERS[type(mod)] or shape[1] != out_channels:
        raise _Skip(f"BatchNorm normalizes dim 1 of {src.name}'s output {list(shape)}, which is not "
                    f"its {out_channels} output channels")
    if params.mean.numel() != out_channels:
        raise _Skip(f"BatchNorm has {params.mean.numel()} features but {src.name} has {out_channels} outputs")
    return src


def _folded_module(mod: nn.Module, p: _BatchNormParams) -> nn.Module:
    """A new module equal to ``bn(mod(x))``; ``mod`` itself is left untouched."""
    w = mod.weight.detach().double()
    out = p.mean.numel()
    var, mean = p.var.detach().double(), p.mean.detach().double()
    gamma = p.gamma.detach().double() if p.gamma is not None else torch.ones_like(mean)
    beta = p.beta.detach().double() if p.beta is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + p.eps)
    bias = mod.bias.detach().double() if mod.bias is not None else torch.zeros_like(mean)
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        g = mod.groups
        kernel = w.shape[2:]
        grouped = w.reshape(g, w.shape[0] // g, out // g, *kernel)
        w = (grouped * scale.reshape(g, 1, out // g, *([1] * len(kernel)))).reshape(w.shape)
    else:
        w = w * scale.reshape(out, *([1] * (w.dim() - 1)))
    new = copy.deepcopy(mod)
    new.weight = nn.Parameter(w.to(mod.weight.dtype), requires_grad=mod.weight.requires_grad)
    new.bias = nn.Parameter(((bias - mean) * scale + beta).to(mod.weight.dtype),
                            requires_grad=mod.weight.requires_grad)
    return new


@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold eval-mode BatchNorm into the preceding Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear
    (``nn.BatchNorm*`` modules and ``F.batch_norm`` on stored statistics).

    A BatchNorm is skipped, with the reason in a diagnostic and ``stats["skipped"]``, when its input
    is not such a module, that module's output has other users, it uses batch statistics (training
    mode, ``track_running_stats=False``) or the channel dims do not line up. Folded convolutions
    are new module objects: a module also called elsewhere keeps its own weights.
    ``stats["folded"]`` lists (producer node, BatchNorm node).
    """

    name: ClassVar[str] = "fold-batchnorm"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = True
    order_preferences: ClassVar[tuple] = (prefer_after(
        "trait:trains",
        reason="training after BatchNorm is folded away barely recovers accuracy (the folded layers "
               "train without normalization); fold BatchNorm once training is done"),)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(graph=gm)
        folded: list[tuple[str, str]] = []
        skipped: dict[str, str] = {}
        bn_modules: set[str] = set()
        stat_attrs: set[str] = set()
        for node in list(gm.graph.nodes):
            try:
                params = _bn_params(gm, node)
                if params is None:
                    continue
                src = _check_producer(gm, node, params)
            except _Skip as why:
                skipped[node.name] = str(why)
                result.warn(f"BatchNorm not folded: {why}", node.name)
                continue
            replace_call_module(gm, src, _folded_module(get_module(gm, src), params))
            if node.op == "call_module":
                bn_modules.add(str(node.target))
            else:
                stat_attrs.update(str(a.target) for a in node.all_input_nodes if a.op == "get_attr")
            inputs = [a for a in node.all_input_nodes if a is not src]
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            for attr in inputs:
                if attr.op == "get_attr" and not attr.users:
                    gm.graph.erase_node(attr)
            folded.append((src.name, node.name))
            result.replaces[src.name] = node.name
        delete_submodules_if_unused(gm, bn_modules)
        delete_unused_attributes(gm, only=stat_attrs)
        result.stats = {"folded": folded, "skipped": skipped}
        return result

