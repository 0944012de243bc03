"""Where Q/DQ go, per backend scheme, and why a layer stays in floating point.

``tensorrt`` (TensorRT explicit quantization): the activation inputs and weights of
Conv/ConvTranspose/Linear/matmul, every input of concats, and the residual input of adds (not
the conv output TensorRT fuses the add into, so conv + add + ReLU run as one INT8 kernel);
nothing between a conv and the BN/ReLU after it.

``onnxruntime`` (ORT CPU QDQ fusion): the same inputs plus the outputs of every quantized op,
joins and average pools (after a ReLU/ReLU6 that directly follows, which ORT then folds into the
quantization), so ``DQ -> op -> Q`` groups become QLinearConv / QLinearAdd / QLinearConcat /
QLinearGlobalAveragePool. Value-preserving ops (max pool, reshape, flatten, transpose) get the
same scale on both sides, so ORT runs them on INT8 directly.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal, Sequence, get_args

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.attrs import fetch_attr
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import PassResult

from .. import _fx_utils as fxu
from .._fx_utils import unmatched_patterns
from .patterns import COMPUTE, ConstantLinear, OpInfo, classify, constant_linear, module_of, module_path

#: where the Q/DQ placement is for (a pass option's type, with ``"auto"``: from the compile target)
Scheme = Literal["auto", "tensorrt", "onnxruntime"]
SCHEMES: tuple[str, ...] = get_args(Scheme)[1:]


@dataclass
class Layer:
    """A compute op that gets INT8 weights."""

    node: Node
    info: OpInfo
    weight: torch.Tensor
    axis: int


@dataclass
class Slot:
    """A tensor (the output of ``node``) that gets a per-tensor fake quantization.

    ``consumers`` None means every user sees the quantized value; ``tie`` names the slot whose
    scale this one reuses (value-preserving ops), in which case it is not observed."""

    node: Node
    consumers: list[Node] | None = field(default_factory=list)
    tie: Node | None = None


@dataclass
class Plan:
    scheme: str
    layers: list[Layer]
    slots: dict[Node, Slot]
    float_layers: dict[str, str]
    infos: dict[Node, OpInfo]


def scheme_for_target(scheme: str, target: str) -> str:
    """``auto`` resolves from the compile target: TensorRT targets get ``tensorrt``, others ``onnxruntime``."""
    if scheme != "auto":
        return scheme
    return "tensorrt" if target.startswith("tensorrt") else "onnxruntime"


def _is_float_tensor(node: Node) -> bool:
    tm = node.meta.get("tensor_meta")
    dtype = getattr(tm, "dtype", None)
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)


def _weight_of(gm: GraphModule, node: Node, info: OpInfo) -> torch.Tensor | None:
    if node.op == "call_module":
        w = getattr(info.module, "weight", None)
        return w if isinstance(w, torch.Tensor) else None
    if info.weight is not None and info.weight.op == "get_attr":
        obj = fetch_attr(gm, str(info.weight.target), None)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def float_rows(floats: dict[str, str]) -> list[PassLayerRow]:
    """The layers a quantization pass keeps in floating point (node -> why), as typed table rows."""
    return [PassLayerRow(node, precision="float", note=reason) for node, reason in floats.items()]


def finish_weight_quantizer(gm: GraphModule, result: PassResult, floats: dict[str, str], quantized: bool,
                            nothing: str) -> None:
    """The common end of a weight quantizer: drop the float nodes and attributes it replaced, say
    why each layer left in floating point stays there, and warn (``nothing``) when it quantized none."""
    fxu.eliminate_dead_code(gm)
    fxu.delete_unused_attributes(gm)
    for name, reason in floats.items():
        result.info(f"stays in floating point: {reason}", node=name)
    if not quantized:
        result.warn(nothing)


def matches_skip(patterns: tuple[str, ...], node: Node, mod: nn.Module | None, kind: str) -> str | None:
    """The first fnmatch pattern matching the node name, module path, op kind or module type."""
    names = [node.name, module_path(node), kind]
    if mod is not None:
        names.append(type(mod).__name__)
    for pat in patterns:
        if any(n and fnmatch.fnmatchcase(n, pat) for n in names):
            return pat
    return None


def constant_linears(gm: GraphModule, skip: Sequence[str]) -> tuple[list[ConstantLinear], dict[str, str]]:
    """The Linear / matmul nodes of ``gm`` with a constant 2-D weight that no ``skip`` pattern
    matches, and for every other Linear / matmul why it stays in floating point (by node name)."""
    found: list[ConstantLinear] = []
    floats: dict[str, str] = {}
    for node in gm.graph.nodes:
        info = classify(gm, node)
        if info.kind not in ("linear", "matmul"):
            continue
        pat = matches_skip(tuple(skip), node, info.module, info.kind)
        target = constant_linear(gm, node, info) if not pat else f"skipped by user (skip pattern {pat!r})"
        if isinstance(target, str):
            floats[node.name] = target
        else:
            found.append(target)
    return found, floats


def unmatched_skip(patterns: Sequence[str], gm: GraphModule) -> str | None:
    """A warning naming the ``skip`` patterns no node matches (see ``matches_skip``), or None."""
    names: list[str] = []
    layers: list[str] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        info = classify(gm, node)
        mod_type = type(info.module).__name__ if info.module is not None else ""
        names += [node.name, module_path(node), info.kind, mod_type]
        if info.kind in COMPUTE:
            layers.append(module_path(node) or node.name)
    return unmatched_patterns("skip", patterns, names, layers=list(dict.fromkeys(layers)),
                              consequence="they keep no layer in floating point")


def _unsupported(node: Node, info: OpInfo, weight: torch.Tensor | None) -> str | None:
    mod = info.module
    if weight is None:
        return "unsupported pattern: the weight is computed at run time, not a parameter"
    if info.kind == "matmul" and weight.dim() != 2:
        return f"unsupported pattern: matmul with a {weight.dim()}-D constant operand (needs 2-D)"
    if not info.inputs:
        return "unsupported pattern: no tensor input"
    if mod is not None and getattr(mod, "padding_mode", "zeros") != "zeros":
        return f"unsupported pattern: padding_mode={mod.padding_mode!r} (only 'zeros' lowers to one Conv)"
    if info.kind == "conv_transpose":
        groups = getattr(mod, "groups", 1) if mod is not None else (node.args[6] if len(node.args) > 6 else 1)
        if groups != 1:
            return "unsupported pattern: grouped ConvTranspose (per-channel axis 1 spans groups)"
        if node.op == "call_module" and (len(node.args) > 1 or "output_size" in node.kwargs):
            return "unsupported pattern: ConvTranspose called with output_size"
    return None


def _blocks_fusion(node: Node, infos: dict[Node, OpInfo], scheme: str) -> str | None:
    users = list(node.users)
    if scheme == "onnxruntime" and infos[node].kind == "conv_transpose":
        return ("unsupported pattern: ONNX Runtime's CPU provider has no INT8 ConvTranspose kernel (Q/DQ around "
                "it would only add work); quantized for TensorRT with scheme='tensorrt'")
    if scheme == "onnxruntime" and infos[node].kind in ("conv", "conv_transpose") and users and all(
            infos.get(u, OpInfo("other", ())).kind == "batchnorm" for u in users):
        return (f"would block fusion: followed by BatchNorm '{users[0].name}' that is not folded "
                f"(ONNX Runtime cannot fuse DQ->Conv->BN->Q; run fold-batchnorm first)")
    return None


def _chain_end(node: Node, infos: dict[Node, OpInfo]) -> Node:
    """Follow a ReLU/ReLU6 that is the only user of ``node`` (the backend fuses it into ``node``)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        info = infos.get(user)
        if info is None or info.kind not in ("relu", "clip") or info.inputs[:1] != (node,):
            break
        node = user
    return node


def _fused_residual(add: Node, info: OpInfo, layer_nodes: set[Node], infos: dict[Node, OpInfo],
                    order: dict[Node, int]) -> Node | None:
    """The add input TensorRT fuses into its producing conv (conv + residual add): a quantized
    conv's output used only by this add; of two, the later one (the main branch). None for concat."""
    if info.kind != "add":
        return None
    direct = [x for x in info.inputs if x in layer_nodes and infos[x].kind in ("conv", "conv_transpose")
              and len(x.users) == 1]
    return max(direct, key=lambda x: order[x]) if direct else None


def build_plan(gm: GraphModule, scheme: str, *, skip: tuple[str, ...] = (),
               skip_reasons: dict[str, str] | None = None, keep_first_last_fp: bool = False) -> Plan:
    """Decide the layers and tensors to quantize on ``gm`` for ``scheme``."""
    nodes = list(gm.graph.nodes)
    infos = {n: classify(gm, n) for n in nodes}
    layers, float_layers = _choose_layers(gm, nodes, infos, scheme, skip, skip_reasons or {}, keep_first_last_fp)
    slots = _quantized_tensors(nodes, infos, {layer.node for layer in layers}, scheme)
    _tie_passthroughs(nodes, infos, slots, scheme)
    return Plan(scheme, layers, slots, float_layers, infos)


def _choose_layers(gm: GraphModule, nodes: list[Node], infos: dict[Node, OpInfo], scheme: str,
                   skip: tuple[str, ...], skip_reasons: dict[str, str], keep_first_last_fp: bool
                   ) -> tuple[list[Layer], dict[str, str]]:
    """The compute layers to quantize (with their weight and per-channel axis), and the layers kept
    in floating point with the reason."""
    compute = [n for n in nodes if infos[n].kind in COMPUTE and _is_float_tensor(n)]
    edge = {compute[0], compute[-1]} if keep_first_last_fp and compute else set()
    float_layers: dict[str, str] = {}
    layers: list[Layer] = []
    for n in compute:
        info = infos[n]
        weight = _weight_of(gm, n, info)
        pat = matches_skip(skip, n, info.module, info.kind)
        external = skip_reasons.get(n.name)
        reason = (f"skipped by user (skip pattern {pat!r})" if pat else
                  external if external else
                  "keep_first_last_fp: first/last layer kept in floating point" if n in edge else
                  _unsupported(n, info, weight) if info.kind != "matmul" or info.weight is not None else None)
        if reason is None:
            reason = _blocks_fusion(n, infos, scheme)
        if reason is not None:
            float_layers[n.name] = reason
            continue
        if info.kind == "matmul" and weight is None:
            layers.append(Layer(n, info, torch.empty(0), -1))
            continue
        assert weight is not None
        axis = 1 if info.kind == "conv_transpose" else weight.dim() - 1 if info.kind == "matmul" else 0
        layers.append(Layer(n, info, weight, axis))
    return layers, float_layers


def _quantized_tensors(nodes: list[Node], infos: dict[Node, OpInfo], layer_nodes: set[Node],
                       scheme: str) -> dict[Node, Slot]:
    """The tensors that get a fake quantization: the inputs of quantized layers, and of adds/concats (and,
    for ONNX Runtime, average pools) that sit between INT8 tensors; ``onnxruntime`` also quantizes
    each such op's output (after a fused ReLU)."""
    slots: dict[Node, Slot] = {}
    all_users = scheme == "onnxruntime"

    def request(t: Node, consumer: Node | None) -> None:
        if not isinstance(t, Node) or not _is_float_tensor(t) or t.op == "get_attr":
            return
        slot = slots.setdefault(t, Slot(t, None if all_users else []))
        if slot.consumers is not None and consumer is not None and consumer not in slot.consumers:
            slot.consumers.append(consumer)

    order = {n: i for i, n in enumerate(nodes)}
    int8 = set(layer_nodes)

    def int8_source(t: Node) -> bool:
        while t not in int8 and infos.get(t, OpInfo("other", ())).kind in ("relu", "clip", "passthrough"):
            if not infos[t].inputs:
                return False
            t = infos[t].inputs[0]
        return t in int8

    def feeds_int8(t: Node) -> bool:
        for u in t.users:
            kind = infos.get(u, OpInfo("other", ())).kind
            if u in layer_nodes or (kind == "passthrough" and feeds_int8(u)):
                return True
        return False

    for n in nodes:
        info = infos[n]
        if n in layer_nodes:
            for x in info.inputs:
                request(x, n)
            if scheme == "onnxruntime":
                request(_chain_end(n, infos), None)
        elif info.kind in ("add", "cat") and _is_float_tensor(n):
            if any(int8_source(x) for x in info.inputs) or feeds_int8(_chain_end(n, infos)):
                int8.add(n)
                fused = _fused_residual(n, info, layer_nodes, infos, order) if scheme == "tensorrt" else None
                for x in info.inputs:
                    if x is not fused:
                        request(x, n)
                if scheme == "onnxruntime":
                    request(_chain_end(n, infos), None)
        elif info.kind == "avgpool" and scheme == "onnxruntime" and info.inputs and int8_source(info.inputs[0]):
            int8.add(n)
            request(info.inputs[0], n)
            request(_chain_end(n, infos), None)
    return slots


def _tie_passthroughs(nodes: list[Node], infos: dict[Node, OpInfo], slots: dict[Node, Slot], scheme: str) -> None:
    """Make a passthrough op's slot share its input's quantization parameters (to the root of the
    chain); ``onnxruntime`` also gives a passthrough between quantized tensors a slot of its own."""
    for n in nodes:
        info = infos[n]
        if n in slots and info.kind == "passthrough" and info.inputs and info.inputs[0] in slots:
            slots[n].tie = info.inputs[0]
        if (scheme == "onnxruntime" and info.kind == "passthrough" and info.inputs and info.inputs[0] in slots
                and n not in slots and any(u in slots or infos[u].kind == "passthrough" for u in n.users)
                and _is_float_tensor(n)):
            slots[n] = Slot(n, None, tie=info.inputs[0])
    for slot in slots.values():
        while slot.tie is not None and slots[slot.tie].tie is not None:
            slot.tie = slots[slot.tie].tie


__all__ = ["Layer", "Plan", "SCHEMES", "Slot", "build_plan", "matches_skip", "module_of", "scheme_for_target",
           "unmatched_skip"]
