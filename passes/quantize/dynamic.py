"""``QuantizeDynamic``: dynamic INT8 for Linear / matmul weights (no calibration).

Weights are quantized once (symmetric INT8 per output column, stored transposed as ``in x out``);
activations are quantized per call from their own range. The FX node is
``fxcompress_quant.dynamic_linear``, which lowers to DynamicQuantizeLinear + MatMulInteger +
rescale; ONNX Runtime fuses that into its dynamic-quantized matmul kernel. The choice for
transformer/MLP models on CPU, where activation ranges vary too much per input for static scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import Pass, PassContext, PassResult

from .. import _fx_utils as fxu
from .fake_quant import dynamic_linear, quantize_weight
from .patterns import module_path
from .placement import constant_linears, finish_weight_quantizer, float_rows, matches_skip, unmatched_skip


@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Dynamic INT8 Linear/matmul. ``reduce_range`` keeps weights in 7 bits (``[-64, 64]``) so the
    u8 x s8 kernels of x86 CPUs without VNNI do not saturate; ``skip`` as in ``quantize-int8``.
    ``embeddings``: ``nn.Embedding`` tables are stored as INT8 rows with one scale per row and
    dequantized after the lookup (a transformer's vocabulary table is often most of its bytes)."""

    name: ClassVar[str] = "quantize-dynamic"
    shares_weights: ClassVar[bool] = True

    reduce_range: bool = True
    skip: tuple[str, ...] = ()
    embeddings: bool = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        qmax = 64 if self.reduce_range else 127
        result = PassResult(graph=gm)
        unmatched = unmatched_skip(self.skip, gm)
        if unmatched:
            result.warn(unmatched)
        done: list[str] = []
        targets, floats = constant_linears(gm, self.skip)
        for t in targets:
            node, bias = t.node, t.bias
            w = t.weight.t().float().contiguous()  # stored in x out
            scale = (w.abs().amax(dim=0) / qmax).clamp(min=1e-12)
            base = (module_path(node) or node.name).replace(".", "_")
            q = quantize_weight(w, scale, 1, -qmax, qmax)
            with gm.graph.inserting_before(node):
                qn = gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_q", q))
                sn = gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_scale", scale))
                bn = (gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_bias", bias.detach().float().clone(),
                                                            parameter=True)) if bias is not None else None)
                new = gm.graph.call_function(dynamic_linear, (t.x, qn, sn, bn, 255))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done.append(node.name)
        embedded = self._quantize_embeddings(gm, floats) if self.embeddings else []
        finish_weight_quantizer(gm, result, floats, bool(done or embedded),
                                "no Linear/matmul with a constant weight and no Embedding found; nothing was quantized")
        result.stats = {"int8_layers": done, "int8_embeddings": embedded, "float_layers": floats,
                        "weight_range": [-qmax, qmax]}
        result.layers = [PassLayerRow(name, kind=kind, precision="int8 dynamic")
                         for names, kind in ((done, "linear"), (embedded, "embedding")) for name in names]
        result.layers += float_rows(floats)
        return result

    def _quantize_embeddings(self, gm: GraphModule, floats: dict[str, str]) -> list[str]:
        """``emb(ids)`` -> ``F.embedding(ids, q).to(float) * F.embedding(ids, scale)``: INT8 rows,
        symmetric per-row scales; lowers to Gather(INT8), Cast, Gather(scale), Mul."""
        done = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = fxu.get_module(gm, node)
            if type(mod) is not nn.Embedding:
                continue
            pat = matches_skip(tuple(self.skip), node, mod, "embedding")
            if pat or mod.max_norm is not None or not mod.weight.is_floating_point():
                floats[node.name] = (f"skipped by user (skip pattern {pat!r})" if pat
                                     else "embedding with max_norm renormalizes its table")
                continue
            w = mod.weight.detach().float()
            scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
            q = quantize_weight(w, scale, 0, -127, 127)
            base = str(node.target).replace(".", "_")
            with gm.graph.inserting_before(node):
                qn = gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_q", q))
                sn = gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_scale", scale))
                rows = gm.graph.call_function(F.embedding, (node.args[0], qn))
                real = gm.graph.call_method("to", (rows, mod.weight.dtype))
                scales = gm.graph.call_function(F.embedding, (node.args[0], sn))
                new = gm.graph.call_function(torch.mul, (real, scales))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            done.append(node.name)
        return done
