"""What an ONNX graph holds, as a backend or a compatibility check needs it: constant tensors (through
constant-only chains), graph inputs and their dims, Q/DQ types, the graph's precision traits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

_TP = onnx.TensorProto
_QUANT_TYPES = {_TP.INT8: "INT8", _TP.UINT8: "UINT8", _TP.INT4: "INT4", _TP.UINT4: "UINT4",
                _TP.INT16: "INT16", _TP.UINT16: "UINT16", _TP.INT32: "INT32", _TP.FLOAT8E4M3FN: "FP8",
                _TP.FLOAT8E5M2: "FP8E5M2", _TP.FLOAT4E2M1: "FP4"}


_FOLDABLE = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze")
_FOLD_LIMIT = 1 << 20


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Build-time constants of the main graph, by tensor name: initializers, ``Constant`` outputs, and
    small Cast/Identity/Reshape/Squeeze/Unsqueeze chains of them (TensorRT folds those too)."""
    from onnx import numpy_helper

    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
            continue
        if node.op_type not in _FOLDABLE or not node.input or not all(i in out for i in node.input if i):
            continue
        src = out[node.input[0]]
        if int(np.prod(src.dims, dtype=np.int64)) > _FOLD_LIMIT:
            continue
        value = numpy_helper.to_array(src)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            if node.op_type == "Cast":
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
            elif node.op_type == "Reshape":
                shape = [int(d) for d in numpy_helper.to_array(out[node.input[1]])]
                shape = [value.shape[i] if d == 0 else d for i, d in enumerate(shape)]
                value = value.reshape(shape)
            elif node.op_type in ("Squeeze", "Unsqueeze"):
                axes = attrs.get("axes")
                if axes is None and len(node.input) > 1 and node.input[1]:
                    axes = [int(a) for a in numpy_helper.to_array(out[node.input[1]])]
                if node.op_type == "Squeeze":
                    value = np.squeeze(value, axis=tuple(axes) if axes is not None else None)
                else:
                    value = np.expand_dims(value, axis=tuple(axes))
        except (KeyError, ValueError, TypeError):
            continue
        out[node.output[0]] = numpy_helper.from_array(np.asarray(value), node.output[0])
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (old IRs also list initializers as inputs)."""
    init = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in init]


def input_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a graph input: an int when static, the ``dim_param`` name or None when dynamic."""
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def qdq_type(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> str:
    """The quantized type of a QuantizeLinear/DequantizeLinear node ("INT8", "UINT8", "INT32", ...)."""
    if node.op_type == "DequantizeLinear" and node.input[0] in constants:
        return _QUANT_TYPES.get(constants[node.input[0]].data_type, "OTHER")
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] in constants:
            return _QUANT_TYPES.get(constants[node.input[2]].data_type, "OTHER")
        return "UNKNOWN"
    if node.op_type == "QuantizeLinear":
        for attr in node.attribute:
            if attr.name == "output_dtype" and attr.i:
                return _QUANT_TYPES.get(attr.i, "OTHER")
        return "UINT8"  # ONNX: y_zero_point omitted -> uint8 output
    return "UNKNOWN"


@dataclass(frozen=True)
class GraphTraits:
    """What the build needs to know about a graph before configuring the builder."""

    qdq_types: frozenset[str] = frozenset()
    float16: bool = False
    dynamic_inputs: tuple[str, ...] = ()

    @property
    def has_int8_qdq(self) -> bool:
        return "INT8" in self.qdq_types

    @property
    def has_qdq(self) -> bool:
        return bool(self.qdq_types)


def graph_traits(model: onnx.ModelProto) -> GraphTraits:
    """Q/DQ types, float16 use and dynamic inputs of ``model``."""
    constants = constant_tensors(model)
    qdq = frozenset(qdq_type(n, constants) for n in model.graph.node
                    if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    fp16 = onnx.TensorProto.FLOAT16
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    float16 = (any(v.type.tensor_type.elem_type == fp16 for v in values)
               or any(t.data_type == fp16 for t in constants.values())
               or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
                      for n in model.graph.node))
    dynamic = tuple(v.name for v in graph_inputs(model) if any(not isinstance(d, int) for d in input_dims(v)))
    return GraphTraits(qdq, float16, dynamic)
