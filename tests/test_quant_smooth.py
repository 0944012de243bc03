"""``smooth-quant``: exact (the pass manager verifies it), Q/K/V after one LayerNorm share one scale,
a LayerNorm whose output also feeds something else is left alone with the reason; on real digits
(the rows-as-tokens transformer) with static per-tensor INT8 activations, with and without it."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from _passes_util import outputs
import fxcompress as fxc
from fxcompress.digits import accuracy
from fxcompress.trace import trace
from fxcompress.errors import PipelineError
from fxcompress.pass_base import PassContext
from fxcompress.testing import run_pass
from passes.quantize.smooth_quant import SmoothQuant


class Block(nn.Module):
    """LayerNorm -> Q/K/V (shared input), and a Linear -> Linear chain; one channel with outliers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.norm2 = nn.LayerNorm(8, elementwise_affine=False)
        with torch.no_grad():
            self.norm.weight.copy_(torch.tensor([1.0, 1, 1, 20, 1, 1, 1, 1]))   # an outlier channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-2, -1), dim=-1) @ self.v(h)
        y = x + att
        z = self.norm2(y)
        return y + self.down(self.up(z)) + z    # norm2's output also feeds the add: not smoothed


def test_smoothing_is_exact_and_shares_scales_across_qkv() -> None:
    x = (torch.randn(2, 5, 8),)
    model = Block().eval()
    calib = [torch.randn(4, 5, 8) for _ in range(3)]
    gm = trace(model, x, frontend="fx")
    res = run_pass(SmoothQuant(), gm, x, calibration=calib)
    torch.testing.assert_close(outputs(res.graph, x)[0], outputs(model, x)[0], rtol=1e-4, atol=1e-5)
    groups = {g["producer"]: g for g in res.stats["groups"]}
    assert set(groups) == {"norm", "up"}
    assert groups["norm"]["linears"] == ["q", "k", "v"] and groups["up"]["linears"] == ["down"]
    assert groups["norm"]["act_max_after"] < groups["norm"]["act_max_before"] / 2
    assert groups["norm"]["act_outlier_ratio_after"] < groups["norm"]["act_outlier_ratio_before"]
    assert "add" in res.stats["not_smoothed"]["norm2"]
    # one scale for the group: q, k and v columns grew by the same factors
    s = res.graph.get_submodule("q").weight / model.q.weight
    torch.testing.assert_close(res.graph.get_submodule("k").weight / model.k.weight, s)
    # declared exact: the pass manager verifies it against float64
    c = fxc.compile(model, x, "smooth-quant{alpha=0.8}", calibration=calib, target="fx", progress=False)
    assert c.report[-1].status == "ok"


def test_nothing_to_smooth_says_why() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    x = (torch.randn(3, 4),)
    res = SmoothQuant().run(trace(model, x, frontend="fx"), PassContext(x, calibration=[x[0]]))
    assert res.stats["groups"] == [] and any("nothing to smooth" in d.message for d in res.diagnostics)
    with pytest.raises(PipelineError, match="alpha"):
        SmoothQuant(alpha=1.5)


QUANT = "quantize-int8{scheme=tensorrt,observer=minmax}"


def _logits(fn, loader):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return torch.cat([torch.as_tensor(fn(x)) for x, _ in loader])


@pytest.mark.slow
def test_digits_transformer_static_int8_with_and_without_smooth_quant(digits_transformer) -> None:  # type: ignore[no-untyped-def]
    """Static per-tensor INT8 activations (Linears and the activation matmuls, the TensorRT scheme),
    per-channel weights. This transformer has no activation outliers (largest per-channel max about
    1.5x the median), so SmoothQuant has little to repair: both stay within a point of FP32 and the
    smoothed one is no worse in output error."""
    model, data = digits_transformer
    fp32 = accuracy(model, data.test)
    ref = _logits(model, data.test)
    x = (next(iter(data.test))[0][:2],)
    results = {}
    for name, pipe in (("plain", QUANT), ("smooth", f"smooth-quant,{QUANT}")):
        c = fxc.compile(copy.deepcopy(model), x, pipe, calibration=data.calibration, target="fx", progress=False)
        out = _logits(c.graph_module, data.test)
        sqnr = float(10 * torch.log10((ref ** 2).mean() / ((out - ref) ** 2).mean()))
        results[name] = (accuracy(c.graph_module, data.test), sqnr, c)
    print(f"\ndigits transformer: FP32 {fp32:.4f}; static INT8 {results['plain'][0]:.4f} "
          f"({results['plain'][1]:.1f} dB); smooth-quant + static INT8 {results['smooth'][0]:.4f} "
          f"({results['smooth'][1]:.1f} dB)")
    for acc, sqnr, _ in results.values():
        assert fp32 - acc <= 0.01 and sqnr > 25
    assert results["smooth"][1] >= results["plain"][1] - 0.5
    smooth_row = results["smooth"][2].report[1]
    assert smooth_row.name == "smooth-quant" and smooth_row.status == "ok"
    groups = smooth_row.stats["groups"]
    assert len(groups) == 5     # per block: norm1 -> Q/K/V and norm2 -> fc1; the final norm -> head
    assert all(g["act_max_after"] < g["act_max_before"] for g in groups)


class Stack(nn.Module):
    """LayerNorm (affine or not) -> ``fan`` Linears reading it, summed; then Linear -> Linear."""

    def __init__(self, dim: int, fan: int, affine: bool, outliers: list[int], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(dim, elementwise_affine=affine)
        self.heads = nn.ModuleList(nn.Linear(dim, dim) for _ in range(fan))
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, 3)
        with torch.no_grad():
            if affine:
                self.norm.weight[outliers] *= 30
            self.up.weight[[o % (2 * dim) for o in outliers]] *= 30

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.down(self.up(sum(head(h) for head in self.heads)))


@settings(max_examples=20)
@given(st.sampled_from([4, 6, 8]), st.integers(1, 3), st.booleans(), st.lists(st.integers(0, 3), max_size=2),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_smoothing_random_layernorm_linear_stacks_is_exact(dim: int, fan: int, affine: bool, outliers: list[int],
                                                           alpha: float, seed: int) -> None:
    model = Stack(dim, fan, affine, outliers, seed).eval()
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(4, 3, dim, generator=gen) * 2 for _ in range(2)]
    x = (calib[0][:2],)
    c = fxc.compile(model, x, [SmoothQuant(alpha=alpha)], calibration=calib, target="fx", progress=False)
    row = c.report[-1]
    assert row.status in ("ok", "unchanged") and row.name.startswith("smooth-quant")   # verified exact
    groups = {g["producer"]: g for g in row.stats["groups"]}
    assert set(groups) == {"norm", "up"} and len(groups["norm"]["linears"]) == fan
    torch.testing.assert_close(c.graph_module(calib[1]), model(calib[1]), rtol=1e-4, atol=1e-4)
    for g in groups.values():   # the activation/weight balance moved as alpha asks
        if alpha == 1.0:
            assert g["act_max_after"] == pytest.approx(1.0, rel=1e-4)
        if alpha == 0.0:
            assert g["weight_max_after"] == pytest.approx(1.0, rel=1e-4)
