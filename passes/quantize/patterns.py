"""What each FX node is, as far as quantization cares.

Node kinds: ``conv``, ``conv_transpose``, ``linear``, ``matmul`` (the compute ops that get INT8
weights/inputs), ``add`` and ``cat`` (joins), ``relu``/``clip`` (activations a backend fuses
into the op before), ``avgpool`` (requantizing pools), ``passthrough`` (ops that move or select
values without changing them: maxpool, reshape, flatten, transpose, ...), ``batchnorm``, or
``other``. Works on ``call_module``, ``call_function`` and ``call_method`` forms alike.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

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

_FUNCTION_KINDS: dict[Any, str] = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", torch.conv1d: "conv", torch.conv2d: "conv",
    torch.conv3d: "conv",
    F.conv_transpose1d: "conv_transpose", F.conv_transpose2d: "conv_transpose", F.conv_transpose3d: "conv_transpose",
    torch.conv_transpose1d: "conv_transpose", torch.conv_transpose2d: "conv_transpose",
    torch.conv_transpose3d: "conv_transpose",
    F.linear: "linear",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul", torch.mm: "matmul",
    operator.add: "add", torch.add: "add", operator.iadd: "add",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    F.relu: "relu", torch.relu: "relu", F.relu6: "clip", F.hardtanh: "clip",
    F.avg_pool1d: "avgpool", F.avg_pool2d: "avgpool", F.avg_pool3d: "avgpool",
    F.adaptive_avg_pool1d: "avgpool", F.adaptive_avg_pool2d: "avgpool", F.adaptive_avg_pool3d: "avgpool",
    F.max_pool1d: "passthrough", F.max_pool2d: "passthrough", F.max_pool3d: "passthrough",
    torch.flatten: "passthrough", torch.reshape: "passthrough", torch.transpose: "passthrough",
    torch.permute: "passthrough", torch.squeeze: "passthrough", torch.unsqueeze: "passthrough",
    F.dropout: "passthrough",
}

_METHOD_KINDS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "mm": "matmul", "add": "add", "add_": "add", "__add__": "add",
    "relu": "relu", "relu_": "relu",
    "view": "passthrough", "reshape": "passthrough", "flatten": "passthrough", "permute": "passthrough",
    "transpose": "passthrough", "contiguous": "passthrough", "squeeze": "passthrough", "unsqueeze": "passthrough",
}


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
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target, "other")
    elif node.op == "call_method":
        kind = _METHOD_KINDS.get(str(node.target), "other")
    else:
        return OpInfo("other", ())
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
    if kind == "clip" and node.target is F.hardtanh:
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
