"""Small ONNX helpers shared by the exporter, the pipeline and the ONNX passes.

* ``to_graph`` / ``to_model``: ``onnx.ModelProto`` <-> ``onnx_graphsurgeon.Graph`` (the form
  ONNX passes work on), keeping the IR version, opsets and the FX-node provenance of every node.
* ``load_model``: a model given as a proto, serialized bytes or a path.
* ``without_weights`` / ``infer_shapes`` / ``check_model``: shape inference and the checker on a copy
  without the initializers' values, so neither copies a large model's weights (twice, through
  serialization) nor meets protobuf's 2 GB limit.
* ``fx_node_of`` / ``fx_node_outputs`` / ``expose_outputs``: map ONNX nodes and tensors back to the
  FX node they were exported from, and make intermediate tensors observable (per-layer ``compare``).

Provenance scheme: ``export_onnx`` traces every FX node inside its own TorchScript scope named
after the node, so the exporter names each ONNX node ``/<fx_node>/<module path...>/<Op>[_k]``
(for example ``/layer1_0_conv1/conv1/Conv`` or ``/add_3/Add``). Nodes the exporter creates
outside any FX node (graph-level Constants, output Identities) have a single-component name
(``/Constant_3``, ``Identity_0``). The FX node is also stored in each node's
``metadata_props["fx_node"]``. onnx-graphsurgeon drops ``metadata_props``, but keeps node names,
so ``fx_node_of`` falls back to the name and ``to_model`` writes the metadata again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import onnx

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

FX_NODE_KEY = "fx_node"

ModelLike = Union[onnx.ModelProto, bytes, str, Path]


# ----------------------------------------------------------------------------- provenance


def fx_node_from_name(name: str) -> str | None:
    """The FX node encoded in an exported ONNX node name ``/<fx_node>/.../<Op>``, else None."""
    if not name.startswith("/"):
        return None
    parts = name.split("/")
    if len(parts) < 3 or not parts[1]:
        return None
    return parts[1]


def fx_node_of(node: Any) -> str | None:
    """The name of the FX node an ONNX node (``onnx.NodeProto`` or ``gs.Node``) was exported
    from, or None for nodes the exporter or a later pass created on its own."""
    for prop in getattr(node, "metadata_props", ()) or ():
        if prop.key == FX_NODE_KEY:
            return prop.value or None
    return fx_node_from_name(getattr(node, "name", "") or "")


def stamp_fx_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Write ``metadata_props["fx_node"]`` on every node whose name carries an FX node; in place."""
    for node in iter_nodes(model.graph):
        fx = fx_node_from_name(node.name)
        existing = [p for p in node.metadata_props if p.key == FX_NODE_KEY]
        if fx is None or existing:
            continue
        prop = node.metadata_props.add()
        prop.key, prop.value = FX_NODE_KEY, fx
    return model


def iter_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    """Every node of an ONNX GraphProto, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def fx_node_outputs(model: "onnx.ModelProto | gs.Graph") -> dict[str, list[str]]:
    """For each FX node that produced ONNX nodes, the ONNX tensors that carry its result.

    A tensor is an FX node's result when a node of that FX node produces it and it is a graph
    output or is read by a node of another FX node (or by an unscoped node). FX nodes that
    export to nothing (``getitem``, eval-mode dropout, ``contiguous``...) are absent. Outputs of
    ``Constant`` nodes are never results. Order: production order in the graph.
    """
    nodes: list[tuple[str | None, str, list[str], list[str]]] = []
    if isinstance(model, onnx.ModelProto):
        graph_outputs = {o.name for o in model.graph.output}
        for n in model.graph.node:
            nodes.append((fx_node_of(n), n.op_type, list(n.input), list(n.output)))
    else:
        graph_outputs = {t.name for t in model.outputs}
        for n in model.nodes:
            nodes.append((fx_node_of(n), n.op, [t.name for t in n.inputs], [t.name for t in n.outputs]))
    consumers: dict[str, set[str | None]] = {}
    for fx, _, inputs, _ in nodes:
        for name in inputs:
            consumers.setdefault(name, set()).add(fx)
    result: dict[str, list[str]] = {}
    for fx, op, _, outputs in nodes:
        if fx is None or op == "Constant":
            continue
        for name in outputs:
            if not name:
                continue
            readers = consumers.get(name, set())
            if name in graph_outputs or any(r != fx for r in readers):
                result.setdefault(fx, []).append(name)
    return result


def expose_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the intermediate tensors ``names``
    (type and shape from shape inference when known), after the original outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=False)
        infos = {v.name: v for v in inferred.graph.value_info}
    except Exception:  # shape inference is optional here: untyped outputs still run in ORT
        infos = {}
    infos.update({v.name: v for v in out.graph.value_info})
    present = {o.name for o in out.graph.output}
    produced = {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    produced |= {i.name for i in out.graph.initializer}
    for name in names:
        if name in present:
            continue
        if name not in produced:
            raise InputError(f"expose_outputs: no tensor named {name!r} in the ONNX graph")
        vi = out.graph.output.add()
        if name in infos:
            vi.CopyFrom(infos[name])
        else:
            vi.name = name
        present.add(name)
    return out


# ----------------------------------------------------------------------------- without the weights

#: initializers of up to this many elements keep their values in ``without_weights`` (shape
#: arithmetic and the canonical text read small integer tensors)
KEEP_VALUES_UP_TO = 1024


def without_weights(model: onnx.ModelProto, as_inputs: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers of more than ``KEEP_VALUES_UP_TO`` elements keep
    name, dtype and shape but no values (``as_inputs``: become typed graph inputs instead, which the
    checker accepts). Shape inference gives the same shapes on it as on ``model``."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    listed = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if math.prod(init.dims) <= KEEP_VALUES_UP_TO:
            out.graph.initializer.add().CopyFrom(init)
        elif as_inputs:
            if init.name not in listed:
                out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            out.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
    return out


def _copy_field(message: Any, fd: Any, value: Any) -> None:
    if fd.is_repeated:
        getattr(message, fd.name).extend(value)
    elif fd.message_type is not None:
        getattr(message, fd.name).CopyFrom(value)
    else:
        setattr(message, fd.name, value)


def infer_shapes(model: onnx.ModelProto, **options: Any) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model, **options)`` run on ``without_weights(model)``:
    the result has the shapes, not the large initializers' values."""
    return onnx.shape_inference.infer_shapes(without_weights(model), **options)


def infer_shapes_into(model: onnx.ModelProto, **options: Any) -> onnx.ModelProto:
    """``model`` with what ``onnx.shape_inference.infer_shapes`` adds (value_info, output and
    subgraph types) written into it, in place; returns it."""
    inferred = infer_shapes(model, **options)
    for name in ("node", "value_info", "output"):
        field = getattr(model.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return model


#: a model whose serialized size would exceed this is saved with its initializers in an external data
#: file and given to ONNX Runtime without serializing them (protobuf's 2 GiB, minus room for the graph)
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' values, from their shapes and dtypes (nothing is serialized)."""
    sizes = {t: onnx.helper.tensor_dtype_to_np_dtype(t).itemsize for t in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.BOOL)}
    return sum(math.prod(t.dims) * sizes.get(t.data_type, 4) for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weights are too large for one protobuf message (``EXTERNAL_DATA_THRESHOLD``)."""
    return initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).tobytes()


def with_external_data(model: onnx.ModelProto, location: str, write: Any = None) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over ``KEEP_VALUES_UP_TO`` elements refer to
    ``location`` (ONNX external data: offset and length, 64-byte aligned) instead of holding their
    values; ``write(bytes)`` is called with the data file's content in order, one tensor at a time."""
    out = without_weights(model)
    offset = 0
    for lean, init in zip(out.graph.initializer, model.graph.initializer):
        if math.prod(init.dims) <= KEEP_VALUES_UP_TO:
            continue
        data = _raw_bytes(init)
        pad = -offset % 64
        if write is not None:
            write(b"\0" * pad)
            write(data)
        offset += pad
        lean.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            lean.external_data.add(key=key, value=value)
        offset += len(data)
    return out


def load_external_data(model: onnx.ModelProto, data: Any) -> onnx.ModelProto:
    """Fill, in place, every initializer of ``model`` stored externally from ``data`` (the bytes of
    its one data file, already verified); returns ``model``."""
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in init.external_data}
        start = int(where.get("offset", 0))
        end = start + int(where["length"]) if "length" in where else len(data)
        if end > len(data):
            raise InputError(f"initializer {init.name!r} refers to bytes {start}..{end} of a {len(data)}-byte data file")
        init.raw_data = bytes(data[start:end])
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
    return model


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on ``without_weights(model, as_inputs=True)``."""
    onnx.checker.check_model(without_weights(model, as_inputs=True))


# ----------------------------------------------------------------------------- conversion


def load_model(model: ModelLike) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` from a proto (returned as is), serialized bytes or a file path."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"ONNX model file not found: {path}")
        return onnx.load(str(path))
    raise InputError(f"expected onnx.ModelProto, bytes or a path, got {type(model).__name__}")


def to_graph(model: onnx.ModelProto) -> "gs.Graph":
    """The onnx-graphsurgeon graph of ``model`` (a new object; ``model`` is not modified)."""
    import onnx_graphsurgeon as gs

    return gs.import_onnx(model)


def to_model(graph: "gs.Graph", *, like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` of ``graph``; model-level fields (producer, metadata, IR version)
    come from ``like`` when given. FX provenance is written into node ``metadata_props``."""
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph)
    if like is not None:
        model.ir_version = like.ir_version
        model.producer_name = like.producer_name
        model.producer_version = like.producer_version
        model.doc_string = like.doc_string
        del model.metadata_props[:]
        model.metadata_props.extend(like.metadata_props)
    return stamp_fx_nodes(model)


# ----------------------------------------------------------------------------- running


def to_numpy(value: Any) -> np.ndarray:
    """A contiguous numpy array of a torch tensor (any device) or array-like."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(value, torch.Tensor):
        return np.ascontiguousarray(value.detach().cpu().numpy())
    return np.ascontiguousarray(np.asarray(value))
