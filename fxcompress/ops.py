"""The op table: every torch function, Tensor method and aten overload a graph may call -> its kind.

Passes ask this table what a node does (``kind(node)``) instead of matching op targets themselves,
so a graph captured by symbolic tracing (``torch.relu``, ``operator.add``, ``x.view``) and one
captured by ``torch.export`` (``aten.relu.default``, ``aten.add.Tensor``, ``aten.view.default``) read
the same. It also holds the canonical spelling of aten overloads (``canonical_target``): the
torch-level function or Tensor method with the same arguments, which canonicalization writes into
exported graphs so passes see one dialect whichever front end ran.

Kinds: ``elementwise`` (unary, shape-preserving, position by position), ``broadcast`` (binary and n-ary
elementwise with broadcasting), ``scan`` (shape-preserving but mixing positions along a dim: cumsum,
tril, flip, sort), ``activation``, ``dropout``, ``reshape`` (view/reshape/flatten/squeeze/unsqueeze/
expand/unflatten), ``permute`` (transpose/permute), ``split``, ``cat``, ``index`` (getitem, slice,
select, gather), ``matmul``, ``linear``, ``conv``, ``pool``, ``reduction``, ``softmax``,
``normalization``, ``attention``, ``embedding``, ``cast``, ``shape`` (size/dim queries), ``factory``
(arange, zeros, ...), ``assert`` (guards with no value).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

aten = torch.ops.aten

KINDS = ("elementwise", "broadcast", "scan", "activation", "dropout", "reshape", "permute", "split", "cat", "index",
         "matmul", "linear", "conv", "pool", "reduction", "softmax", "normalization", "attention", "embedding",
         "cast", "shape", "factory", "assert")

# name -> kind, for torch functions, Tensor methods and aten packets alike (one spelling per op).
_BY_NAME: dict[str, str] = {}


def _add(kind: str, *names: str) -> None:
    for name in names:
        _BY_NAME[name] = kind


_add("elementwise", "abs", "neg", "exp", "log", "log1p", "sqrt", "rsqrt", "square", "sin", "cos", "erf", "sign",
     "reciprocal", "clamp", "clip", "clamp_min", "clamp_max", "nan_to_num", "clone", "detach", "contiguous",
     "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "alias", "round", "floor",
     "ceil", "trunc", "logical_not", "bitwise_not", "isnan", "isinf", "pow_", "fill_", "zero_",
     "requires_grad_")
_add("broadcast", "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide",
     "pow", "maximum", "minimum", "fmax", "fmin", "where", "eq", "ne", "gt", "ge", "lt", "le", "lerp",
     "addcmul", "addcdiv", "rsub", "__and__", "__or__", "__xor__", "logical_and", "logical_or", "bitwise_and",
     "bitwise_or", "remainder", "fmod", "expand_as", "masked_fill")
_add("activation", "relu", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
     "elu", "selu", "celu", "softplus", "softsign", "tanhshrink", "logsigmoid", "threshold", "sigmoid", "tanh",
     "prelu", "glu", "_threshold", "log_sigmoid")
_add("scan", "cumsum", "cumprod", "cummax", "cummin", "tril", "triu", "flip", "roll", "sort", "topk")
_add("dropout", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
     "feature_dropout", "native_dropout")
_add("reshape", "view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "expand", "view_as",
     "reshape_as", "_unsafe_view")
_add("permute", "transpose", "permute", "swapaxes", "t", "movedim")
_add("split", "split", "chunk", "split_with_sizes", "tensor_split", "unbind")
_add("cat", "cat", "concat", "concatenate", "stack")
_add("index", "getitem", "slice", "select", "gather", "index", "index_select", "narrow", "take_along_dim")
_add("matmul", "matmul", "bmm", "mm", "baddbmm", "addmm", "einsum")
_add("linear", "linear")
_add("conv", "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
     "conv_transpose3d")
_add("pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
     "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d",
     "max_pool2d", "max_pool3d", "lp_pool1d", "lp_pool2d", "interpolate", "upsample", "upsample_nearest",
     "upsample_bilinear", "upsample_nearest2d", "upsample_bilinear2d", "pad", "constant_pad_nd")
_add("reduction", "mean", "sum", "amax", "amin", "std", "var", "var_mean", "logsumexp", "prod", "norm", "max",
     "min", "argmax", "argmin", "all", "any")
_add("softmax", "softmax", "log_softmax", "_softmax", "_log_softmax", "normalize")
_add("normalization", "batch_norm", "layer_norm", "group_norm", "instance_norm",
     "_native_batch_norm_legit_no_training", "native_layer_norm", "native_group_norm", "rms_norm")
_add("attention", "scaled_dot_product_attention", "multi_head_attention_forward")
_add("embedding", "embedding", "embedding_bag")
_add("cast", "to", "float", "half", "double", "bfloat16", "type", "type_as", "cpu", "cuda", "_to_copy")
_add("shape", "size", "dim", "numel", "sym_size", "sym_numel", "sym_stride", "shape")
_add("factory", "arange", "zeros", "ones", "full", "empty", "tensor", "new_ones", "new_zeros", "new_full",
     "new_empty", "scalar_tensor", "lift_fresh_copy", "randn", "rand")
_add("assert", "_assert", "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
     "_assert_async", "sym_constrain_range")

_OPERATORS: dict[Callable[..., Any], str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.floordiv: "floor_divide", operator.pow: "pow", operator.matmul: "matmul", operator.neg: "neg",
    operator.abs: "abs", operator.getitem: "getitem", operator.eq: "eq", operator.ne: "ne", operator.gt: "gt",
    operator.ge: "ge", operator.lt: "lt", operator.le: "le", operator.and_: "__and__", operator.or_: "__or__",
    operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "div",
    operator.mod: "remainder",
}

#: module classes -> kind (call_module nodes)
MODULE_KINDS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvNd, "conv"), (nn.Linear, "linear"), (nn.modules.batchnorm._NormBase, "normalization"),
    (nn.LayerNorm, "normalization"), (nn.GroupNorm, "normalization"), (nn.Embedding, "embedding"),
    (nn.MultiheadAttention, "attention"), (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.Flatten, "reshape"), (nn.Unflatten, "reshape"), (nn.Identity, "elementwise"),
    (nn.Softmax, "softmax"), (nn.LogSoftmax, "softmax"), (nn.Softmin, "softmax"),
)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                       nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.Sigmoid, nn.Tanh,
                       nn.PReLU, nn.GLU, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold)
#: padding modules (kind ``pool``, like ``F.pad``): ``padding`` holds two sizes per padded dim
PAD_MODULES = (nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
               nn.modules.padding._ReplicationPadNd, nn.modules.padding._CircularPadNd)
_POOL_MODULES = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                 nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._LPPoolNd,
                 nn.Upsample, *PAD_MODULES)


def op_name(target: Any) -> str | None:
    """The op's plain name: ``aten.add.Tensor`` -> ``add``, ``torch.relu`` / ``F.relu`` -> ``relu``,
    ``operator.getitem`` -> ``getitem``, ``"view"`` (a method) -> ``view``; in-place ``add_`` -> ``add``."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::", 1)[-1]
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name.split("::", 1)[-1]
    elif target in _OPERATORS:
        return _OPERATORS[target]
    else:
        name = getattr(target, "__name__", None)
        if name is None:
            return None
    if name.endswith("_") and not name.endswith("__") and name[:-1] in _BY_NAME:
        name = name[:-1]
    return name


def kind_of_target(target: Any) -> str | None:
    """Kind of a function, method name or aten overload, or None when the table does not know it."""
    name = op_name(target)
    return _BY_NAME.get(name) if name is not None else None


def module_kind(module: nn.Module) -> str | None:
    """Kind of a module called by a ``call_module`` node."""
    if isinstance(module, _ACTIVATION_MODULES):
        return "activation"
    if isinstance(module, _POOL_MODULES):
        return "pool"
    for cls, kind in MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def kind(node: Node, root: nn.Module | None = None) -> str | None:
    """What ``node`` does, by the op table; ``root`` resolves ``call_module`` targets."""
    if node.op in ("call_function", "call_method"):
        return kind_of_target(node.target)
    if node.op == "call_module" and root is not None:
        try:
            return module_kind(root.get_submodule(str(node.target)))
        except AttributeError:
            return None
    return None


def is_kind(node: Node, *kinds: str, root: nn.Module | None = None) -> bool:
    return kind(node, root) in kinds


# -- canonical spelling of aten overloads -----------------------------------------------------------

#: aten packets whose canonical form is a Tensor method (no torch-level function has their arguments)
_AS_METHOD = frozenset({"view", "expand", "new_ones", "new_zeros", "new_full", "new_empty", "contiguous",
                        "expand_as", "view_as", "reshape_as", "type_as", "masked_fill"})
#: aten packets whose canonical form is a torch.nn.functional function with the same positional arguments
_AS_FUNCTIONAL = {
    "gelu": F.gelu, "silu": F.silu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "hardtanh": F.hardtanh,
    "mish": F.mish, "leaky_relu": F.leaky_relu, "elu": F.elu, "softplus": F.softplus, "glu": F.glu,
    "scaled_dot_product_attention": F.scaled_dot_product_attention, "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d, "adaptive_avg_pool3d": F.adaptive_avg_pool3d,
    "max_pool1d": F.max_pool1d, "max_pool2d": F.max_pool2d, "max_pool3d": F.max_pool3d,
    "avg_pool1d": F.avg_pool1d, "avg_pool2d": F.avg_pool2d, "avg_pool3d": F.avg_pool3d, "pad": F.pad,
    "logsigmoid": F.logsigmoid, "linear": F.linear,
}
_AS_METHOD_RENAMED = {"sym_size": "size", "sym_numel": "numel"}
_AS_OPERATOR = {"__and__": operator.and_, "__or__": operator.or_, "__xor__": operator.xor}
#: aten overloads kept as they are: no torch-level spelling with the same arguments
_KEEP = frozenset({"slice", "index", "to", "_to_copy", "sym_stride", "lift_fresh_copy",
                   "_softmax", "_log_softmax", "native_dropout", "convolution", "alias", "_unsafe_view",
                   "index_put", "copy", "copy_", "empty_strided", "scalar_tensor",
                   "_native_batch_norm_legit_no_training", "native_layer_norm", "native_group_norm"})


def canonical_target(target: Any) -> tuple[str, Any] | None:
    """``(op, target)`` of the torch-level spelling of an aten overload: ``("call_function", torch.add)``
    for ``aten.add.Tensor``, ``("call_method", "view")`` for ``aten.view.default``; None when the
    overload has no spelling with the same arguments (it is then kept as it is)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = op_name(target)
    if name is None or name in _KEEP or target._schema.name.split("::", 1)[-1] in _KEEP:
        return None
    schema_name = target._schema.name.split("::", 1)[-1]
    if schema_name.endswith("_") and not schema_name.endswith("__"):
        # in-place overloads keep their aliasing semantics as the Tensor method of the same name
        return ("call_method", schema_name) if hasattr(torch.Tensor, schema_name) else None
    if name in _AS_METHOD:
        return ("call_method", name)
    if name in _AS_METHOD_RENAMED:
        return ("call_method", _AS_METHOD_RENAMED[name])
    if name in _AS_FUNCTIONAL:
        return ("call_function", _AS_FUNCTIONAL[name])
    if name in _AS_OPERATOR:
        return ("call_function", _AS_OPERATOR[name])
    fn = getattr(torch, name, None)
    if callable(fn) and not isinstance(fn, type):
        return ("call_function", fn)
    return None


__all__ = ["KINDS", "MODULE_KINDS", "PAD_MODULES", "canonical_target", "is_kind", "kind", "kind_of_target", "module_kind",
           "op_name"]
