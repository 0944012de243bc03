"""Observers on known distributions: ranges, streaming with bounded memory, merging, qparams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxcompress.errors import PassError
from passes.quantize.observers import (INT8, UINT8, EntropyObserver, HistogramObserver, MinMaxObserver,
                                       MovingAverageMinMaxObserver, MSEObserver, PercentileObserver,
                                       entropy_threshold, make_observer, per_channel_absmax,
                                       per_channel_mse_absmax, qparams)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_minmax_scale_of_uniform_tensor() -> None:
    x = torch.rand(10000, generator=_gen()) * 6 - 3
    obs = MinMaxObserver()
    for chunk in x.split(1000):
        obs.observe(chunk)
    lo, hi = obs.range()
    assert lo == pytest.approx(float(x.min())) and hi == pytest.approx(float(x.max()))
    scale, zp = obs.qparams(INT8)
    assert zp == 0
    assert scale == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    scale_u, zp_u = obs.qparams(UINT8)
    assert scale_u == pytest.approx((float(x.max()) - float(x.min())) / 255, rel=1e-6)
    assert zp_u == round(-float(x.min()) / scale_u)


def test_asymmetric_grid_of_nonnegative_tensor_has_zero_point_zero() -> None:
    x = torch.relu(torch.randn(5000, generator=_gen(1)))
    obs = MinMaxObserver()
    obs.observe(x)
    scale, zp = obs.qparams(UINT8)
    assert zp == 0 and scale == pytest.approx(float(x.max()) / 255, rel=1e-6)


def test_percentile_clips_an_outlier() -> None:
    x = torch.randn(20000, generator=_gen(2))
    x[123] = 1000.0
    mm, pc = MinMaxObserver(), PercentileObserver(99.9)
    for o in (mm, pc):
        o.observe(x)
    assert mm.range()[1] == 1000.0
    lo, hi = pc.range()
    assert 2.5 < hi < 4.5 and -4.5 < lo < -2.5
    assert pc.qparams(INT8)[0] < 5 / 127


def test_percentile_matches_numpy_quantile_within_a_bin() -> None:
    x = torch.randn(50000, generator=_gen(3)).abs()
    pc = PercentileObserver(99.0, two_sided=False)
    pc.observe(x)
    expected = float(np.quantile(x.numpy(), 0.99))
    assert abs(pc.range()[1] - expected) <= pc.bin_width + 1e-9


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    out = p.copy()
    zeros = p == 0
    if zeros.any() and not zeros.all():
        out[zeros] = eps
        out[~zeros] -= eps * zeros.sum() / (~zeros).sum()
    return out


def _reference_entropy(values: np.ndarray, bins: int, amax: float, levels: int = 128) -> float:
    """TensorRT's entropy calibration written out plainly (numpy histogram, python loops)."""
    hist, edges = np.histogram(np.abs(values), bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    hist[0] = hist[1]
    width = edges[1] - edges[0]
    best, best_kl = bins, math.inf
    for i in range(levels, bins + 1):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()
        src = hist[:i]
        merged = i // levels
        q = np.zeros(i)
        for j in range(levels):
            start = j * merged
            stop = i if j == levels - 1 else start + merged
            nonzero = src[start:stop] > 0
            if nonzero.sum():
                q[start:stop] = np.where(nonzero, src[start:stop].sum() / nonzero.sum(), 0.0)
        p, qn = _smooth(ref), _smooth(q)
        p, qn = p / p.sum(), qn / qn.sum()
        kl = float((p * np.log(p / qn)).sum())
        if kl < best_kl:
            best, best_kl = i, kl
    return best * width


def test_entropy_threshold_within_a_bin_of_reference() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = torch.distributions.StudentT(3.0).sample((30000,)) * 0.5
    x = x[x.abs() < 8.0]
    x[0] = 8.0  # amax exactly the observer's power-of-two bound: both histograms share one grid
    obs = EntropyObserver(bins=512)
    for chunk in x.split(7000):
        obs.observe(chunk)
    assert obs.bound == 8.0
    ref = _reference_entropy(x.numpy(), 512, 8.0)
    lo, hi = obs.range()
    assert abs(hi - ref) <= obs.bin_width + 1e-9
    assert lo == max(-hi, float(x.min()))


def test_entropy_clips_a_lone_outlier() -> None:
    x = torch.randn(100000, generator=_gen(12))
    x[0] = 100.0
    obs = EntropyObserver()
    obs.observe(x)
    assert 3.0 < obs.range()[1] < 20.0  # not 100: the outlier is clipped


def test_entropy_threshold_ignores_zero_spike() -> None:
    img = (torch.rand(20000, generator=_gen(5)) > 0.6) * torch.rand(20000, generator=_gen(6))
    obs = make_observer("entropy", spec=UINT8)
    obs.observe(img)
    lo, hi = obs.range()
    assert lo == 0.0 and 0.9 < hi <= float(img.max()) + obs.bin_width


def test_entropy_threshold_of_narrow_histogram_is_its_support() -> None:
    hist = torch.zeros(2048, dtype=torch.float64)
    hist[:50] = 1.0
    assert entropy_threshold(hist, 0.01) == pytest.approx(0.5)


def test_histogram_growth_is_exact_and_bounded() -> None:
    g = _gen(7)
    small, big = torch.randn(1000, generator=g) * 0.1, torch.randn(1000, generator=g) * 5
    streamed, whole = HistogramObserver(256), HistogramObserver(256)
    streamed.observe(small)
    streamed.observe(big)
    whole.observe(torch.cat([small, big]))
    assert streamed.bound == whole.bound
    assert torch.equal(streamed.hist, whole.hist)
    for _ in range(20):
        streamed.observe(torch.randn(500, generator=g) * 50)
    assert streamed.hist.numel() == 512
    assert float(streamed.hist.sum()) == 2000 + 20 * 500


@pytest.mark.parametrize("kind", ["minmax", "percentile", "mse", "entropy"])
def test_merge_equals_one_observer_over_all_batches(kind: str) -> None:
    g = _gen(8)
    a, b = torch.randn(3000, generator=g), torch.randn(3000, generator=g) * 3
    left, right, whole = (make_observer(kind) for _ in range(3))
    left.observe(a)
    right.observe(b)
    whole.observe(a)
    whole.observe(b)
    left.merge(right.state())
    assert left.range() == pytest.approx(whole.range())
    if isinstance(whole, HistogramObserver):
        assert torch.equal(left.hist, whole.hist)


def test_state_tensors_can_be_summed_like_an_all_reduce() -> None:
    g = _gen(9)
    parts = [torch.randn(2000, generator=g) * s for s in (1.0, 1.5)]
    obs = [HistogramObserver(128) for _ in parts]
    for o, p in zip(obs, parts):
        o.observe(p)
    whole = HistogramObserver(128)
    whole.observe(torch.cat(parts))
    target = max(int(o.log2_range) for o in obs)
    for o in obs:
        o._grow_to(target)
    assert torch.equal(obs[0].state()["hist"] + obs[1].state()["hist"], whole.hist)


def test_moving_average_follows_recent_batches() -> None:
    obs = MovingAverageMinMaxObserver(momentum=0.5)
    obs.observe(torch.tensor([-1.0, 1.0]))
    obs.observe(torch.tensor([-3.0, 3.0]))
    assert obs.range() == pytest.approx((-2.0, 2.0))


def test_mse_clips_a_heavy_tail_but_not_a_uniform() -> None:
    g = _gen(10)
    uniform = torch.rand(20000, generator=g) * 2 - 1
    o = MSEObserver(spec=INT8)
    o.observe(uniform)
    assert o.range()[1] == pytest.approx(float(uniform.max()), rel=0.02)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        laplace = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    o2 = MSEObserver(spec=INT8)
    o2.observe(laplace)
    assert 0.5 * float(laplace.max()) < o2.range()[1] < 0.95 * float(laplace.max())


def test_empty_observer_refuses_qparams() -> None:
    with pytest.raises(PassError, match="observed no data"):
        MinMaxObserver().qparams(INT8)


def test_unknown_observer_lists_choices() -> None:
    with pytest.raises(PassError, match="minmax"):
        make_observer("kl-magic")


def test_per_channel_ranges() -> None:
    w = torch.zeros(3, 2, 2)
    w[0, 0, 0], w[1, 1, 1], w[2, 0, 1] = 1.0, -2.0, 0.5
    assert per_channel_absmax(w, 0).tolist() == [1.0, 2.0, 0.5]

def test_per_channel_mse_threshold_is_the_best_candidate() -> None:
    """Against a plain search: each channel's threshold is one of the candidates amax*k/50 (k = 11..50)
    and no candidate has a smaller squared rounding + clipping error; on a coarse 4-bit grid every
    channel's tail is clipped."""
    w = torch.randn(4, 200, generator=_gen(11))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        w[2] = torch.distributions.Laplace(0.0, 1.0).sample((200,))
    amaxes = w.abs().amax(1)
    for qmax in (127, 7):
        got = per_channel_mse_absmax(w, 0, qmax)

        def err(row: torch.Tensor, t: float) -> float:
            s = t / qmax
            return float(((torch.clamp(torch.round(row / s), -qmax, qmax) * s - row) ** 2).sum())

        for c in range(4):
            amax = float(amaxes[c])
            candidates = [amax * k / 50 for k in range(11, 51)]
            assert min(abs(float(got[c]) - t) for t in candidates) < 1e-5 * amax, (qmax, c)
            assert err(w[c], float(got[c])) <= min(err(w[c], t) for t in candidates) * (1 + 1e-5), (qmax, c)
        assert torch.equal(per_channel_mse_absmax(w.t(), 1, qmax), got)
    assert bool((got < amaxes).all())


@settings(max_examples=15, deadline=None)
@given(lo=st.floats(-100, 0), span=st.floats(1e-3, 200))
def test_qparams_grids_contain_the_range_and_zero(lo: float, span: float) -> None:
    hi = lo + span
    scale, zp = qparams(lo, hi, UINT8)
    assert 0 <= zp <= 255
    assert (0 - zp) * scale <= min(lo, 0.0) + scale and (255 - zp) * scale >= max(hi, 0.0) - scale
    s8, z8 = qparams(lo, hi, INT8)
    assert z8 == 0 and 127 * s8 == pytest.approx(max(-min(lo, 0.0), max(hi, 0.0)), rel=1e-5)
