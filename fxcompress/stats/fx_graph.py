"""Statistics of a torch.fx ``GraphModule``: tensors owned by layers, MACs by module and op rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress import ops
from fxcompress.attrs import fetch_attr
from fxcompress.errors import InputError

from .result import GraphStats, LayerStats, _owner, _shape_str, _Tally


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
                value = fetch_attr(self.gm, str(node.target))
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


def _dynamic_linear_fn(s: _FxShapes, n: Node, what: str) -> int:
    """``fxcompress_quant.dynamic_linear(x, w_q, w_scale, bias, qmax)``: ``w_q`` is stored ``in x out``."""
    return _numel(s.out(n, what)) * s.arg(n, 1, "weight", what)[0]


def _matmul_nbits_fn(s: _FxShapes, n: Node, what: str) -> int:
    """``fxcompress_quant.matmul_nbits(x, b, scales, k, bits, block_size)``: ``k`` input features."""
    return _numel(s.out(n, what)) * int(n.args[3])


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
    "dynamic_linear": _dynamic_linear_fn,
    "matmul_nbits": _matmul_nbits_fn,
}


def _fn_op(node: Node) -> str | None:
    """The MAC rule name of a call_function/call_method node (its op-table name), or None if it has no MACs."""
    if node.op not in ("call_function", "call_method"):
        return None
    name = ops.op_name(node.target)
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
            value = fetch_attr(gm, str(node.target))
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
