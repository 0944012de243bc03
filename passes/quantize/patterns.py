"""What each FX node is, as far as quantization cares.

Node kinds: ``conv``, ``conv_transpose``, ``linear``, ``matmul`` (the compute ops that get INT8
weights/inputs), ``add`` and ``cat`` (joins), ``relu``/``clip`` (activations a backend fuses
into the op before), ``avgpool`` (requantizing pools), ``passthrough`` (ops that move or select
values without changing them: maxpool, reshape, flatten, transpose, ...), ``batchnorm``, or
``other``. Works on ``call_module``, ``call_function`` and ``call_method`` forms alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress import ops

from .. import _fx_utils as fxu

COMPUTE = ("conv", "conv_transpose", "linear", "matmul")

_MODULE_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose"),
    ((nn.Linear,), "linear"),
    ((nn.ReLU,), "relu"),
    ((nn.ReLU6, nn.Hardtanh), "clip"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
      nn.AdaptiveAvgPool3d), "avgpool"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten,
      nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Unflatten), "passthrough"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "batchnorm"),
)

#: what quantization does with an op, by its name, where the op table's kind is not enough
_BY_NAME = {"add": "add", "__add__": "add", "relu": "relu", "relu6": "clip", "hardtanh": "clip",
            "contiguous": "passthrough"}
_BY_KIND = {"conv": "conv", "linear": "linear", "reshape": "passthrough", "permute": "passthrough",
            "dropout": "passthrough"}


def _target_kind(target: Any) -> str:
    """The quantization kind of a function or method target, from the op table (``fxcompress.ops``)."""
    name, kind = ops.op_name(target), ops.kind_of_target(target)
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name is None or kind is None:
        return "other"
    if kind == "conv":
        return "conv_transpose" if name.startswith("conv_transpose") else "conv" if name != "convolution" else "other"
    if kind == "matmul":
        return "matmul" if name in ("matmul", "bmm", "mm") else "other"
    if kind == "cat":
        return "cat" if name != "stack" else "other"
    if kind == "pool":
        return "avgpool" if "avg_pool" in name else "passthrough" if name.startswith("max_pool") else "other"
    return _BY_KIND.get(kind, "other")


@dataclass(frozen=True)
class OpInfo:
    """A classified node: its kind, the tensor inputs that carry activations, and its weight."""

    kind: str
    inputs: tuple[Node, ...]
    weight: Node | None = None
    module: nn.Module | None = None


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.all_input_nodes]


def classify(gm: GraphModule, node: Node) -> OpInfo:
    """The ``OpInfo`` of ``node`` (kind ``other`` for anything quantization leaves alone)."""
    if node.op == "call_module":
        mod = module_of(gm, node)
        for types, kind in _MODULE_KINDS:
            if isinstance(mod, types):
                if kind == "clip" and isinstance(mod, nn.Hardtanh) and not isinstance(mod, nn.ReLU6):
                    kind = "clip" if mod.min_val == 0.0 else "other"
                return OpInfo(kind, (node.args[0],) if node.args and isinstance(node.args[0], Node) else (),
                              module=mod)
        return OpInfo("other", tuple(_tensor_args(node)), module=mod)
    if node.op not in ("call_function", "call_method"):
        return OpInfo("other", ())
    kind = _target_kind(node.target)
    if kind in ("conv", "conv_transpose", "linear"):
        x = node.args[0] if node.args else node.kwargs.get("input")
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return OpInfo(kind, (x,) if isinstance(x, Node) else (), weight=w if isinstance(w, Node) else None)
    if kind == "matmul":
        args = [a for a in node.args[:2] if isinstance(a, Node)]
        if len(args) != 2:
            return OpInfo("other", tuple(args))
        a, b = args
        if b.op == "get_attr":
            return OpInfo("matmul", (a,), weight=b)
        if a.op == "get_attr":
            return OpInfo("other", tuple(args))
        return OpInfo("matmul", (a, b))
    if kind == "add":
        args = [a for a in node.args[:2] if isinstance(a, Node) and a.op != "get_attr"]
        if len(args) != 2 or node.kwargs.get("alpha", 1) != 1:
            return OpInfo("other", tuple(args))
        return OpInfo("add", tuple(args))
    if kind == "cat":
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        items = tuple(a for a in seq if isinstance(a, Node)) if isinstance(seq, (list, tuple)) else ()
        if not items or len(items) != len(seq):
            return OpInfo("other", items)
        return OpInfo("cat", items)
    if kind == "clip" and ops.op_name(node.target) == "hardtanh":
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        if lo != 0.0:
            return OpInfo("other", tuple(_tensor_args(node)))
    first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    return OpInfo(kind, (first,) if first is not None else ())


def module_path(node: Node) -> str:
    """The source module of a node (``call_module`` target, or the innermost module it was traced in)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return str(last[0]) if isinstance(last, tuple) else str(last)
    return ""


@dataclass(frozen=True)
class ConstantLinear:
    """A Linear / matmul whose weight is a constant: its node, the weight as ``[N, K]`` (out x in),
    its bias, and whether the graph stores the weight transposed (``[K, N]``: a matmul)."""

    node: Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    transposed: bool

    @property
    def x(self) -> Node:
        """The activation input, read now: an earlier rewrite may have replaced the node feeding it."""
        return self.node.args[0]  # type: ignore[return-value]


def constant_linear(gm: GraphModule, node: Node, info: OpInfo) -> ConstantLinear | str:
    """The ``ConstantLinear`` of a node ``info`` classifies as ``linear`` / ``matmul``, or the reason
    it has no constant 2-D weight (the weight-only quantization passes need one)."""
    if isinstance(info.module, nn.Linear):
        return ConstantLinear(node, info.module.weight.detach(), info.module.bias, False)
    if info.weight is None or info.weight.op != "get_attr":
        return "unsupported pattern: matmul of two activations (only a constant weight is quantized here)"
    w = fxu.get_attr_value(gm, str(info.weight.target))
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return "unsupported pattern: weight is not a 2-D constant"
    bias = fxu.call_arg(node, 2, "bias") if info.kind == "linear" else None
    if isinstance(bias, Node):
        if bias.op != "get_attr":
            return "unsupported pattern: bias computed at run time"
        bias = fxu.get_attr_value(gm, str(bias.target))
    linear = info.kind == "linear"
    return ConstantLinear(node, w.detach() if linear else w.detach().t(), bias, not linear)
