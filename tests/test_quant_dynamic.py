"""QuantizeDynamic: INT8 Linear/matmul weights, DynamicQuantizeLinear + MatMulInteger in ONNX,
fused by ONNX Runtime into its dynamic-quantized matmul, outputs close to FX and FP32."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes import QuantizeDynamic
from passes.quantize.fake_quant import dynamic_act_qparams, dynamic_linear
from zoo import ZOO


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize("name,layers", [("transformer_block", 4), ("leaf_mha_lstm", 5)])  # embed, head.0, head.2 and the inlined MHA's two projections
def test_dynamic_int8_runs_fused_in_ort_and_matches_fx(name: str, layers: int, tmp_path: Path) -> None:
    model, ex = ZOO[name]()
    result = run_pass(QuantizeDynamic(), trace(model, ex), ex)
    gm = result.graph
    assert len(result.stats["int8_layers"]) == layers
    assert sum(n.target is dynamic_linear for n in gm.graph.nodes) == layers
    proto = export_onnx(gm, ex)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["DynamicQuantizeLinear"] == layers and ops["MatMulInteger"] == layers
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in proto.graph.initializer) == layers
    int8 = [onnx.numpy_helper.to_array(i) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert max(int(abs(w.astype(int)).max()) for w in int8) == 64  # reduce_range=True: 7-bit weights
    assert result.stats["weight_range"] == [-64, 64]
    path = tmp_path / "opt.onnx"
    ort_out = OrtRunner(proto, threads=1, optimized_model_path=path)(*ex)
    optimized = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert optimized["DynamicQuantizeMatMul"] == layers  # every quantized layer fused, none left unfused
    assert optimized["MatMulInteger"] == optimized["DynamicQuantizeLinear"] == 0
    with torch.no_grad():
        fx_out, fp32 = gm(*ex), model(*ex)
    scale = float(fp32.abs().max())
    assert _cos(ort_out, fx_out) > 0.9999
    assert float((ort_out - fx_out).abs().max()) < 1e-5 * scale  # same integer arithmetic: float rounding only
    assert _cos(fx_out, fp32) > 0.999
    assert float((fx_out - fp32).abs().max()) < 0.02 * scale  # the INT8 error, vs eager FP32
    assert float((ort_out - fp32).abs().max()) < 0.02 * scale


def test_dynamic_linear_matches_the_onnx_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen) + 0.7
    scale, zp = dynamic_act_qparams(x)
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    assert float(scale) == pytest.approx((hi - lo) / 255)
    assert float(zp) == round(-lo / ((hi - lo) / 255))
    w_q = torch.randint(-64, 65, (5, 4), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(4, generator=gen) * 0.01 + 0.001
    y = dynamic_linear(x, w_q, w_scale, None, 255)
    xq = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    expected = ((xq - zp) @ w_q.float()) * scale * w_scale
    assert torch.allclose(y, expected, atol=1e-6)
    assert torch.allclose(y, x @ (w_q.float() * w_scale), atol=0.05)


def test_dynamic_skip_and_reasons() -> None:
    model, ex = ZOO["transformer_block"]()
    result = QuantizeDynamic(skip=("mlp.*",), reduce_range=False).run(trace(model, ex), fxc.PassContext(ex))
    assert result.stats["int8_layers"] == ["attn_qkv", "attn_proj"]
    reasons = result.stats["float_layers"]
    assert "skip pattern" in reasons["mlp_0"]
    assert "two activations" in reasons["matmul"]
    w = [getattr(result.graph, n.args[1].target) for n in result.graph.graph.nodes if n.target is dynamic_linear]
    assert max(int(t.abs().max()) for t in w) == 127


class _BackToBack(nn.Module):
    """A Linear fed by a Linear, then a matmul of two activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        return y @ y.transpose(0, 1)


@pytest.mark.parametrize("pipeline", ["quantize-dynamic", "quantize-weight-only{bits=8,block=16}"])
def test_weight_quantizers_find_constant_weights_alike(pipeline: str) -> None:
    """Both find constant-weight Linear/matmul nodes one way (``placement.constant_linears``): a
    Linear fed by a rewritten Linear is rewritten too, a matmul of two activations stays float, saying why."""
    model, x = _BackToBack().eval(), (torch.randn(4, 32),)
    result = run_pass(pipeline, model, x)
    assert not any(isinstance(m, nn.Linear) for m in result.graph.modules())
    assert list(result.stats["float_layers"]) == ["matmul"]
    assert "two activations" in result.stats["float_layers"]["matmul"]
    with torch.no_grad():
        got, ref = result.graph(*x), model(*x)
    assert _cos(got, ref) > 0.999


@pytest.mark.parametrize("pipeline", ["quantize-dynamic", "quantize-weight-only{bits=8,block=16}"])
def test_weight_quantizers_leave_the_mac_count_as_it_was(pipeline: str) -> None:
    """Quantizing weights changes bytes, not work: non-square layers (whose stored weight is transposed
    by quantize-dynamic) count the same MACs before and after."""
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 16)).eval()
    x = (torch.randn(5, 32),)
    compiled = fxc.compile(model, x, pipeline, target="fx", progress=False)
    assert compiled.report[0].macs == 5 * (32 * 96 + 96 * 16)
    assert compiled.report[1].macs == compiled.report[0].macs
