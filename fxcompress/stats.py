"""Parameters, non-zeros, sparsity, bytes by dtype and MACs of a graph, per layer and in total.

The same ``GraphStats`` comes from a torch.fx ``GraphModule`` (``graph_stats``) and from an
ONNX model (``onnx_stats``), so a report can put "after FX passes" and "after lowering" side by side.

Conventions (every report relies on them):

* **layers** are named by module path for a called module (``layer1.0.conv1``; one row per module
  however often it is called, MACs summed), by node name for a function node (``matmul_1``) and
  for an ONNX node. A stored tensor belongs to the layer that consumes it, following
  constant-only chains (dequantize, transpose, a weight fake-quantizer); ``LayerStats.kind`` is
  the module class, the function name or the ONNX op type.

* **params** are weights: ``nn.Parameter`` tensors of the modules the graph calls and of its
  ``get_attr`` nodes, plus stored tensors that hold weights in another form (an INT8 weight kept
  as a buffer or an ONNX initializer). Each tensor is counted once, however many modules share it
  and however many times a module is called. Not params, but counted in **bytes**: BatchNorm
  running statistics and other floating-point buffers, ``int64``/``bool`` tensors (shapes, indices,
  ``num_batches_tracked``), quantization scales and zero points, single-element constants
  outside a weight slot, and in ONNX the initial states of LSTM/GRU/RNN (an all-zero tensor that
  only feeds ``Expand``/``Tile`` is such a fill value). So an INT8 model has the same params as
  its fp32 source and ~4x fewer bytes.
* **nonzero** counts stored values that are not zero (for quantized tensors the raw integers,
  i.e. zero means "quantized to the zero point 0").
* **bytes** is the storage of every tensor the graph holds (params and buffers), by dtype;
  ``bytes_by_dtype`` sums to ``bytes``, in total and per layer (``LayerStats.bytes_by_dtype``).
* **MACs** are multiply-accumulates of the layers with weights or matmuls: Conv/ConvTranspose
  (bias not counted), Linear, matmul/mm/bmm/addmm/baddbmm/einsum, scaled dot-product attention
  (its two matmuls), ``nn.MultiheadAttention`` (four projections and the two attention matmuls),
  RNN/LSTM/GRU and their cells (the gate matmuls only; element-wise gate products are left out,
  an approximation). Normalization, activations, pooling and element-wise ops count 0.
  A leaf module of unknown type that holds weights gets ``macs_known=False`` and its name goes to
  ``GraphStats.macs_unknown``; a module can report its own MACs by defining
  ``fxcompress_macs(self, input_shapes, output_shape) -> int``.
* FX MACs use the shapes ShapeProp recorded for the example inputs (their batch size); a graph
  without ``meta["tensor_meta"]`` is an ``InputError`` (a ``ValueError``) telling to run
  ``fxcompress.verify.propagate_shapes``, rather than a silent 0.
* ONNX: dynamic dimensions (``dim_param`` or unknown) count as 1, so MACs are per sample for a
  dynamic batch; only the top-level graph is counted (not If/Loop bodies).
"""

from __future__ import annotations

import math
import operator
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = ["GraphStats", "LayerStats", "compare", "format_bytes", "format_count", "graph_stats",
           "onnx_stats"]


# ----------------------------------------------------------------------------- results


@dataclass
class LayerStats:
    """One layer: a called module (by module path), a function node (by node name) or an ONNX node."""

    name: str
    kind: str
    params: int = 0
    nonzero: int = 0
    macs: int = 0
    bytes: int = 0
    shape: str | None = None
    macs_known: bool = True
    #: this layer's storage by dtype name; sums to ``bytes``
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params, "nonzero": self.nonzero,
                "sparsity": self.sparsity, "macs": self.macs, "bytes": self.bytes,
                "bytes_by_dtype": dict(sorted(self.bytes_by_dtype.items())), "shape": self.shape,
                "macs_known": self.macs_known}


@dataclass
class GraphStats:
    """Totals and per-layer rows; ``sum(l.params for l in layers) == params`` (same for the rest)."""

    params: int
    nonzero: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    macs: int
    layers: list[LayerStats] = field(default_factory=list)
    macs_unknown: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    @property
    def compression_ratio(self) -> float:
        """params / nonzero: 1.0 for a dense model, ``inf`` when every weight is zero."""
        if self.nonzero:
            return self.params / self.nonzero
        return math.inf if self.params else 1.0

    @property
    def pruned_params(self) -> int:
        return self.params - self.nonzero

    @property
    def active_params(self) -> int:
        return self.nonzero

    def layer(self, name: str) -> LayerStats:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are: {', '.join(l.name for l in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (no NaN/inf: an infinite compression ratio is written as null)."""
        ratio = self.compression_ratio
        return {
            "params": self.params, "nonzero": self.nonzero, "pruned_params": self.pruned_params,
            "active_params": self.active_params, "sparsity": self.sparsity,
            "compression_ratio": None if math.isinf(ratio) else ratio,
            "bytes": self.bytes, "bytes_by_dtype": dict(sorted(self.bytes_by_dtype.items())),
            "macs": self.macs, "macs_unknown": list(self.macs_unknown),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphStats:
        """Inverse of ``to_dict`` (derived fields are recomputed, not read)."""
        fields = ("name", "kind", "params", "nonzero", "macs", "bytes", "shape", "macs_known")
        layers = [LayerStats(**{k: row[k] for k in fields if k in row},
                             bytes_by_dtype={str(k): int(v) for k, v in row.get("bytes_by_dtype", {}).items()})
                  for row in data.get("layers", ())]
        return cls(params=int(data["params"]), nonzero=int(data["nonzero"]), bytes=int(data["bytes"]),
                   bytes_by_dtype={str(k): int(v) for k, v in data["bytes_by_dtype"].items()},
                   macs=int(data["macs"]), layers=layers, macs_unknown=list(data.get("macs_unknown", ())))

    @staticmethod
    def compare(before: GraphStats, after: GraphStats) -> dict[str, Any]:
        """Before/after numbers and ``after / before`` ratios, in total and per layer name."""
        return compare(before, after)

    def summary(self) -> str:
        return (f"params {format_count(self.params)} (nonzero {format_count(self.nonzero)}, "
                f"sparsity {self.sparsity:.1%}), {format_bytes(self.bytes)}, MACs {format_count(self.macs)}")

    def __str__(self) -> str:
        return self.summary()


def _ratio(before: int, after: int) -> float | None:
    if before:
        return after / before
    return 1.0 if not after else None


def compare(before: GraphStats, after: GraphStats) -> dict[str, Any]:
    """``{params,nonzero,bytes,macs}_{before,after,ratio}`` plus ``layers: {name: {...}}``.

    A ratio is ``after / before`` (0.5 = halved); it is None when ``before`` is 0 and ``after`` is not.
    A layer present on one side only has 0 on the other.
    """
    out: dict[str, Any] = {}
    for key in ("params", "nonzero", "bytes", "macs"):
        b, a = getattr(before, key), getattr(after, key)
        out[f"{key}_before"], out[f"{key}_after"], out[f"{key}_ratio"] = b, a, _ratio(b, a)
    out["sparsity_before"], out["sparsity_after"] = before.sparsity, after.sparsity
    rows_b = {layer.name: layer for layer in before.layers}
    rows_a = {layer.name: layer for layer in after.layers}
    names = list(rows_b) + [name for name in rows_a if name not in rows_b]
    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        lb, la = rows_b.get(name), rows_a.get(name)
        row: dict[str, Any] = {"kind": (lb or la).kind}  # type: ignore[union-attr]
        for key in ("params", "nonzero", "macs", "bytes"):
            b, a = (getattr(lb, key) if lb else 0), (getattr(la, key) if la else 0)
            row[f"{key}_before"], row[f"{key}_after"], row[f"{key}_ratio"] = b, a, _ratio(b, a)
        layers[name] = row
    out["layers"] = layers
    return out


def format_count(n: float | None) -> str:
    """Short human form with 3 significant digits: 999 -> '999', 4500 -> '4.5K', 1234567 -> '1.23M'."""
    if n is None:
        return "-"
    if isinstance(n, float) and not math.isfinite(n):
        return str(n)
    sign, value = ("-" if n < 0 else ""), abs(n)
    units = ("", "K", "M", "G", "T", "P")
    i = 0
    while value >= 999.5 and i < len(units) - 1:
        value /= 1000.0
        i += 1
    if i == 0 and float(value).is_integer():
        return f"{sign}{int(value)}"
    return f"{sign}{value:.3g}{units[i]}"


def format_bytes(n: float | None) -> str:
    """Binary units: 100 -> '100 B', 1536 -> '1.5 KiB', 4194304 -> '4 MiB'."""
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, i = float(n), 0
    while abs(value) >= 1023.5 and i < len(units) - 1:
        value /= 1024.0
        i += 1
    return f"{value:.0f} B" if i == 0 else f"{value:.3g} {units[i]}"


# ----------------------------------------------------------------------------- accounting


class _Tally:
    """Collects tensors (each once, by key) and MACs into ordered layers."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerStats] = {}
        self.seen: set[Any] = set()
        self.bytes_by_dtype: dict[str, int] = {}

    def layer(self, name: str, kind: str) -> LayerStats:
        if name not in self.layers:
            self.layers[name] = LayerStats(name=name, kind=kind)
        return self.layers[name]

    def add_tensor(self, layer: LayerStats, key: Any, *, numel: int, nonzero: int, nbytes: int,
                   dtype: str, is_param: bool) -> None:
        if key in self.seen:
            return
        self.seen.add(key)
        layer.bytes += nbytes
        layer.bytes_by_dtype[dtype] = layer.bytes_by_dtype.get(dtype, 0) + nbytes
        self.bytes_by_dtype[dtype] = self.bytes_by_dtype.get(dtype, 0) + nbytes
        if is_param:
            layer.params += numel
            layer.nonzero += nonzero

    def finish(self) -> GraphStats:
        layers = list(self.layers.values())
        return GraphStats(
            params=sum(l.params for l in layers), nonzero=sum(l.nonzero for l in layers),
            bytes=sum(l.bytes for l in layers), bytes_by_dtype=dict(sorted(self.bytes_by_dtype.items())),
            macs=sum(l.macs for l in layers), layers=layers,
            macs_unknown=[l.name for l in layers if not l.macs_known])


def _shape_str(shape: Sequence[int] | None) -> str | None:
    if shape is None:
        return None
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _owner(start: Any, users: Callable[[Any], Iterable[Any]], is_mac: Callable[[Any], bool],
           is_const: Callable[[Any], bool]) -> tuple[Any, Any]:
    """(first MAC consumer reached through constant-only ops, first other consumer) of a stored tensor.

    A weight often reaches its layer through a dequantize/transpose/cast chain that depends only on
    constants; following only such chains never attributes a bias added to an activation to the
    next layer downstream.
    """
    queue, visited, fallback = deque(users(start)), set(), None
    while queue:
        node = queue.popleft()
        if node in visited:
            continue
        visited.add(node)
        if is_mac(node):
            return node, fallback
        if is_const(node):
            queue.extend(users(node))
        elif fallback is None:
            fallback = node
    return None, fallback


# ----------------------------------------------------------------------------- torch side


def _torch_dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _torch_key(t: torch.Tensor) -> Any:
    """Identity of the stored values, so two Parameter objects over the same storage count once."""
    try:
        if t.layout == torch.strided and not t.is_quantized and t.device.type != "meta" and t.numel():
            return ("storage", t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(),
                    tuple(t.shape), tuple(t.stride()), t.dtype)
    except (RuntimeError, NotImplementedError):
        pass
    return ("id", id(t))


def _torch_nonzero(t: torch.Tensor) -> int:
    try:
        if t.device.type == "meta":
            return t.numel()
        with torch.no_grad():
            values = t.int_repr() if t.is_quantized else t.detach()
            return int(torch.count_nonzero(values))
    except (RuntimeError, NotImplementedError, TypeError):
        return t.numel()


def _add_torch_tensor(tally: _Tally, layer: LayerStats, t: torch.Tensor, is_param: bool) -> None:
    numel = t.numel()
    tally.add_tensor(layer, _torch_key(t), numel=numel, nonzero=_torch_nonzero(t) if is_param else 0,
                     nbytes=numel * t.element_size(), dtype=_torch_dtype_name(t), is_param=is_param)


_QUANT_PARAM_NAMES = ("scale", "zero_point", "zp", "num_batches_tracked")


def _is_quant_param_name(name: str) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return any(word in last for word in _QUANT_PARAM_NAMES)


def _is_weight_dtype(t: torch.Tensor) -> bool:
    return t.dtype not in (torch.int64, torch.uint64, torch.bool) and not t.dtype.is_complex


def _is_weight_buffer(name: str, t: torch.Tensor) -> bool:
    """A module buffer that stores weights: integer or 1-byte float (INT8/FP8 weights), not metadata."""
    if _is_quant_param_name(name) or not _is_weight_dtype(t):
        return False
    if t.is_quantized:
        return True
    return not t.dtype.is_floating_point or t.element_size() == 1


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _first_meta(meta: Any) -> Any:
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return meta
    if isinstance(meta, Mapping):
        meta = list(meta.values())
    if isinstance(meta, (list, tuple)):
        for item in meta:
            found = _first_meta(item)
            if found is not None:
                return found
    return None


def _dims(shape: Iterable[Any]) -> tuple[int, ...]:
    out = []
    for d in shape:
        try:
            out.append(int(d))
        except (TypeError, ValueError):
            out.append(1)
    return tuple(out)


def _node_shape(node: Node) -> tuple[int, ...] | None:
    meta = _first_meta(node.meta.get("tensor_meta"))
    return None if meta is None else _dims(meta.shape)


class _FxShapes:
    """Shapes from ShapeProp metadata; missing metadata is a clear error, not a silent 0."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm

    def out(self, node: Node, what: str) -> tuple[int, ...]:
        shape = _node_shape(node)
        if shape is None:
            if node.op == "get_attr":
                value = _fetch_attr(self.gm, str(node.target))
                if isinstance(value, torch.Tensor):
                    return _dims(value.shape)
            raise InputError(
                f"graph_stats needs tensor shapes to count MACs of {what}, but node '{node.name}' has no "
                "meta['tensor_meta']; call fxcompress.verify.propagate_shapes(gm, example_inputs) first "
                "(fxcompress.trace.trace does it for you)")
        return shape

    def arg(self, node: Node, index: int, name: str, what: str) -> tuple[int, ...]:
        value = node.args[index] if len(node.args) > index else node.kwargs.get(name)
        if isinstance(value, Node):
            return self.out(value, what)
        if isinstance(value, torch.Tensor):
            return _dims(value.shape)
        raise InputError(f"graph_stats: argument {name!r} of node '{node.name}' ({what}) is not a tensor "
                         f"({type(value).__name__}); cannot count its MACs")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


# MAC rules for call_function / call_method nodes, by operation name: (shapes, node, what) -> MACs.


def _conv_fn(s: _FxShapes, n: Node, what: str) -> int:
    return _numel(s.out(n, what)) * _numel(s.arg(n, 1, "weight", what)[1:])


def _conv_transpose_fn(s: _FxShapes, n: Node, what: str) -> int:
    return _numel(s.arg(n, 0, "input", what)) * _numel(s.arg(n, 1, "weight", what)[1:])


def _aten_convolution(s: _FxShapes, n: Node, what: str) -> int:
    transposed = n.args[6] if len(n.args) > 6 else n.kwargs.get("transposed", False)
    return (_conv_transpose_fn if transposed else _conv_fn)(s, n, what)


def _linear_fn(s: _FxShapes, n: Node, what: str) -> int:
    return _numel(s.out(n, what)) * s.arg(n, 1, "weight", what)[-1]


def _matmul_fn(s: _FxShapes, n: Node, what: str) -> int:
    return _numel(s.out(n, what)) * s.arg(n, 0, "input", what)[-1]


def _addmm_fn(s: _FxShapes, n: Node, what: str) -> int:
    return _numel(s.out(n, what)) * s.arg(n, 1, "mat1", what)[-1]


def _addbmm_fn(s: _FxShapes, n: Node, what: str) -> int:
    batch1 = s.arg(n, 1, "batch1", what)
    return _numel(s.out(n, what)) * batch1[0] * batch1[-1]


def _sdpa_fn(s: _FxShapes, n: Node, what: str) -> int:
    out = s.out(n, what)
    q, k = s.arg(n, 0, "query", what), s.arg(n, 1, "key", what)
    rows = _numel(out[:-1])
    return rows * k[-2] * q[-1] + _numel(out) * k[-2]


def _einsum_fn(s: _FxShapes, n: Node, what: str) -> int:
    equation = str(n.args[0]).replace(" ", "")
    packed = len(n.args) == 2 and isinstance(n.args[1], (list, tuple))
    operands = list(n.args[1]) if packed else list(n.args[1:])
    inputs = equation.split("->")[0].split(",")
    if "..." in equation or len(inputs) != 2 or len(operands) != 2:
        raise _UnknownMacs
    sizes: dict[str, int] = {}
    for letters, operand in zip(inputs, operands):
        shape = s.out(operand, what) if isinstance(operand, Node) else _dims(operand.shape)
        sizes.update(zip(letters, shape))
    return math.prod(sizes.values())


class _UnknownMacs(Exception):
    """A recognised op whose MACs cannot be counted from the graph (e.g. einsum with '...')."""


_FN_RULES: dict[str, Callable[[_FxShapes, Node, str], int]] = {
    "conv1d": _conv_fn, "conv2d": _conv_fn, "conv3d": _conv_fn,
    "conv_transpose1d": _conv_transpose_fn, "conv_transpose2d": _conv_transpose_fn,
    "conv_transpose3d": _conv_transpose_fn, "convolution": _aten_convolution,
    "linear": _linear_fn,
    "matmul": _matmul_fn, "mm": _matmul_fn, "bmm": _matmul_fn, "__matmul__": _matmul_fn,
    "addmm": _addmm_fn, "baddbmm": _addmm_fn, "addbmm": _addbmm_fn,
    "scaled_dot_product_attention": _sdpa_fn,
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa_fn,
    "einsum": _einsum_fn,
    "dynamic_linear": _linear_fn,  # fxcompress_quant.dynamic_linear(x, w_q, w_scale, bias, qmax)
}

_MATMUL_METHODS = frozenset({"matmul", "mm", "bmm", "__matmul__", "addmm", "baddbmm", "addbmm"})

_TORCH_FUNCTIONS: dict[Any, str] = {
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d", F.linear: "linear",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.mm: "mm", torch.bmm: "bmm",
    torch.addmm: "addmm", torch.baddbmm: "baddbmm", torch.addbmm: "addbmm",
    F.scaled_dot_product_attention: "scaled_dot_product_attention", torch.einsum: "einsum",
}


def _fn_op(node: Node) -> str | None:
    """The MAC rule name of a call_function/call_method node, or None if it has no MACs."""
    if node.op == "call_method":
        return str(node.target) if node.target in _MATMUL_METHODS else None
    if node.op != "call_function":
        return None
    try:
        name = _TORCH_FUNCTIONS.get(node.target)
    except TypeError:  # unhashable target
        name = None
    if name is None and isinstance(node.target, torch._ops.OpOverload):  # aten.mm.default, ...
        name = str(node.target).split(".")[1]
    return name if name in _FN_RULES else None


def _target_name(node: Node) -> str:
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):  # aten.conv2d.default -> conv2d
            return str(node.target).split(".")[1]
        return getattr(node.target, "__name__", None) or str(node.target)
    return str(node.target)


def _mha_macs(mod: nn.MultiheadAttention, s: _FxShapes, node: Node, what: str) -> int:
    q, k = s.arg(node, 0, "query", what), s.arg(node, 1, "key", what)
    if len(q) == 2:
        n, length, source = 1, q[0], k[0]
    elif mod.batch_first:
        n, length, source = q[0], q[1], k[1]
    else:
        length, n, source = q[0], q[1], k[0]
    e = mod.embed_dim
    attended = source + (mod.bias_k is not None) + bool(mod.add_zero_attn)
    projections = n * length * e * e * 2 + n * source * (mod.kdim + mod.vdim) * e
    return projections + 2 * n * length * attended * e


def _gates(mode: str) -> int:
    return {"LSTM": 4, "GRU": 3}.get(mode, 1)


def _rnn_macs(mod: nn.RNNBase, s: _FxShapes, node: Node, what: str) -> int:
    x = s.arg(node, 0, "input", what)
    steps = x[0] if len(x) == 2 else x[0] * x[1]
    hidden, proj = mod.hidden_size, int(getattr(mod, "proj_size", 0) or 0)
    recurrent, directions, gates = proj or hidden, 2 if mod.bidirectional else 1, _gates(mod.mode)
    per_step = 0
    for layer in range(mod.num_layers):
        width = mod.input_size if layer == 0 else directions * recurrent
        per_step += directions * (gates * hidden * (width + recurrent) + hidden * proj)
    return steps * per_step


def _cell_macs(mod: nn.RNNCellBase, s: _FxShapes, node: Node, what: str) -> int:
    x = s.arg(node, 0, "input", what)
    batch = x[0] if len(x) == 2 else 1
    gates = 4 if isinstance(mod, nn.LSTMCell) else 3 if isinstance(mod, nn.GRUCell) else 1
    return batch * gates * mod.hidden_size * (mod.input_size + mod.hidden_size)


_MAC_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase,
                nn.RNNCellBase)


def _module_macs(mod: nn.Module, s: _FxShapes, node: Node) -> tuple[int, bool]:
    """(MACs of one call of a leaf module, whether they could be counted)."""
    what = f"module '{node.target}' ({type(mod).__name__})"
    hook = getattr(mod, "fxcompress_macs", None)
    if callable(hook):
        inputs = [s.out(a, what) for a in node.args if isinstance(a, Node)]
        return int(hook(inputs, s.out(node, what))), True
    if isinstance(mod, nn.modules.conv._ConvNd):
        weight = getattr(mod, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 3:
            per_output = _numel(weight.shape[1:])
        else:
            channels = mod.out_channels if mod.transposed else mod.in_channels
            per_output = channels // mod.groups * _numel(mod.kernel_size)
        moving = s.arg(node, 0, "input", what) if mod.transposed else s.out(node, what)
        return _numel(moving) * per_output, True
    if isinstance(mod, nn.Linear):
        return _numel(s.out(node, what)) * s.arg(node, 0, "input", what)[-1], True
    if isinstance(mod, nn.Bilinear):
        return _numel(s.out(node, what)) * mod.in1_features * mod.in2_features, True
    if isinstance(mod, nn.MultiheadAttention):
        return _mha_macs(mod, s, node, what), True
    if isinstance(mod, nn.RNNBase):
        return _rnn_macs(mod, s, node, what), True
    if isinstance(mod, nn.RNNCellBase):
        return _cell_macs(mod, s, node, what), True
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return 0, True
    opaque = any(isinstance(m, _MAC_MODULES) for m in mod.modules()) or any(
        p.dim() >= 2 for p in mod.parameters(recurse=False))
    return 0, not opaque


def _constant_nodes(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose value depends only on stored tensors (get_attr and ops or modules applied to them,
    such as a dequantize or a weight fake-quantizer)."""
    const: set[Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            const.add(node)
        elif node.op in ("call_function", "call_method", "call_module"):
            inputs = node.all_input_nodes
            if inputs and all(i in const for i in inputs):
                const.add(node)
    return const


def _only_quant_inputs(node: Node) -> bool:
    """Every user is a (fake-)quantize/dequantize op taking this node as scale/zero point, not as data."""
    users = list(node.users)
    return bool(users) and all(
        "quantize" in _target_name(u).lower() and not (u.args and u.args[0] is node) for u in users)


def graph_stats(gm: GraphModule) -> GraphStats:
    """Statistics of what a GraphModule's graph uses (modules it calls, attributes it reads).

    Needs ``node.meta["tensor_meta"]`` on the nodes whose MACs are counted (ShapeProp); without it
    raises ``InputError`` (a ``ValueError``) naming the node. Modules the graph no longer calls
    (e.g. after dead-code elimination left them attached) are not counted.
    """
    if not isinstance(gm, GraphModule):
        raise InputError(f"graph_stats takes a torch.fx.GraphModule, got {type(gm).__name__}; trace the "
                         "model first with fxcompress.trace.trace(model, example_inputs)")
    shapes, tally = _FxShapes(gm), _Tally()
    const = _constant_nodes(gm.graph)

    def is_mac(node: Node) -> bool:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            return isinstance(mod, _MAC_MODULES) or callable(getattr(mod, "fxcompress_macs", None))
        return _fn_op(node) is not None

    def layer_of(node: Node) -> LayerStats:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            return tally.layer(str(node.target), type(mod).__name__)
        return tally.layer(node.name, _target_name(node))

    def owner_of(node: Node) -> Node:
        """The layer node a stored tensor (or a transform of one) belongs to; itself if none."""
        mac, other = _owner(node, lambda n: list(n.users), is_mac, const.__contains__)
        owner = mac if mac is not None else other
        ok = owner is not None and owner.op in ("call_module", "call_function", "call_method")
        return owner if ok else node

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            stateless = next(mod.parameters(), None) is None and next(mod.buffers(), None) is None
            if stateless and not is_mac(node):  # activations, pooling, reshapes: not layers
                continue
            own = not (node in const and not is_mac(node))
            layer = layer_of(node if own else owner_of(node))
            quantizer = "quant" in type(mod).__name__.lower()
            for name, p in mod.named_parameters():
                _add_torch_tensor(tally, layer, p, not (quantizer and _is_quant_param_name(name)))
            for name, b in mod.named_buffers():
                _add_torch_tensor(tally, layer, b, _is_weight_buffer(name, b))
            macs, known = _module_macs(mod, shapes, node)
            layer.macs += macs
            layer.macs_known &= known
            if own:
                layer.shape = layer.shape or _shape_str(_node_shape(node))
        elif (op := _fn_op(node)) is not None:
            layer = layer_of(node)
            try:
                layer.macs += _FN_RULES[op](shapes, node, f"{_target_name(node)} node '{node.name}'")
            except _UnknownMacs:
                layer.macs_known = False
            layer.shape = layer.shape or _shape_str(_node_shape(node))
        elif node.op == "get_attr":
            value = _fetch_attr(gm, str(node.target))
            if not isinstance(value, torch.Tensor):
                continue
            owner = owner_of(node)
            if owner is not node:
                layer = layer_of(owner)
            else:
                layer = tally.layer(str(node.target), "parameter" if isinstance(value, nn.Parameter)
                                    else "constant")
                layer.shape = layer.shape or _shape_str(_dims(value.shape))
            is_param = isinstance(value, nn.Parameter) or (
                _is_weight_dtype(value) and value.numel() > 1 and not _is_quant_param_name(str(node.target))
                and not _only_quant_inputs(node))
            _add_torch_tensor(tally, layer, value, is_param)
    return tally.finish()


# ----------------------------------------------------------------------------- ONNX side


def _onnx_dtype_table() -> dict[int, tuple[str, float]]:
    from onnx import TensorProto as T

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
    return None if out is None or weight is None else _numel(out) * _numel(weight[1:])


def _onnx_conv_transpose(n: Any, sh: _Shape) -> int | None:
    x, weight = sh(n.input[0]), sh(n.input[1])
    return None if x is None or weight is None else _numel(x) * _numel(weight[1:])


def _onnx_matmul(n: Any, sh: _Shape, a: int = 0) -> int | None:
    out, left = sh(n.output[0]), sh(n.input[a])
    return None if out is None or left is None or not left else _numel(out) * left[-1]


def _onnx_gemm(n: Any, sh: _Shape) -> int | None:
    out, left = sh(n.output[0]), sh(n.input[0])
    if out is None or left is None or len(left) != 2:
        return None
    trans_a = next((a.i for a in n.attribute if a.name == "transA"), 0)
    return _numel(out) * (left[0] if trans_a else left[1])


def _onnx_rnn(n: Any, sh: _Shape) -> int | None:
    x, w, r = sh(n.input[0]), sh(n.input[1]), sh(n.input[2])
    if x is None or w is None or r is None or len(x) < 2:
        return None
    return x[0] * x[1] * (_numel(w) + _numel(r))


_ONNX_MAC_RULES: dict[str, Callable[[Any, _Shape], "int | None"]] = {
    "Conv": _onnx_conv, "ConvInteger": _onnx_conv, "QLinearConv": lambda n, sh: _onnx_conv(n, sh, 3),
    "ConvTranspose": _onnx_conv_transpose, "Gemm": _onnx_gemm,
    "MatMul": _onnx_matmul, "MatMulInteger": _onnx_matmul, "QLinearMatMul": _onnx_matmul,
    "LSTM": _onnx_rnn, "GRU": _onnx_rnn, "RNN": _onnx_rnn,
}


def _onnx_values(tensor: Any) -> tuple[int, int]:
    """(numel, nonzero) of a TensorProto; nonzero = numel when the data is not loaded (external)."""
    from onnx import TensorProto, numpy_helper
    import numpy as np

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
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

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
    import onnx

    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(os.fspath(model))
    if not isinstance(model, onnx.ModelProto):
        raise InputError(f"onnx_stats takes an onnx.ModelProto or a path, got {type(model).__name__}")
    from .onnx_graph import without_weights

    lean = without_weights(model)
    if input_shapes is not None:
        lean = _pin_input_shapes(lean, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(lean)
    except Exception:  # inference is best effort; value_info already in the model still helps
        inferred = lean
    graph, dtypes = model.graph, _onnx_dtype_table()

    shapes: dict[str, tuple[int, ...]] = {}
    for info in (*inferred.graph.input, *_shapes_through_shape_arithmetic(inferred).graph.value_info,
                 *inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else 1
                                      for d in tensor_type.shape.dim)
    stored: dict[str, Any] = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    stored[node.output[0]] = attr.t
    for name, tensor in stored.items():
        shapes[name] = tuple(tensor.dims)

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

    tally = _Tally()
    is_mac = lambda i: graph.node[i].op_type in _ONNX_MAC_RULES  # noqa: E731

    def users(item: Any) -> list[int]:
        if isinstance(item, str):
            return [i for i, _ in consumers.get(item, ())]
        return [i for out in graph.node[item].output for i, _ in consumers.get(out, ())]

    def layer_of(i: int) -> LayerStats:
        return tally.layer(names[i], graph.node[i].op_type)

    def is_param(name: str, tensor: Any, nonzero: int) -> bool:
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
                                onnx.TensorProto.STRING):
            return False
        uses = [(graph.node[i].op_type, slot) for i, slot in consumers.get(name, ())]
        if uses and all(slot in _ONNX_STATE_SLOTS.get(op, ()) for op, slot in uses):
            return False
        if uses and nonzero == 0 and all(op in _ONNX_FILL_OPS and slot == 0 for op, slot in uses):
            return False
        if math.prod(tensor.dims) > 1:
            return True
        return any(slot in _ONNX_WEIGHT_SLOTS.get(op, ()) for op, slot in uses)

    def add_stored(name: str) -> None:
        tensor = stored[name]
        mac, other = _owner(name, users, is_mac, const_nodes.__contains__)
        if mac is not None or other is not None:
            layer = layer_of(mac if mac is not None else other)
        else:
            layer = tally.layer(name, "Constant" if name in producer else "initializer")
            layer.shape = layer.shape or _shape_str(tuple(tensor.dims))
        dtype, size = dtypes.get(tensor.data_type, (f"onnx_dtype_{tensor.data_type}", 1))
        numel, nonzero = _onnx_values(tensor)
        param = is_param(name, tensor, nonzero)
        tally.add_tensor(layer, ("onnx", name), numel=numel, nonzero=nonzero if param else 0,
                         nbytes=math.ceil(numel * size), dtype=dtype, is_param=param)

    for init in graph.initializer:
        add_stored(init.name)
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.output and node.output[0] in stored:
            add_stored(node.output[0])
        rule = _ONNX_MAC_RULES.get(node.op_type)
        if rule is None:
            continue
        layer = layer_of(i)
        macs = rule(node, shapes.get)
        if macs is None:
            layer.macs_known = False
        else:
            layer.macs += macs
        layer.shape = layer.shape or _shape_str(shapes.get(node.output[0]))
    # layers in graph order, stored-only layers after the nodes' own
    order = {name: i for i, name in enumerate(names)}
    tally.layers = dict(sorted(tally.layers.items(), key=lambda kv: order.get(kv[0], len(order))))
    return tally.finish()


def tied_parameters(gm: nn.Module) -> list[list[str]]:
    """Groups of two or more parameter names that are one tensor (tied weights, e.g. an embedding
    and its output head)."""
    groups: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def untied_warnings(before: nn.Module, after: nn.Module) -> list[str]:
    """One warning for each group of tied parameters of ``before`` that ``after`` no longer holds
    as one tensor (a pass made separate copies, e.g. a quantized head beside a float embedding)."""
    params = dict(after.named_parameters(remove_duplicate=False))
    out = []
    for names in tied_parameters(before):
        alive = [n for n in names if n in params]
        if len(alive) == len(names) and len({id(params[n]) for n in alive}) == 1:
            continue
        gone = [n for n in names if n not in params]
        out.append(f"tied weights {', '.join(names)} are no longer one tensor after this pass"
                   + (f" ({', '.join(gone)} replaced or removed)" if gone else "")
                   + "; the model now stores them separately. To keep them tied, leave these layers out of "
                     "the pass (its exclude=/skip=/keep-fp32= option)")
    return out
