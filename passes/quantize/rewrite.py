"""Apply a quantization ``Plan`` to a GraphModule: INT8 weights and activation fake-quant.

PTQ writes constants (python-float scales, INT8 weight buffers behind ``dequantize``); QAT
writes learnable fake-quant modules instead, which ``freeze`` later turns into the PTQ form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .. import _fx_utils as fxu
from .fake_quant import LearnedFakeQuant, LearnedWeightFakeQuant, dequantize, quantize_weight
from .observers import QSpec
from .patterns import module_path
from .placement import Layer, Plan

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_CONV_T = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


@dataclass(frozen=True)
class WeightQuant:
    """Per-channel (``axis`` >= 0) or per-tensor (``axis`` -1, scalar scale) symmetric INT8 weight grid;
    ``values``: the integers when they were chosen otherwise than by rounding to nearest (AdaRound)."""

    scale: torch.Tensor
    axis: int
    qmin: int
    qmax: int
    values: torch.Tensor | None = None


def _base(layer: Layer) -> str:
    path = module_path(layer.node) if layer.node.op == "call_module" else layer.node.name
    return (path or layer.node.name).replace(".", "_")


def _rename(node: Node, name: str) -> None:
    if node.name != name:
        node._rename(name)  # keep the original node name: reports and goldens refer to it


def _weight_node(gm: GraphModule, layer: Layer, wq: WeightQuant, anchor: Node, qat: bool, learn: bool) -> Node:
    graph = gm.graph
    base = _base(layer)
    with graph.inserting_before(anchor):
        if qat:
            wname = fxu.register_tensor(gm, f"{base}_weight", layer.weight.detach().clone(), parameter=True)
            fq = fxu.unique_name(gm, f"{base}_weight_fq")
            gm.add_module(fq, LearnedWeightFakeQuant(wq.scale, wq.axis, wq.qmin, wq.qmax, learn))
            return graph.call_module(fq, (graph.get_attr(wname),))
        q = (wq.values.to(torch.int8) if wq.values is not None
             else quantize_weight(layer.weight, wq.scale, wq.axis, wq.qmin, wq.qmax))
        qname = fxu.register_tensor(gm, f"{base}_weight_q", q)
        sname = fxu.register_tensor(gm, f"{base}_weight_scale", wq.scale.detach().float().clone())
        return graph.call_function(dequantize, (graph.get_attr(qname), graph.get_attr(sname), wq.axis))


def quantize_layer_weight(gm: GraphModule, layer: Layer, wq: WeightQuant, *, qat: bool = False,
                          learn: bool = True) -> Node:
    """Rewrite ``layer`` so its weight comes through INT8 dequantization (or QAT fake-quant);
    returns the (possibly new) compute node."""
    node, info = layer.node, layer.info
    graph = gm.graph
    w = _weight_node(gm, layer, wq, node, qat, learn)
    if node.op != "call_module":
        if info.kind == "matmul":
            node.args = (node.args[0], w, *node.args[2:])
        elif len(node.args) > 1:
            node.args = (node.args[0], w, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "weight": w}
        return node
    mod = info.module
    assert mod is not None
    bias: Node | None = None
    if getattr(mod, "bias", None) is not None:
        bname = fxu.register_tensor(gm, f"{_base(layer)}_bias", mod.bias.detach().clone(), parameter=True)
        with graph.inserting_before(node):
            bias = graph.get_attr(bname)
    x = node.args[0]
    if isinstance(mod, nn.Linear):
        fn, args = F.linear, (x, w, bias)
    elif info.kind == "conv":
        dims = mod.weight.dim() - 2
        fn, args = _CONV[dims], (x, w, bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    else:
        dims = mod.weight.dim() - 2
        fn, args = _CONV_T[dims], (x, w, bias, mod.stride, mod.padding, mod.output_padding, mod.groups,
                                   mod.dilation)
    with graph.inserting_before(node):
        new = graph.call_function(fn, args)
    new.meta = dict(node.meta)
    new.meta["source_module"] = str(node.target)
    name = node.name
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    _rename(new, name)
    layer.node = new
    return new


def insert_activation_quant(gm: GraphModule, producer: Node, consumers: list[Node] | None, scale: float,
                            zero_point: int, spec: QSpec, *, qat: bool = False, learn: bool = True,
                            module: str | None = None) -> Node:
    """Fake-quantize ``producer``'s output for ``consumers`` (every user when None). With ``qat``,
    ``module`` names an existing fake-quant module to share (tied scales stay tied in training)."""
    graph = gm.graph
    users = list(producer.users) if consumers is None else list(consumers)
    with graph.inserting_after(producer):
        if qat:
            target = module
            if target is None:
                target = fxu.unique_name(gm, f"{producer.name}_fq")
                gm.add_module(target, LearnedFakeQuant(scale, zero_point, spec.qmin, spec.qmax, learn))
            fq = graph.call_module(target, (producer,))
        else:
            fq = graph.call_function(torch.fake_quantize_per_tensor_affine,
                                     (producer, float(scale), int(zero_point), spec.qmin, spec.qmax))
    fq.meta["quant"] = {"scale": float(scale), "zero_point": int(zero_point), "dtype": spec.dtype}
    if "tensor_meta" in producer.meta:
        fq.meta["tensor_meta"] = producer.meta["tensor_meta"]
    for user in users:
        if user is fq:
            continue
        user.args = torch.fx.node.map_arg(user.args, lambda a: fq if a is producer else a)
        user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a: fq if a is producer else a)
    return fq


def apply_plan(gm: GraphModule, plan: Plan, act: dict[str, tuple[float, int]], weights: dict[str, WeightQuant],
               spec: QSpec, *, qat: bool = False, learn: bool = True) -> dict[str, Any]:
    """Rewrite ``gm`` per ``plan``: ``act`` maps slot node names to (scale, zero point), ``weights``
    maps layer node names to their weight grid. Returns a summary for stats."""
    shared: dict[str, str] = {}
    for slot in list(plan.slots.values()):
        src = slot.tie.name if slot.tie is not None else slot.node.name
        scale, zp = act[src]
        fq = insert_activation_quant(gm, slot.node, slot.consumers, scale, zp, spec, qat=qat, learn=learn,
                                     module=shared.get(src))
        if qat:
            shared.setdefault(src, str(fq.target))
    for layer in plan.layers:
        name = layer.node.name
        if name in weights:
            quantize_layer_weight(gm, layer, weights[name], qat=qat, learn=learn)
    fxu.eliminate_dead_code(gm)
    fxu.delete_unused_attributes(gm)
    return {"activation_quantizers": len(plan.slots), "int8_layers": [layer.node.name for layer in plan.layers]}
