"""``correct-bias``: empirical bias correction after ``quantize-int8`` (Nagel et al. 2019)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.errors import PassError, PipelineError
from fxcompress.trace import trace
from fxcompress.pass_base import PassContext
from passes.quantize.bias_correction import CorrectBias, float_graph
from passes.quantize.ptq import FLOAT_WEIGHTS_KEY


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5)).eval()
    with torch.no_grad():   # depthwise kernels of very different sizes: a per-tensor grid rounds them badly
        net[2].weight.mul_(torch.logspace(-2, 0, 8).reshape(8, 1, 1, 1))
    return net


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(16, 3, 6, 6, generator=g) for _ in range(4)]


QUANT = "quantize-int8{scheme=tensorrt,per-channel=false,observer=minmax}"


def _mean_error(gm: torch.nn.Module, model: nn.Module, data: list[torch.Tensor]) -> tuple[float, float]:
    with torch.no_grad():
        err = torch.cat([(gm(x) - model(x)) for x in data])
    return float(err.mean(0).abs().mean()), float(err.pow(2).mean())


def test_correction_removes_the_mean_error_and_reports_each_layer() -> None:
    model, data = _net(), _data()
    plain = fxc.compile(model, (data[0],), QUANT, calibration=data, target="fx", progress=False)
    fixed = fxc.compile(model, (data[0],), f"{QUANT},correct-bias", calibration=data, target="fx", progress=False)
    row = fixed.report[-1]
    assert row.status == "ok" and row.name == "correct-bias"
    layers = row.stats["layers"]
    assert [r["module"] for r in layers] == ["0", "2", "5"]
    assert all(r["mean_abs_shift"] > 0 and r["max_abs_shift"] >= r["mean_abs_shift"] for r in layers)
    assert row.stats["rounds"] == 3    # a chain: each layer waits for the one before
    bias_before, mse_before = _mean_error(plain.graph_module, model, data)
    bias_after, mse_after = _mean_error(fixed.graph_module, model, data)
    assert bias_after < 0.5 * bias_before and mse_after < mse_before
    # the depthwise conv had no bias: it has one now, and the graph still exports with INT8 weights
    c = fxc.compile(model, (data[0],), f"{QUANT},correct-bias", calibration=data, target="onnxruntime",
                    progress=False)
    torch.testing.assert_close(c(data[0]), fixed.graph_module(data[0]), rtol=0.05, atol=0.05)


def test_float_graph_is_the_graph_before_quantization() -> None:
    model, data = _net(), _data()
    gm = trace(model, (data[0],), frontend="fx")
    ctx = PassContext((data[0],), calibration=data)
    q = fxc.Pipeline.parse(QUANT).apply(gm, ctx).graph_module
    f = float_graph(q, ctx.analysis(FLOAT_WEIGHTS_KEY, lambda: None))
    assert "fake_quantize" not in f.code and "dequantize" not in f.code
    torch.testing.assert_close(f(data[1]), model(data[1]), rtol=1e-5, atol=1e-5)


def test_needs_quantize_int8_right_before() -> None:
    model, data = _net(), _data()
    with pytest.raises(PipelineError, match="requires 'int8'"):
        fxc.compile(model, (data[0],), "correct-bias", calibration=data, target="fx", progress=False)
    gm = trace(model, (data[0],), frontend="fx")
    with pytest.raises(PassError, match="right after quantize-int8"):
        CorrectBias().run(gm, PassContext((data[0],), calibration=data))
    # a pass that changes the graph in between drops the float reference: the error says so
    with pytest.raises(PassError, match="right after quantize-int8"):
        fxc.compile(model, (data[0],), f"{QUANT},fold-constants,correct-bias", calibration=data,
                    target="fx", progress=False)


def test_qat_graphs_are_not_corrected() -> None:
    model, data = _net(), _data()
    with pytest.raises(PassError, match="not qat"):
        fxc.compile(copy.deepcopy(model), (data[0],), "quantize-int8{qat=true},correct-bias", calibration=data,
                    train_data=[(x, torch.zeros(16, dtype=torch.long)) for x in data], target="fx", progress=False)
