"""``QuantizeWeightOnly``: blockwise INT4/INT8 weights for Linear / matmul-with-a-constant-weight,
activations stay in floating point (the LLM-style weight-only scheme: memory and file size, not
integer arithmetic).

Every ``block`` consecutive weights along the input dim (K) share one float scale; the grid is
symmetric, ``[-2^(b-1), 2^(b-1) - 1]`` with scale ``absmax / (2^(b-1) - 1)`` (no zero points:
ONNX Runtime's implicit ``2^(b-1)`` offset encodes it). Weights are packed as ONNX Runtime's
``com.microsoft::MatMulNBits`` wants them (``B`` uint8 ``[N, K/block, block*bits/8]``, low nibble
first; ``scales`` ``[N * K/block]``), and the FX node ``fxcompress_quant.matmul_nbits`` lowers 1:1
to that op. ``embeddings``: ``nn.Embedding`` tables get the same blocks along the hidden dim and
lower to ``com.microsoft::GatherBlockQuantized``. Both are ONNX Runtime contrib ops; for other
runtimes (TensorRT) the ONNX pass ``lower-matmul-nbits`` rewrites them to standard opset-21
``DequantizeLinear`` (INT4/INT8, ``block_size``) -> ``MatMul`` / ``Gather``.

``rounding`` ``adaround`` learns the rounding of each layer on calibration data (see ``adaround``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from fxcompress.errors import PipelineError
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import Pass, PassContext, PassResult, copy_graph_module

from .. import _fx_utils as fxu
from .adaround import AdaRoundConfig, RoundingTask, adaround_layers, calibration_batches
from .calibrate import require_calibration
from .patterns import ConstantLinear, module_path
from .placement import constant_linears, finish_weight_quantizer, float_rows, matches_skip, unmatched_skip

_NS = "fxcompress_quant"
_lib = torch.library.Library(_NS, "FRAGMENT")
_lib.define("matmul_nbits(Tensor x, Tensor b, Tensor scales, int k, int bits, int block_size) -> Tensor")
_lib.define("gather_nbits(Tensor ids, Tensor data, Tensor scales, int bits, int block_size) -> Tensor")


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Signed integers ``[rows, k]`` from ``packed`` (uint8, ``[rows, ...]``, low nibble first)."""
    flat = packed.reshape(packed.shape[0], -1)
    if bits == 4:
        flat = torch.stack([flat & 0x0F, flat >> 4], dim=-1).reshape(flat.shape[0], -1)
    return flat[:, :k].to(torch.int32) - (1 << (bits - 1))


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q`` (signed integers ``[rows, n]``, ``n`` even for 4 bits) as offset uint8, two per byte for 4 bits."""
    u = (q.to(torch.int32) + (1 << (bits - 1))).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous() if bits == 4 else u.contiguous()


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """``q * scale`` of each block along the last dim (``scales``: ``[rows, n_blocks]``)."""
    return q.to(scales.dtype) * scales.repeat_interleave(block, dim=1)[:, :q.shape[1]]


@torch.library.impl(_lib, "matmul_nbits", "CompositeExplicitAutograd")
def _matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, k: int, bits: int,
                  block_size: int) -> torch.Tensor:
    w = dequantize_blocks(unpack(b, bits, k), scales.reshape(b.shape[0], -1).to(x.dtype), block_size)
    return x @ w.t()


@torch.library.register_fake(f"{_NS}::matmul_nbits")
def _matmul_nbits_fake(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, k: int, bits: int,
                       block_size: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], b.shape[0]))


@torch.library.impl(_lib, "gather_nbits", "CompositeExplicitAutograd")
def _gather_nbits(ids: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bits: int,
                  block_size: int) -> torch.Tensor:
    dim = data.shape[1] * 8 // bits
    return F.embedding(ids, dequantize_blocks(unpack(data, bits, dim), scales, block_size))


@torch.library.register_fake(f"{_NS}::gather_nbits")
def _gather_nbits_fake(ids: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bits: int,
                       block_size: int) -> torch.Tensor:
    return scales.new_empty((*ids.shape, data.shape[1] * 8 // bits))


matmul_nbits = torch.ops.fxcompress_quant.matmul_nbits.default
gather_nbits = torch.ops.fxcompress_quant.gather_nbits.default


def _register_onnx_symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import _get_const

    def matmul_symbolic(g, x, b, scales, k, bits, block_size):  # type: ignore[no-untyped-def]
        n = int(b.type().sizes()[0])
        out = g.op("com.microsoft::MatMulNBits", x, b, scales, K_i=_get_const(k, "i", "k"), N_i=n,
                   bits_i=_get_const(bits, "i", "bits"), block_size_i=_get_const(block_size, "i", "block_size"))
        sizes = x.type().sizes()
        if sizes is not None:
            out.setType(x.type().with_sizes([*sizes[:-1], n]))
        return out

    def gather_symbolic(g, ids, data, scales, bits, block_size):  # type: ignore[no-untyped-def]
        nbits = _get_const(bits, "i", "bits")
        out = g.op("com.microsoft::GatherBlockQuantized", data, ids, scales, gather_axis_i=0, quantize_axis_i=1,
                   block_size_i=_get_const(block_size, "i", "block_size"), bits_i=nbits)
        sizes = ids.type().sizes()
        if sizes is not None:
            out.setType(scales.type().with_sizes([*sizes, int(data.type().sizes()[1]) * 8 // nbits]))
        return out

    for opset in range(13, 21):
        register_custom_op_symbolic(f"{_NS}::matmul_nbits", matmul_symbolic, opset)
        register_custom_op_symbolic(f"{_NS}::gather_nbits", gather_symbolic, opset)


_register_onnx_symbolics()


@dataclass(frozen=True)
class QuantizeWeightOnly(Pass):
    """Blockwise symmetric INT4/INT8 weights for Linear / matmul with a constant weight (and
    Embedding tables), activations in float; lowers to ONNX Runtime's MatMulNBits /
    GatherBlockQuantized (``lower-matmul-nbits`` for standard ONNX)."""

    name: ClassVar[str] = "quantize-weight-only"

    bits: Literal[4, 8] = 4
    block: int = 32
    rounding: Literal["nearest", "adaround"] = "nearest"
    adaround_iters: int = 1000
    calibration_batches: int = 8
    embeddings: bool = True
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise PipelineError(f"{self.name}: block must be a power of two >= 16 (ONNX Runtime's MatMulNBits); "
                                f"got {self.block}")
        if self.adaround_iters < 1 or self.calibration_batches < 0:
            raise PipelineError(f"{self.name}: needs adaround_iters >= 1 and calibration_batches >= 0")
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales ``[N, n_blocks]``, the same expanded to ``w``'s ``[N, K]``) of ``w``."""
        n, k = w.shape
        blocks = -(-k // self.block)
        padded = F.pad(w.float(), (0, blocks * self.block - k)).reshape(n, blocks, self.block)
        scales = (padded.abs().amax(dim=-1) / self.qmax).clamp(min=1e-12)
        return scales, scales.repeat_interleave(self.block, dim=1)[:, :k]

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(graph=gm)
        unmatched = unmatched_skip(self.skip, gm)
        if unmatched:
            result.warn(unmatched)
        targets, floats = constant_linears(gm, self.skip)
        rounded, errors = self._adaround(gm, ctx, targets) if self.rounding == "adaround" and targets else ({}, {})
        layers = [self._rewrite(gm, t, rounded.get(t.node.name)) for t in targets]
        tables = self._quantize_embeddings(gm, floats) if self.embeddings else []
        finish_weight_quantizer(gm, result, floats, bool(layers or tables),
                                "no Linear/matmul with a constant 2-D weight and no Embedding found; nothing was quantized")
        rows = layers + tables
        result.stats = {
            "bits": self.bits, "block": self.block, "rounding": self.rounding, "layers": rows,
            "float_layers": floats, "adaround": errors,
            "weight_bytes_before": sum(r["bytes_before"] for r in rows),
            "weight_bytes_after": sum(r["bytes_after"] for r in rows),
        }
        result.layers = [PassLayerRow(r["node"], kind=r["kind"], unit="weight bytes", before=r["bytes_before"],
                                  after=r["bytes_after"], precision=f"int{self.bits}",
                                  metrics={"rel_weight_error": r["rel_weight_error"]},
                                  key_metric="rel_weight_error", worse="higher") for r in rows]
        result.layers += float_rows(floats)
        if rows:
            result.info(f"{len(layers)} layer(s) and {len(tables)} embedding table(s) to {self.bits}-bit blocks of "
                        f"{self.block}: weights {result.stats['weight_bytes_before']:,} -> "
                        f"{result.stats['weight_bytes_after']:,} bytes")
        return result

    def _adaround(self, gm: GraphModule, ctx: PassContext,
                  targets: list[ConstantLinear]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
        """AdaRound integers ``[N, K]`` by node: inputs from the float graph whose earlier layers
        already carry their rounded weights."""
        require_calibration(ctx, self.name, "rounding='adaround'")
        work = copy_graph_module(gm)
        for p in work.parameters():
            p.requires_grad_(False)
        tasks = []
        for t in targets:
            _, scale = self.grid(t.weight)
            w, s = (t.weight.t(), scale.t()) if t.transposed else (t.weight, scale)
            tasks.append(RoundingTask(t.node.name, w, s, -self.qmax - 1, self.qmax, channel_dim=-1))
        batches = calibration_batches(gm, ctx, self.calibration_batches, self.name)
        rounded, errors = adaround_layers(gm, work, tasks, batches, AdaRoundConfig(iters=self.adaround_iters), ctx,
                                          self.name)
        by_node = {t.node.name: t for t in targets}
        return {name: q.t() if by_node[name].transposed else q for name, q in rounded.items()}, errors

    def _encode(self, w: torch.Tensor, q: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(packed ``[N, n_blocks, block*bits/8]``, scales ``[N, n_blocks]``, relative weight error)."""
        scales, full = self.grid(w)
        if q is None:
            q = torch.clamp(torch.round(w.float() / full), -self.qmax - 1, self.qmax)
        n, k = w.shape
        blocks = scales.shape[1]
        padded = F.pad(q, (0, blocks * self.block - k))
        packed = pack(padded, self.bits).reshape(n, blocks, -1)
        err = float((q * full - w.float()).norm() / w.float().norm().clamp(min=1e-30))
        return packed, scales, err

    def _rewrite(self, gm: GraphModule, t: ConstantLinear, q: torch.Tensor | None) -> dict[str, Any]:
        n, k = t.weight.shape
        packed, scales, err = self._encode(t.weight, q)
        base = (module_path(t.node) or t.node.name).replace(".", "_")
        graph = gm.graph
        with graph.inserting_before(t.node):
            b = graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_packed", packed))
            s = graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_scales", scales.flatten()))
            new = graph.call_function(matmul_nbits, (t.x, b, s, k, self.bits, self.block))
            if t.bias is not None:
                bias = graph.get_attr(fxu.register_tensor(gm, f"{base}_bias", t.bias.detach().float().clone(),
                                                          parameter=True))
                new = graph.call_function(torch.add, (new, bias))
        new.meta = dict(t.node.meta)
        t.node.replace_all_uses_with(new)
        graph.erase_node(t.node)
        return {"node": t.node.name, "module": module_path(t.node), "kind": "linear", "shape": [n, k],
                "bytes_before": t.weight.numel() * t.weight.element_size(),
                "bytes_after": packed.numel() + scales.numel() * 4, "rel_weight_error": err}

    def _quantize_embeddings(self, gm: GraphModule, floats: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or type(mod := fxu.get_module(gm, node)) is not nn.Embedding:
                continue
            pat = matches_skip(tuple(self.skip), node, mod, "embedding")
            reason = (f"skipped by user (skip pattern {pat!r})" if pat else
                      "embedding with max_norm renormalizes its table" if mod.max_norm is not None else
                      f"embedding dim {mod.embedding_dim} is not a multiple of block {self.block}"
                      if mod.embedding_dim % self.block else None)
            if reason:
                floats[node.name] = reason
                continue
            w = mod.weight.detach()
            packed, scales, err = self._encode(w)
            base = str(node.target).replace(".", "_")
            with gm.graph.inserting_before(node):
                d = gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_packed", packed.reshape(w.shape[0], -1)))
                s = gm.graph.get_attr(fxu.register_tensor(gm, f"{base}_weight_scales", scales))
                new = gm.graph.call_function(gather_nbits, (node.args[0], d, s, self.bits, self.block))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rows.append({"node": node.name, "module": str(node.target), "kind": "embedding", "shape": list(w.shape),
                         "bytes_before": w.numel() * w.element_size(), "bytes_after": packed.numel() + scales.numel() * 4,
                         "rel_weight_error": err})
        return rows
