"""Canonical graph text (``.fxg``) of FX and ONNX graphs, text diffs and a networkx view.

The text is what snapshots, goldens and ``fxcompress diff`` compare, so it must be
deterministic across runs, processes and ``PYTHONHASHSEED`` (no ids, addresses or set order;
floats via ``repr``), free of parameter values (changing weights never changes it), and
readable in a unified diff: one line per node.

FX (header ``# fxg 1 fx``), one line per node::

    <op kind> %<name> = <target> (<args>, <kw>=<v>) {<param>: <dtype>[<shape>], ...} -> <dtype>[<shape>]

where the target of ``call_module`` is ``<path>:<Class(hyper-parameters)>``, of ``call_function``
a qualified name (``torch.relu``, ``operator.add``), of ``call_method`` ``Tensor.<method>``.

ONNX (header ``# fxg 1 onnx`` and the opsets), after shape inference on a copy::

    input %x : f32[batch,3,32,32]
    <node name> = <OpType>(%a, %W:f32[16,3,3,3]) {<attr>=<v>, ...} -> %y : f32[batch,16,32,32]
    output %y : f32[batch,16,32,32]

Initializers show shape and dtype only; small int64 initializers/constants (shapes, axes:
structure, not weights) also show their values.
"""

from __future__ import annotations

import difflib
import enum
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from .attrs import fetch_attr
from .errors import InputError
from .onnx_graph import infer_shapes, iter_nodes, without_weights

if TYPE_CHECKING:  # pragma: no cover
    import networkx
    import onnx

FORMAT_VERSION = 1
_OP_WIDTH = len("call_function")
_MAX_PARAMS_LISTED = 16
_MAX_INT_VALUES_SHOWN = 8

_DTYPE_SHORT = {
    "float32": "f32", "float": "f32", "float64": "f64", "double": "f64", "float16": "f16", "half": "f16",
    "bfloat16": "bf16", "int8": "i8", "uint8": "u8", "int16": "i16", "uint16": "u16", "int32": "i32",
    "uint32": "u32", "int64": "i64", "uint64": "u64", "int4": "i4", "uint4": "u4", "bool": "bool",
    "complex64": "c64", "complex128": "c128", "string": "str",
    "float8_e4m3fn": "f8e4m3fn", "float8e4m3fn": "f8e4m3fn", "float8_e5m2": "f8e5m2", "float8e5m2": "f8e5m2",
    "float8_e4m3fnuz": "f8e4m3fnuz", "float8e4m3fnuz": "f8e4m3fnuz",
    "float8_e5m2fnuz": "f8e5m2fnuz", "float8e5m2fnuz": "f8e5m2fnuz",
}


def short_dtype(dtype: Any) -> str:
    """``torch.float32`` / ONNX ``FLOAT`` / ``"float32"`` -> ``"f32"`` (unknown names lower-cased)."""
    if isinstance(dtype, int):
        import onnx

        name = onnx.TensorProto.DataType.Name(dtype)
    else:
        name = str(dtype)
    name = name.removeprefix("torch.").lower()
    return _DTYPE_SHORT.get(name, name)


def _shape(dims: Any) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


# --------------------------------------------------------------------------------------- FX

def function_name(fn: Any) -> str:
    """Stable qualified name of a call_function target: ``torch.relu``, ``operator.add``, ..."""
    if isinstance(fn, str):
        return fn
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{fn}"
    try:
        from torch.fx.node import _get_qualified_name

        name = _get_qualified_name(fn)
    except Exception:
        module = getattr(fn, "__module__", None) or ""
        qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__qualname__
        name = f"{module}.{qual}" if module else qual
    if name.startswith("_operator."):
        return "operator." + name[len("_operator."):]
    if "._" in name or name.startswith("_"):
        short = getattr(fn, "__name__", "")
        for prefix, namespace in (("torch.nn.functional", nn.functional), ("torch", torch),
                                  ("torch.special", torch.special), ("torch.linalg", torch.linalg),
                                  ("torch.fft", torch.fft)):
            if short and getattr(namespace, short, None) is fn:
                return f"{prefix}.{short}"
    return name


def _ints(value: Any, sep: str = "x", *, collapse: bool = True) -> str:
    if isinstance(value, str):
        return value
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if collapse and len(set(values)) == 1:
        return str(values[0])
    return sep.join(str(v) for v in values)


def _conv(m: nn.modules.conv._ConvNd) -> list[str]:
    parts = [f"{m.in_channels}->{m.out_channels}", f"k={_ints(m.kernel_size, collapse=False)}",
             f"s={_ints(m.stride)}", f"p={_ints(m.padding)}"]
    if any(d != 1 for d in m.dilation):
        parts.append(f"d={_ints(m.dilation)}")
    if m.transposed and any(o != 0 for o in m.output_padding):
        parts.append(f"op={_ints(m.output_padding)}")
    parts.append(f"g={m.groups}")
    if m.padding_mode != "zeros":
        parts.append(f"pad_mode={m.padding_mode}")
    parts.append("bias" if m.bias is not None else "no-bias")
    return parts


def _batchnorm(m: nn.modules.batchnorm._NormBase) -> list[str]:
    parts = [str(m.num_features), f"eps={m.eps!r}"]
    if not m.affine:
        parts.append("no-affine")
    if not m.track_running_stats:
        parts.append("no-stats")
    return parts


def _linear(m: nn.Linear) -> list[str]:
    return [f"{m.in_features}->{m.out_features}"] + ([] if m.bias is not None else ["no-bias"])


def _layernorm(m: nn.LayerNorm) -> list[str]:
    parts = [_ints(m.normalized_shape, collapse=False), f"eps={m.eps!r}"]
    if not m.elementwise_affine:
        parts.append("no-affine")
    elif getattr(m, "bias", True) is None:
        parts.append("no-bias")
    return parts


def _groupnorm(m: nn.GroupNorm) -> list[str]:
    return [str(m.num_groups), str(m.num_channels), f"eps={m.eps!r}"] + ([] if m.affine else ["no-affine"])


def _mha(m: nn.MultiheadAttention) -> list[str]:
    parts = [str(m.embed_dim), f"heads={m.num_heads}"]
    if m.kdim != m.embed_dim or m.vdim != m.embed_dim:
        parts.append(f"kdim={m.kdim}, vdim={m.vdim}")
    if m.dropout:
        parts.append(f"dropout={m.dropout!r}")
    if m.batch_first:
        parts.append("batch_first")
    if m.in_proj_bias is None:
        parts.append("no-bias")
    return parts


def _rnn(m: nn.RNNBase) -> list[str]:
    parts = [f"{m.input_size}->{m.hidden_size}", f"layers={m.num_layers}"]
    if getattr(m, "proj_size", 0):
        parts.append(f"proj={m.proj_size}")
    if getattr(m, "nonlinearity", "tanh") != "tanh":
        parts.append(m.nonlinearity)
    for flag in ("batch_first", "bidirectional"):
        if getattr(m, flag):
            parts.append(flag)
    if not m.bias:
        parts.append("no-bias")
    if m.dropout:
        parts.append(f"dropout={m.dropout!r}")
    return parts


def _pool(m: nn.Module) -> list[str]:
    parts = [f"k={_ints(m.kernel_size, collapse=False)}", f"s={_ints(m.stride)}", f"p={_ints(m.padding)}"]
    dilation = getattr(m, "dilation", 1)
    if _ints(dilation) != "1":
        parts.append(f"d={_ints(dilation)}")
    if m.ceil_mode:
        parts.append("ceil")
    if getattr(m, "count_include_pad", True) is False:
        parts.append("exclude-pad")
    if getattr(m, "return_indices", False):
        parts.append("indices")
    return parts


_DESCRIBERS: tuple[tuple[type, Any], ...] = (
    (nn.modules.conv._ConvNd, _conv),
    (nn.modules.batchnorm._BatchNorm, _batchnorm),
    (nn.Linear, _linear),
    (nn.LayerNorm, _layernorm),
    (nn.GroupNorm, _groupnorm),
    (nn.modules.dropout._DropoutNd, lambda m: [f"p={m.p!r}"]),
    (nn.MultiheadAttention, _mha),
    (nn.RNNBase, _rnn),
    (nn.Embedding, lambda m: [str(m.num_embeddings), str(m.embedding_dim)]
     + ([f"padding_idx={m.padding_idx}"] if m.padding_idx is not None else [])),
    (nn.modules.pooling._MaxPoolNd, _pool),
    (nn.modules.pooling._AvgPoolNd, _pool),
)

_TRAINING_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.MultiheadAttention,
                       nn.RNNBase)


def describe_module(module: nn.Module) -> str:
    """Class name and key hyper-parameters, e.g. ``Conv2d(3->16, k=3x3, s=1, p=1, g=1, bias)``."""
    name = type(module).__name__
    for cls, describe in _DESCRIBERS:
        if isinstance(module, cls) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
            parts = describe(module)
            break
    else:
        extra = " ".join(module.extra_repr().split())
        parts = [extra] if extra else []
    if module.training and isinstance(module, _TRAINING_SENSITIVE):
        parts.append("training")
    return f"{name}({', '.join(parts)})"


def _tensor_type(t: torch.Tensor) -> str:
    if isinstance(t, nn.parameter.UninitializedTensorMixin):
        return "uninitialized"
    text = f"{short_dtype(t.dtype)}{_shape(t.shape)}"
    if t.layout != torch.strided:
        text += "{" + str(t.layout).removeprefix("torch.") + "}"
    return text


def _module_tensors(module: nn.Module) -> str:
    entries = [f"{n}: {_tensor_type(t)}" for n, t in module.named_parameters()]
    entries += [f"{n}: {_tensor_type(t)}" for n, t in module.named_buffers()]
    if not entries:
        return ""
    if len(entries) > _MAX_PARAMS_LISTED:
        more = len(entries) - _MAX_PARAMS_LISTED
        entries = entries[:_MAX_PARAMS_LISTED] + [f"... {more} more"]
    return "{" + ", ".join(entries) + "}"


def _qualified(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}.{qual}" if module and module != "builtins" else qual


def format_arg(value: Any) -> str:
    """A node argument: ``%name`` for nodes, a stable literal for constants (never an address)."""
    if isinstance(value, Node):
        return f"%{value.name}"
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if value is Ellipsis:
        return "..."
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, torch.device):
        return f"device({str(value)!r})"
    if isinstance(value, torch.Tensor):
        return f"tensor({_tensor_type(value)})"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, slice):
        return f"slice({format_arg(value.start)}, {format_arg(value.stop)}, {format_arg(value.step)})"
    if isinstance(value, tuple):
        inner = ", ".join(format_arg(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(format_arg(v) for v in value) + "]"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(format_arg(v) for v in value)) + "}"
    if isinstance(value, dict):
        items = sorted((format_arg(k), format_arg(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if callable(value) or isinstance(value, type):
        return function_name(value) if not isinstance(value, type) else _qualified(value)
    return f"<{type(value).__qualname__}>"


def _format_meta(meta: Any) -> str:
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return f"{short_dtype(meta.dtype)}{_shape(meta.shape)}"
    if isinstance(meta, tuple) and not hasattr(meta, "_fields"):
        inner = ", ".join(_format_meta(m) for m in meta)
        return f"({inner},)" if len(meta) == 1 else f"({inner})"
    if isinstance(meta, list):
        return "[" + ", ".join(_format_meta(m) for m in meta) + "]"
    if isinstance(meta, dict):
        items = sorted(meta.items(), key=lambda item: str(item[0]))
        return "{" + ", ".join(f"{k}: {_format_meta(v)}" for k, v in items) + "}"
    return "None" if meta is None else type(meta).__name__


def _output_meta(node: Node) -> Any:
    if "tensor_meta" in node.meta:
        return node.meta["tensor_meta"]
    val = node.meta.get("val")
    return val if isinstance(val, (torch.Tensor, tuple, list)) else None


def fx_node_kinds(node: Node) -> tuple[str, ...]:
    """What a node is, most specific first: ``("Conv2d", "torch.nn.modules.conv.Conv2d")``,
    ``("torch.relu", "relu")``, ``("Tensor.view", "view")``, ``("placeholder",)``."""
    if node.op == "call_module":
        module = fetch_attr(node.graph.owning_module, node.target, None)
        if module is None:
            return ("?",)
        return (type(module).__name__, _qualified(type(module)))
    if node.op in ("call_function", "call_method"):
        name = function_name(node.target) if node.op == "call_function" else f"Tensor.{node.target}"
        short = name.rsplit(".", 1)[-1]
        return (name, short) if short != name else (name,)
    return (node.op,)


def _fx_line(node: Node, root: nn.Module | None) -> str:
    target = ""
    args = node.args
    params = ""
    if node.op == "placeholder":
        target = node.target if node.target != node.name else ""
    elif node.op == "get_attr":
        target = node.target
    elif node.op == "call_module":
        module = fetch_attr(root, node.target, None)
        if isinstance(module, nn.Module):
            target = f"{node.target}:{describe_module(module)}"
            params = _module_tensors(module)
        else:
            target = f"{node.target}:?"
    elif node.op == "call_function":
        target = function_name(node.target)
    elif node.op == "call_method":
        target = f"Tensor.{node.target}"
    line = f"{node.op:<{_OP_WIDTH}} %{node.name}"
    if target:
        line += f" = {target}"
    if node.op == "placeholder":
        pieces = [f"default={format_arg(args[0])}"] if args else []
    else:
        pieces = [format_arg(a) for a in args]
    pieces += [f"{k}={format_arg(v)}" for k, v in sorted(node.kwargs.items())]
    if pieces or node.op not in ("placeholder", "get_attr"):
        line += f" ({', '.join(pieces)})"
    if params:
        line += f" {params}"
    meta = _output_meta(node)
    if meta is None and node.op == "get_attr":
        attr = fetch_attr(root, node.target, None)
        meta = attr if isinstance(attr, torch.Tensor) else None
    if meta is not None:
        line += f" -> {_format_meta(meta)}"
    return line


def as_fx_graph(obj: Any) -> Graph | None:
    """The ``torch.fx.Graph`` of a GraphModule or Graph, else None."""
    if isinstance(obj, GraphModule):
        return obj.graph
    if isinstance(obj, Graph):
        return obj
    return None


def fx_to_text(graph: GraphModule | Graph) -> str:
    """Canonical text of an FX graph (see the module docstring)."""
    fx_graph = as_fx_graph(graph)
    root = graph if isinstance(graph, GraphModule) else fx_graph.owning_module
    lines = [f"# fxg {FORMAT_VERSION} fx"] + [_fx_line(node, root) for node in fx_graph.nodes]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- ONNX

def as_onnx_model(obj: Any) -> "onnx.ModelProto | None":
    """An ``onnx.ModelProto`` for a ModelProto, GraphProto or onnx-graphsurgeon Graph, else None.

    A graphsurgeon graph is exported from a copy so the caller's graph is never touched.
    """
    module = type(obj).__module__ or ""
    if module.startswith("onnx_graphsurgeon"):
        import onnx_graphsurgeon as gs

        if isinstance(obj, gs.Graph):
            return gs.export_onnx(obj.copy(), do_type_check=False)
        return None
    if not module.startswith("onnx"):
        return None
    import onnx

    if isinstance(obj, onnx.ModelProto):
        return obj
    if isinstance(obj, onnx.GraphProto):
        model = onnx.ModelProto()
        model.graph.CopyFrom(obj)
        return model
    return None


def _inferred(model: "onnx.ModelProto") -> "onnx.ModelProto":
    try:
        return infer_shapes(model)
    except Exception:
        return without_weights(model)


def _onnx_type(type_proto: Any) -> str:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" or kind == "sparse_tensor_type":
        tensor = getattr(type_proto, kind)
        dtype = short_dtype(tensor.elem_type) if tensor.elem_type else "?"
        if not tensor.HasField("shape"):
            return f"{dtype}[*]"
        dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tensor.shape.dim]
        return f"{dtype}[{','.join(dims)}]" + ("{sparse}" if kind == "sparse_tensor_type" else "")
    if kind == "sequence_type":
        return f"seq<{_onnx_type(type_proto.sequence_type.elem_type)}>"
    if kind == "optional_type":
        return f"optional<{_onnx_type(type_proto.optional_type.elem_type)}>"
    if kind == "map_type":
        key, value = type_proto.map_type.key_type, type_proto.map_type.value_type
        return f"map<{short_dtype(key)},{_onnx_type(value)}>"
    return "?"


def _onnx_tensor(tensor: Any) -> str:
    """``f32[16,3,3,3]``; small int64 tensors (shapes, axes) also show their values."""
    import onnx

    text = f"{short_dtype(tensor.data_type)}{_shape(tensor.dims)}"
    size = math.prod(tensor.dims)
    if tensor.data_type == onnx.TensorProto.INT64 and size <= _MAX_INT_VALUES_SHOWN \
            and tensor.data_location != onnx.TensorProto.EXTERNAL:
        values = onnx.numpy_helper.to_array(tensor).reshape(-1).tolist()
        text += "=" + ("[" + ",".join(str(v) for v in values) + "]" if tensor.dims else str(values[0]))
    return text


def _float32(value: float) -> str:
    import numpy as np

    return str(np.float32(value)) if math.isfinite(value) else repr(float(value))


def _onnx_attr(attr: Any, subgraphs: list[tuple[str, Any]]) -> str:
    import onnx

    if attr.ref_attr_name:
        return f"@{attr.ref_attr_name}"
    t = onnx.AttributeProto
    kind = attr.type
    if kind == t.FLOAT:
        return _float32(attr.f)
    if kind == t.INT:
        return str(attr.i)
    if kind == t.STRING:
        return repr(attr.s.decode("utf-8", "replace"))
    if kind == t.TENSOR:
        return _onnx_tensor(attr.t)
    if kind == t.GRAPH:
        subgraphs.append((attr.name, attr.g))
        return f"<graph {len(attr.g.node)} nodes>"
    if kind == t.FLOATS:
        return "[" + ",".join(_float32(v) for v in attr.floats) + "]"
    if kind == t.INTS:
        return "[" + ",".join(str(v) for v in attr.ints) + "]"
    if kind == t.STRINGS:
        return "[" + ",".join(repr(v.decode("utf-8", "replace")) for v in attr.strings) + "]"
    if kind == t.TENSORS:
        return "[" + ",".join(_onnx_tensor(v) for v in attr.tensors) + "]"
    if kind == t.GRAPHS:
        for g in attr.graphs:
            subgraphs.append((attr.name, g))
        return "[" + ",".join(f"<graph {len(g.node)} nodes>" for g in attr.graphs) + "]"
    if kind == t.TYPE_PROTO:
        return _onnx_type(attr.tp)
    return t.AttributeType.Name(kind).lower()


def onnx_op_name(node: Any) -> str:
    """``Conv``, or ``com.microsoft.QuickGelu`` for a node outside the default domain."""
    return f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def iter_onnx_nodes(graph: Any) -> Iterator[Any]:
    """Every node of an ONNX GraphProto, including those of subgraphs (If/Loop/Scan bodies)."""
    return iter(iter_nodes(graph))


def _onnx_graph_lines(graph: Any, types: dict[str, str], indent: str, lines: list[str]) -> None:
    initializers = {t.name: t for t in graph.initializer}
    for t in graph.sparse_initializer:
        initializers[t.values.name] = t.values
    values = (*graph.input, *graph.output, *graph.value_info)
    types = {**types, **{v.name: _onnx_type(v.type) for v in values}}
    used: set[str] = set()
    for value in graph.input:
        if value.name not in initializers:
            lines.append(f"{indent}input %{value.name} : {types[value.name]}")
    for index, node in enumerate(graph.node):
        ins = []
        for name in node.input:
            used.add(name)
            if not name:
                ins.append("_")
            elif name in initializers:
                ins.append(f"%{name}:{_onnx_tensor(initializers[name])}")
            else:
                ins.append(f"%{name}")
        subgraphs: list[tuple[str, Any]] = []
        attrs = sorted(f"{a.name}={_onnx_attr(a, subgraphs)}" for a in node.attribute)
        outs = ", ".join(f"%{o} : {types.get(o, '?')}" if o else "_" for o in node.output)
        line = f"{indent}{node.name or f'_n{index}'} = {onnx_op_name(node)}({', '.join(ins)})"
        if attrs:
            line += " {" + ", ".join(attrs) + "}"
        lines.append(f"{line} -> {outs}")
        for attr_name, sub in sorted(subgraphs, key=lambda s: s[0]):
            lines.append(f"{indent}  {attr_name}:")
            _onnx_graph_lines(sub, types, indent + "    ", lines)
    for value in graph.output:
        lines.append(f"{indent}output %{value.name} : {types[value.name]}")
    graph_inputs = {v.name for v in graph.input}
    for name in sorted(set(initializers) - used - graph_inputs - {v.name for v in graph.output}):
        lines.append(f"{indent}unused %{name}:{_onnx_tensor(initializers[name])}")


def onnx_to_text(model: Any) -> str:
    """Canonical text of an ONNX model, GraphProto or graphsurgeon Graph (see the module docstring)."""
    proto = as_onnx_model(model)
    if proto is None:
        raise InputError(f"expected an onnx.ModelProto or onnx_graphsurgeon.Graph, got {type(model).__name__}")
    proto = _inferred(proto)
    lines = [f"# fxg {FORMAT_VERSION} onnx"]
    if proto.opset_import:
        opsets = sorted(f"{o.domain or 'ai.onnx'}={o.version}" for o in proto.opset_import)
        lines.append("# opset " + " ".join(opsets))
    _onnx_graph_lines(proto.graph, {}, "", lines)
    for function in sorted(proto.functions, key=lambda f: (f.domain, f.name, getattr(f, "overload", ""))):
        lines.append(f"# function {function.domain}.{function.name}({', '.join(function.input)}) -> "
                     f"({', '.join(function.output)})")
        for index, node in enumerate(function.node):
            subgraphs: list[tuple[str, Any]] = []
            attrs = sorted(f"{a.name}={_onnx_attr(a, subgraphs)}" for a in node.attribute)
            line = (f"  {node.name or f'_n{index}'} = {onnx_op_name(node)}("
                    f"{', '.join(f'%{i}' if i else '_' for i in node.input)})")
            if attrs:
                line += " {" + ", ".join(attrs) + "}"
            lines.append(f"{line} -> {', '.join(f'%{o}' for o in node.output)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- public

def to_text(graph: Any) -> str:
    """Canonical ``.fxg`` text of a GraphModule / fx Graph, an ONNX ModelProto or a graphsurgeon Graph."""
    if as_fx_graph(graph) is not None:
        return fx_to_text(graph)
    if as_onnx_model(graph) is not None:
        return onnx_to_text(graph)
    raise InputError(f"to_text needs a torch.fx GraphModule/Graph, an onnx.ModelProto or an "
                    f"onnx_graphsurgeon Graph, got {type(graph).__name__}; trace nn.Modules first "
                    f"(fxcompress.trace.trace)")


def diff(a: str, b: str, a_name: str = "before", b_name: str = "after") -> str:
    """Unified diff of two graph texts; ``""`` when they are equal."""
    if a == b:
        return ""
    lines = difflib.unified_diff(a.splitlines(), b.splitlines(), fromfile=a_name, tofile=b_name, lineterm="")
    return "\n".join(lines) + "\n"


def write_fxg(path: str | Path, text: str) -> Path:
    """Write graph text as utf-8 with exactly one trailing newline (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8", newline="\n")
    return path


def read_fxg(path: str | Path) -> str:
    """Read graph text written by ``write_fxg`` (normalised to one trailing newline)."""
    return Path(path).read_text(encoding="utf-8").rstrip("\n") + "\n"


def _meta_shape_dtype(meta: Any) -> tuple[Any, Any]:
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(int(d) if isinstance(d, int) else str(d) for d in meta.shape), short_dtype(meta.dtype)
    if isinstance(meta, (tuple, list)) and not hasattr(meta, "_fields"):
        pairs = [_meta_shape_dtype(m) for m in meta]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return None, None


def to_networkx(graph: Any) -> "networkx.DiGraph":
    """A ``networkx.DiGraph`` of the graph: nodes keyed by node name with attributes ``op``,
    ``target`` (str), ``kind``, ``shape`` and ``dtype`` (tuples of them for tuple outputs; None
    when unknown); an edge from every input node to its user. For ONNX: nodes are ONNX nodes,
    ``op`` is the op type and edges follow tensors (edge attribute ``tensors``)."""
    import networkx as nx

    g = nx.DiGraph()
    fx_graph = as_fx_graph(graph)
    if fx_graph is not None:
        for node in fx_graph.nodes:
            shape, dtype = _meta_shape_dtype(_output_meta(node))
            target = function_name(node.target) if node.op == "call_function" else str(node.target)
            g.add_node(node.name, op=node.op, target=target, kind=fx_node_kinds(node)[0],
                       shape=shape, dtype=dtype)
            for source in node.all_input_nodes:
                g.add_edge(source.name, node.name)
        return g
    model = as_onnx_model(graph)
    if model is None:
        raise InputError(f"to_networkx needs an FX or ONNX graph, got {type(graph).__name__}")
    model = _inferred(model)
    info = {v.name: v.type for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)}
    producers: dict[str, str] = {}
    names = []
    for index, node in enumerate(model.graph.node):
        name = node.name or f"_n{index}"
        names.append(name)
        first = node.output[0] if node.output else ""
        shape = dtype = None
        if first in info and info[first].WhichOneof("value") == "tensor_type":
            tensor = info[first].tensor_type
            dtype = short_dtype(tensor.elem_type) if tensor.elem_type else None
            if tensor.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in tensor.shape.dim)
        g.add_node(name, op=node.op_type, target=onnx_op_name(node), kind=node.op_type,
                   shape=shape, dtype=dtype)
        for output in node.output:
            if output:
                producers[output] = name
    for name, node in zip(names, model.graph.node):
        for tensor in node.input:
            source = producers.get(tensor)
            if source is None:
                continue
            if g.has_edge(source, name):
                g.edges[source, name]["tensors"].append(tensor)
            else:
                g.add_edge(source, name, tensors=[tensor])
    return g
