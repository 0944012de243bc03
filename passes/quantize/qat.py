"""Quantization-aware training: freeze learned fake-quant into the PTQ form.

``QuantizeInt8(qat=True)`` places ``LearnedFakeQuant`` / ``LearnedWeightFakeQuant`` modules
(straight-through rounding, LSQ-style learnable scales) where PTQ would place constants; a
``fine-tune`` pass trains them on ``ctx.train_data`` and calls ``freeze_qat`` at the end, so the
graph exports exactly as a PTQ graph does (constant scales, INT8 weight initializers).
``FreezeQuant`` does the same for graphs trained some other way. A QAT graph exported unfrozen
still lowers to QuantizeLinear/DequantizeLinear with its current scales (see ``fake_quant``), with
FP32 weights behind QuantizeLinear until ``fold-weight-quantize`` or ONNX Runtime folds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from fxcompress.pass_base import Pass, PassContext, PassResult

from .. import _fx_utils as fxu
from .fake_quant import LearnedFakeQuant, LearnedWeightFakeQuant, dequantize, quantize_weight


def _qat_nodes(gm: GraphModule) -> list[tuple[Node, torch.nn.Module]]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(str(n.target))
            if isinstance(mod, (LearnedFakeQuant, LearnedWeightFakeQuant)):
                out.append((n, mod))
    return out


def has_qat(gm: GraphModule) -> bool:
    """Whether ``gm`` still has trainable fake-quant modules."""
    return bool(_qat_nodes(gm))


def freeze_qat(gm: GraphModule) -> dict[str, int]:
    """Replace every learned fake-quant by constants: per-tensor scales become python floats,
    fake-quantized weights become INT8 buffers behind ``dequantize``. Returns counts."""
    graph = gm.graph
    acts = weights = 0
    for node, mod in _qat_nodes(gm):
        if isinstance(mod, LearnedFakeQuant):
            scale, zp = mod.frozen()
            with graph.inserting_before(node):
                new = graph.call_function(torch.fake_quantize_per_tensor_affine,
                                          (node.args[0], scale, zp, mod.qmin, mod.qmax))
            new.meta = dict(node.meta)
            new.meta["quant"] = {"scale": scale, "zero_point": zp}
            acts += 1
        else:
            w_node = node.args[0]
            weight = fxu.get_attr_value(gm, str(w_node.target)) if w_node.op == "get_attr" else None
            if weight is None:
                continue
            scale = mod.frozen()
            base = str(w_node.target).replace(".", "_")
            q = quantize_weight(weight.detach(), scale, mod.axis, mod.qmin, mod.qmax)
            with graph.inserting_before(node):
                qn = graph.get_attr(fxu.register_tensor(gm, f"{base}_q", q))
                sn = graph.get_attr(fxu.register_tensor(gm, f"{base}_scale", scale))
                new = graph.call_function(dequantize, (qn, sn, mod.axis))
            weights += 1
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    fxu.eliminate_dead_code(gm)
    fxu.delete_unused_attributes(gm)
    return {"activations": acts, "weights": weights}


@dataclass(frozen=True)
class FreezeQuant(Pass):
    """Freeze QAT fake-quant (learned scales) into constant Q/DQ and INT8 weights."""

    name: ClassVar[str] = "freeze-quant"
    shares_weights: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        counts = freeze_qat(gm)
        result = PassResult(graph=gm, stats=counts)
        if not any(counts.values()):
            result.info("no QAT fake-quant in the graph; nothing to freeze")
        return result
