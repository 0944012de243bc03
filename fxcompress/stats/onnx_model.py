"""Statistics of an ONNX model: initializers owned by nodes, MACs by op type, shapes through shape arithmetic."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from ..errors import InputError
from ..onnx_graph import without_weights
from .result import GraphStats, LayerStats, _owner, _shape_str, _Tally


def _onnx_dtype_table() -> dict[int, tuple[str, float]]:
    T = TensorProto
    table = {
        T.FLOAT: ("float32", 4), T.DOUBLE: ("float64", 8), T.FLOAT16: ("float16", 2),
        T.BFLOAT16: ("bfloat16", 2), T.INT8: ("int8", 1), T.UINT8: ("uint8", 1), T.INT16: ("int16", 2),
        T.UINT16: ("uint16", 2), T.INT32: ("int32", 4), T.UINT32: ("uint32", 4), T.INT64: ("int64", 8),
        T.UINT64: ("uint64", 8), T.BOOL: ("bool", 1), T.COMPLEX64: ("complex64", 8),
        T.COMPLEX128: ("complex128", 16),
    }
    for attr, name, size in (("FLOAT8E4M3FN", "float8_e4m3fn", 1), ("FLOAT8E4M3FNUZ", "float8_e4m3fnuz", 1),
                             ("FLOAT8E5M2", "float8_e5m2", 1), ("FLOAT8E5M2FNUZ", "float8_e5m2fnuz", 1),
                             ("INT4", "int4", 0.5), ("UINT4", "uint4", 0.5),
                             ("FLOAT4E2M1", "float4_e2m1", 0.5)):
        if hasattr(T, attr):
            table[getattr(T, attr)] = (name, size)
    return table


#: inputs of MAC ops that carry weights (a 1-element tensor there still counts as a param)
_ONNX_WEIGHT_SLOTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}), "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}), "ConvInteger": frozenset({1}), "MatMulInteger": frozenset({0, 1}),
    "QLinearConv": frozenset({3, 8}), "QLinearMatMul": frozenset({0, 3}),
    "LSTM": frozenset({1, 2, 3}), "GRU": frozenset({1, 2, 3}), "RNN": frozenset({1, 2, 3}),
}
#: inputs that hold state, not weights (bytes, never params): quantization scales / zero points,
#: BatchNorm running statistics, recurrent initial states
_ONNX_STATE_SLOTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}), "DequantizeLinear": frozenset({1, 2}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}), "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "ConvInteger": frozenset({2, 3}), "MatMulInteger": frozenset({2, 3}),
    "LSTM": frozenset({4, 5, 6}), "GRU": frozenset({4, 5}), "RNN": frozenset({4, 5}),
    "BatchNormalization": frozenset({3, 4}),
}
#: ops that broadcast their input 0: an all-zero tensor there is a fill value (e.g. an LSTM's h0)
_ONNX_FILL_OPS = frozenset({"Expand", "Tile"})

_Shape = Callable[[str], "tuple[int, ...] | None"]


def _onnx_conv(n: Any, sh: _Shape, w: int = 1) -> int | None:
    out, weight = sh(n.output[0]), sh(n.input[w])
    return None if out is None or weight is None else math.prod(out) * math.prod(weight[1:])


def _onnx_conv_transpose(n: Any, sh: _Shape) -> int | None:
    x, weight = sh(n.input[0]), sh(n.input[1])
    return None if x is None or weight is None else math.prod(x) * math.prod(weight[1:])


def _onnx_matmul(n: Any, sh: _Shape, a: int = 0) -> int | None:
    out, left = sh(n.output[0]), sh(n.input[a])
    return None if out is None or left is None or not left else math.prod(out) * left[-1]


def _onnx_gemm(n: Any, sh: _Shape) -> int | None:
    out, left = sh(n.output[0]), sh(n.input[0])
    if out is None or left is None or len(left) != 2:
        return None
    trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
    return math.prod(out) * (left[0] if trans_a else left[1])


def _onnx_rnn(n: Any, sh: _Shape) -> int | None:
    x, w, r = sh(n.input[0]), sh(n.input[1]), sh(n.input[2])
    if x is None or w is None or r is None or len(x) < 2:
        return None
    return x[0] * x[1] * (math.prod(w) + math.prod(r))


_ONNX_MAC_RULES: dict[str, Callable[[Any, _Shape], int | None]] = {
    "Conv": _onnx_conv, "ConvInteger": _onnx_conv, "QLinearConv": lambda n, sh: _onnx_conv(n, sh, 3),
    "ConvTranspose": _onnx_conv_transpose, "Gemm": _onnx_gemm,
    "MatMul": _onnx_matmul, "MatMulInteger": _onnx_matmul, "QLinearMatMul": _onnx_matmul,
    "LSTM": _onnx_rnn, "GRU": _onnx_rnn, "RNN": _onnx_rnn,
}


def _onnx_values(tensor: Any) -> tuple[int, int]:
    """(numel, nonzero) of a TensorProto; nonzero = numel when the data is not loaded (external)."""
    numel = math.prod(tensor.dims)
    if tensor.data_location == TensorProto.EXTERNAL:
        return numel, numel
    try:
        return numel, int(np.count_nonzero(numpy_helper.to_array(tensor)))
    except Exception:  # exotic dtypes numpy cannot compare
        return numel, numel


def _pin_input_shapes(model: onnx.ModelProto, input_shapes: Sequence[Sequence[int]]) -> onnx.ModelProto:
    pinned = type(model)()
    pinned.CopyFrom(model)
    initializers = {t.name for t in pinned.graph.initializer}
    inputs = [i for i in pinned.graph.input if i.name not in initializers]
    for info, shape in zip(inputs, input_shapes):
        dims = info.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape):
            dim.ClearField("dim_param")
            dim.dim_value = int(size)
    return pinned


#: ops evaluated on shape values (``Shape`` of a static tensor and arithmetic on the result)
_SHAPE_OPS = {"Shape", "Gather", "Div", "Mul", "Add", "Sub", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast",
              "Constant", "Range", "Equal", "Where", "ReduceProd", "Identity"}
_SHAPE_VALUE_LIMIT = 64


def _shapes_through_shape_arithmetic(inferred: onnx.ModelProto) -> onnx.ModelProto:
    """``inferred`` shape-inferred again with every small value computed from ``Shape`` of a
    statically shaped tensor made a constant, so a ``Slice``/``Reshape`` whose bounds the
    TorchScript exporter computes at run time (``x.chunk(2, dim=1)`` after a ``view(b, -1, h, w)``)
    gets its output shape. Used for shapes only: the statistics still read the model as it is."""
    graph = inferred.graph
    static: dict[str, tuple[int, ...]] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            static[info.name] = tuple(d.dim_value for d in dims)
    values: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer
                                     if math.prod(t.dims) <= _SHAPE_VALUE_LIMIT}
    folded: list[str] = []
    for node in graph.node:
        if node.op_type not in _SHAPE_OPS or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        names = [n for n in node.input if n]
        if node.op_type == "Shape":
            if names[0] not in static:
                continue
            feeds = {names[0]: np.zeros(static[names[0]], dtype=np.float32)}
        elif all(n in values for n in names):
            feeds = {n: values[n] for n in names}
        else:
            continue
        try:
            single = onnx.helper.make_model(
                onnx.helper.make_graph([node], "shape", [onnx.helper.make_tensor_value_info(n, 0, None)
                                                          for n in feeds], [onnx.helper.make_tensor_value_info(
                                                              node.output[0], 0, None)]),
                opset_imports=inferred.opset_import)
            (out,) = ReferenceEvaluator(single).run(None, feeds)
        except Exception:  # noqa: BLE001 - best effort: a value not computed leaves the shape unknown
            continue
        if np.asarray(out).size <= _SHAPE_VALUE_LIMIT:
            values[node.output[0]] = np.asarray(out)
            folded.append(node.output[0])
    if not folded:
        return inferred
    constant = type(inferred)()
    constant.CopyFrom(inferred)
    keep = [n for n in constant.graph.node if not (len(n.output) == 1 and n.output[0] in set(folded))]
    del constant.graph.node[:]
    constant.graph.node.extend(keep)
    constant.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in folded)
    try:
        return onnx.shape_inference.infer_shapes(constant)
    except Exception:  # noqa: BLE001 - fall back to the first inference
        return inferred


def onnx_stats(model: onnx.ModelProto | str | os.PathLike[str],
               input_shapes: Sequence[Sequence[int]] | None = None) -> GraphStats:
    """Statistics of an ONNX model: initializers and Constant tensors with their real dtype sizes.

    Shapes come from ``onnx.shape_inference.infer_shapes`` (on a copy; the model is not changed);
    ``input_shapes`` (one per graph input, in order) pins dynamic input dimensions, so MACs match
    the FX graph's on the same example inputs; dynamic dimensions left count as 1. A MAC op whose
    shapes cannot be inferred gets ``macs_known=False``. Layers are keyed by node name
    (``<op_type>_<index>`` when unnamed).
    """
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"onnx_stats takes an onnx.ModelProto or a path, got {type(model).__name__}")
    graph = model.graph
    index = _OnnxIndex.of(graph)
    shapes = {**_inferred_shapes(model, input_shapes), **{n: tuple(t.dims) for n, t in index.stored.items()}}
    tally, dtypes = _Tally(), _onnx_dtype_table()
    for init in graph.initializer:
        _add_stored(tally, index, init.name, dtypes)
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.output and node.output[0] in index.stored:
            _add_stored(tally, index, node.output[0], dtypes)
        rule = _ONNX_MAC_RULES.get(node.op_type)
        if rule is None:
            continue
        layer = index.layer_of(tally, i)
        macs = rule(node, shapes.get)
        if macs is None:
            layer.macs_known = False
        else:
            layer.macs += macs
        layer.shape = layer.shape or _shape_str(shapes.get(node.output[0]))
    # layers in graph order, stored-only layers after the nodes' own
    order = {name: i for i, name in enumerate(index.names)}
    tally.layers = dict(sorted(tally.layers.items(), key=lambda kv: order.get(kv[0], len(order))))
    return tally.finish()


def _inferred_shapes(model: onnx.ModelProto, input_shapes: Sequence[Sequence[int]] | None
                     ) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape by ONNX shape inference on a weightless copy (dynamic dimensions: 1)."""
    lean = without_weights(model)
    if input_shapes is not None:
        lean = _pin_input_shapes(lean, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(lean)
    except Exception:  # inference is best effort; value_info already in the model still helps
        inferred = lean
    shapes: dict[str, tuple[int, ...]] = {}
    for info in (*inferred.graph.input, *_shapes_through_shape_arithmetic(inferred).graph.value_info,
                 *inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else 1
                                      for d in tensor_type.shape.dim)
    return shapes


@dataclass
class _OnnxIndex:
    """An ONNX graph's stored tensors (initializers, Constant values), who produces and reads each
    tensor, and which nodes compute only from constants."""

    graph: Any
    stored: dict[str, Any]
    names: list[str]
    consumers: dict[str, list[tuple[int, int]]]
    producer: dict[str, int]
    const_nodes: set[int]

    @classmethod
    def of(cls, graph: Any) -> "_OnnxIndex":
        stored: dict[str, Any] = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        stored[node.output[0]] = attr.t
        names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
        consumers: dict[str, list[tuple[int, int]]] = {}
        producer: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for slot, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((i, slot))
            for name in node.output:
                producer[name] = i
        const_nodes: set[int] = set()
        for i, node in enumerate(graph.node):
            inputs = [name for name in node.input if name]
            if node.op_type == "Constant" or (inputs and all(
                    name in stored or producer.get(name) in const_nodes for name in inputs)):
                const_nodes.add(i)
        return cls(graph, stored, names, consumers, producer, const_nodes)

    def users(self, item: Any) -> list[int]:
        """Nodes reading the tensor ``item`` (a name), or any output of node ``item`` (an index)."""
        if isinstance(item, str):
            return [i for i, _ in self.consumers.get(item, ())]
        return [i for out in self.graph.node[item].output for i, _ in self.consumers.get(out, ())]

    def is_mac(self, i: int) -> bool:
        return self.graph.node[i].op_type in _ONNX_MAC_RULES

    def layer_of(self, tally: _Tally, i: int) -> LayerStats:
        return tally.layer(self.names[i], self.graph.node[i].op_type)

    def is_param(self, name: str, tensor: Any, nonzero: int) -> bool:
        """Whether a stored tensor is a parameter, not an index, shape, fill value or running state."""
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
                                onnx.TensorProto.STRING):
            return False
        uses = [(self.graph.node[i].op_type, slot) for i, slot in self.consumers.get(name, ())]
        if uses and all(slot in _ONNX_STATE_SLOTS.get(op, ()) for op, slot in uses):
            return False
        if uses and nonzero == 0 and all(op in _ONNX_FILL_OPS and slot == 0 for op, slot in uses):
            return False
        if math.prod(tensor.dims) > 1:
            return True
        return any(slot in _ONNX_WEIGHT_SLOTS.get(op, ()) for op, slot in uses)


def _add_stored(tally: _Tally, index: _OnnxIndex, name: str, dtypes: dict[int, tuple[str, float]]) -> None:
    """Count the stored tensor ``name`` in the layer that owns it (its MAC op, else its first reader)."""
    tensor = index.stored[name]
    mac, other = _owner(name, index.users, index.is_mac, index.const_nodes.__contains__)
    if mac is not None or other is not None:
        layer = index.layer_of(tally, mac if mac is not None else other)
    else:
        layer = tally.layer(name, "Constant" if name in index.producer else "initializer")
        layer.shape = layer.shape or _shape_str(tuple(tensor.dims))
    dtype, size = dtypes.get(tensor.data_type, (f"onnx_dtype_{tensor.data_type}", 1))
    numel, nonzero = _onnx_values(tensor)
    param = index.is_param(name, tensor, nonzero)
    tally.add_tensor(layer, ("onnx", name), numel=numel, nonzero=nonzero if param else 0,
                     nbytes=math.ceil(numel * size), dtype=dtype, is_param=param)
