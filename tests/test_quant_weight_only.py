"""``quantize-weight-only`` (blockwise INT4/INT8 weights lowered to ONNX Runtime's MatMulNBits /
GatherBlockQuantized) and ``lower-matmul-nbits`` (the same as standard opset-21 DequantizeLinear)."""

from __future__ import annotations

import collections

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.digits import accuracy
from fxcompress.errors import PipelineError
from passes.quantize.weight_only import QuantizeWeightOnly, pack, unpack


pytestmark = pytest.mark.usefixtures("one_thread")



def _row(compiled: fxc.Compiled, name: str):  # type: ignore[no-untyped-def]
    return next(r for r in compiled.report.rows if r.name.startswith(name))


def _ops(compiled: fxc.Compiled) -> collections.Counter[str]:
    assert compiled.onnx_model is not None
    return collections.Counter(n.op_type for n in compiled.onnx_model.graph.node)


def _ort_unfused(compiled: fxc.Compiled, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime with basic optimizations only: at the default level it fuses DequantizeLinear ->
    MatMul back into MatMulNBits with 8-bit activations (accuracy level 4), a different computation."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(compiled.onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (5, 64), generator=gen)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == q.numel() * bits // 8
    assert torch.equal(unpack(packed, bits, 61), q[:, :61].to(torch.int32))


@pytest.mark.parametrize("bits, max_drop, max_ratio", [(4, 0.02, 0.2), (8, 0.005, 0.33)])
def test_digits_transformer_runs_matmul_nbits_within_budget(digits_transformer, bits, max_drop, max_ratio) -> None:  # type: ignore[no-untyped-def]
    model, data = digits_transformer
    x = next(iter(data.test))[0]
    c = fxc.compile(model, (x[:1],), f"quantize-weight-only{{bits={bits}}}", target="onnxruntime")
    fp32, quant = accuracy(model, data.test), accuracy(c, data.test)
    print(f"\ndigits transformer, weight-only INT{bits}: FP32 {fp32:.4f}, ONNX Runtime {quant:.4f}")
    assert fp32 - quant <= max_drop
    ops = _ops(c)
    assert ops["MatMulNBits"] == 14 and ops["MatMul"] == 4  # every Linear; the attention matmuls stay float
    stats = _row(c, "quantize-weight-only").stats
    assert len(stats["layers"]) == 14 and set(stats["float_layers"]) == {"matmul", "matmul_1", "matmul_2", "matmul_3"}
    assert stats["weight_bytes_after"] <= max_ratio * stats["weight_bytes_before"]
    assert all(0 < r["rel_weight_error"] < (0.15 if bits == 4 else 0.01) for r in stats["layers"])
    with torch.no_grad():
        np.testing.assert_allclose(c(x).numpy(), c.graph_module(x).numpy(), rtol=1e-4, atol=1e-4)


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.fc = nn.Linear(64, 40)
        self.out = nn.Linear(40, 5, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids))))


@pytest.mark.parametrize("bits", [4, 8])
def test_embeddings_and_the_standard_onnx_lowering(bits: int) -> None:
    torch.manual_seed(0)
    model = _Tagger().eval()
    ids = torch.randint(0, 100, (3, 7))
    c = fxc.compile(model, (ids,), f"quantize-weight-only{{bits={bits},block=16}}", target="onnxruntime")
    assert _ops(c)["GatherBlockQuantized"] == 1 and _ops(c)["MatMulNBits"] == 2
    stats = _row(c, "quantize-weight-only").stats
    assert [r["kind"] for r in stats["layers"]] == ["linear", "linear", "embedding"]
    before = (100 * 64 + 64 * 40 + 40 * 5) * 4
    after = (100 * 64 + 64 * 40 + 48 * 5) * bits // 8 + (100 * 4 + 40 * 4 + 5 * 3) * 4  # 40 padded to 48
    assert (stats["weight_bytes_before"], stats["weight_bytes_after"]) == (before, after)
    with torch.no_grad():
        fx_out = c.graph_module(ids)
        np.testing.assert_allclose(c(ids).numpy(), fx_out.numpy(), rtol=1e-5, atol=1e-5)
        assert float(torch.nn.functional.cosine_similarity(fx_out.flatten(), model(ids).flatten(), dim=0)) > 0.99
    low = fxc.compile(model, (ids,), f"quantize-weight-only{{bits={bits},block=16}},lower-matmul-nbits", target="onnx")
    assert {o.domain: o.version for o in low.onnx_model.opset_import} == {"": 21}
    ops = _ops(low)
    assert ops["DequantizeLinear"] == 3 and ops["MatMul"] == 2 and ops["Gather"] == 1
    assert not ops["MatMulNBits"] and not ops["GatherBlockQuantized"]
    sizes = {i.name: len(i.raw_data) for i in low.onnx_model.graph.initializer if i.data_type in (3, 22)}  # INT8, INT4
    assert sum(sizes.values()) == (100 * 64 + 64 * 40 + 40 * 5) * bits // 8
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(low.onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0], fx_out.numpy(),
                               rtol=1e-5, atol=1e-5)


def test_lowering_a_transformer_keeps_dynamic_batch(digits_transformer) -> None:  # type: ignore[no-untyped-def]
    model, data = digits_transformer
    x = next(iter(data.test))[0]
    c = fxc.compile(model, (x[:1],), "quantize-weight-only,lower-matmul-nbits", target="onnx")
    assert _ops(c)["DequantizeLinear"] == 14
    with torch.no_grad():
        np.testing.assert_allclose(_ort_unfused(c, x), c.graph_module(x).numpy(), rtol=1e-4, atol=1e-4)


def test_adaround_weight_only_lowers_every_layers_error(digits_transformer) -> None:  # type: ignore[no-untyped-def]
    model, data = digits_transformer
    x = next(iter(data.test))[0]
    acc = {}
    for rounding in ("nearest", "adaround"):
        c = fxc.compile(model, (x[:1],), [QuantizeWeightOnly(rounding=rounding, adaround_iters=100)],
                        calibration=data.calibration, target="fx")
        acc[rounding] = accuracy(c.graph_module, data.test)
        errors = _row(c, "quantize-weight-only").stats["adaround"]
    print(f"\ndigits transformer, weight-only INT4: nearest {acc['nearest']:.4f}, AdaRound {acc['adaround']:.4f}")
    assert len(errors) == 14 and sum(e["adaround"] < e["nearest"] for e in errors.values()) >= 12, errors
    assert acc["adaround"] >= acc["nearest"]


def test_nothing_to_quantize_and_bad_options_are_reported() -> None:
    c = fxc.compile(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), (torch.rand(1, 1, 5, 5),),
                    "quantize-weight-only,lower-matmul-nbits", target="onnx")
    messages = [d["message"] if isinstance(d, dict) else d.message for r in c.report.rows for d in r.diagnostics]
    assert any("nothing was quantized" in m for m in messages)
    assert any("nothing to lower" in m for m in messages)
    with pytest.raises(PipelineError, match="power of two >= 16"):
        QuantizeWeightOnly(block=24)
    with pytest.raises(PipelineError, match="must be one of"):
        QuantizeWeightOnly(bits=3)  # type: ignore[arg-type]
