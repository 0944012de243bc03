"""One error-metric implementation (fxcompress.metrics) behind verify.error_metrics and compare."""

from __future__ import annotations

import math

import pytest
import torch

from fxcompress.compare import Tolerance
from fxcompress.compare.rows import layer_metric
from fxcompress.metrics import TensorError, tensor_error, worst
from fxcompress.verify import error_metrics

NAN, INF = math.nan, math.inf


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def same(x: float, y: float) -> bool:
    """Equal up to float64 rounding, NaN equal to NaN."""
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-12)


#: (case, reference, actual, (max_abs, mean_abs, cosine, ref_max))
TABLE = [
    ("equal", t(1, 2), t(1, 2), (0.0, 0.0, 1.0, 2.0)),
    ("NaN in reference", t(NAN, 1), t(1, 1), (NAN, NAN, NAN, NAN)),
    ("NaN in actual", t(1, 1), t(NAN, 1), (NAN, NAN, NAN, 1.0)),
    ("NaN in both, same place", t(NAN, 1), t(NAN, 1), (NAN, NAN, NAN, NAN)),
    ("NaN and inf", t(NAN, 1), t(INF, 1), (NAN, NAN, NAN, NAN)),
    ("inf in reference", t(INF, 1), t(1, 1), (INF, INF, NAN, INF)),
    ("inf in actual", t(1, 1), t(-INF, 1), (INF, INF, NAN, 1.0)),
    ("same inf in both", t(INF, 1), t(INF, 1), (INF, INF, NAN, INF)),
    ("all zero, both", t(0, 0), t(0, 0), (0.0, 0.0, 1.0, 0.0)),
    ("all-zero reference", t(0, 0), t(3, 4), (4.0, 3.5, 0.0, 0.0)),
    ("all-zero actual", t(3, 4), t(0, 0), (4.0, 3.5, 0.0, 4.0)),
    ("empty", t(), t(), (0.0, 0.0, 1.0, 0.0)),
    ("opposite", t(1, 2), t(-1, -2), (4.0, 3.0, -1.0, 2.0)),
]


@pytest.mark.parametrize("case,ref,act,expected", TABLE, ids=[row[0] for row in TABLE])
def test_tensor_error_table(case: str, ref: torch.Tensor, act: torch.Tensor,
                            expected: tuple[float, float, float, float]) -> None:
    got = tensor_error(ref, act)
    assert all(same(g, e) for g, e in zip((got.max_abs, got.mean_abs, got.cosine, got.ref_max), expected)), got


@pytest.mark.parametrize("case,ref,act,expected", TABLE, ids=[row[0] for row in TABLE])
def test_both_callers_follow_the_table(case: str, ref: torch.Tensor, act: torch.Tensor,
                                       expected: tuple[float, float, float, float]) -> None:
    max_abs, mean_abs, cosine, ref_max = expected
    m = error_metrics(ref, act)
    assert same(m.max_abs, max_abs) and same(m.mean_abs, mean_abs) and same(m.cosine, cosine)
    layer = layer_metric([(ref, act)], Tolerance(), "x")
    assert same(layer.max_abs, max_abs) and same(layer.cosine, cosine) and same(layer.ref_max, ref_max)
    assert layer.drift == (max_abs != 0)


def test_worst_lets_nan_win_in_any_position() -> None:
    ok, bad = TensorError(1.0, 0.5, 0.9, 2.0), TensorError(NAN, NAN, NAN, 1.0)
    for errors in ([ok, bad], [bad, ok]):
        w = worst(errors)
        assert math.isnan(w.max_abs) and math.isnan(w.cosine) and w.ref_max == 2.0
    for refs in ((t(NAN), t(1)), (t(1), t(NAN))):
        assert math.isnan(error_metrics(refs, (t(1), t(1))).max_abs)


def _old_error_metrics(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> tuple[float, float, float]:
    """verify.error_metrics before it used fxcompress.metrics (finite inputs)."""
    max_abs, mean_abs, cosine = 0.0, 0.0, 1.0
    for r, a in zip(refs, outs):
        r, a = r.double(), a.double()
        diff = (r - a).abs()
        max_abs, mean_abs = max(max_abs, float(diff.max())), max(mean_abs, float(diff.mean()))
        rn, an = r.flatten(), a.flatten()
        denom = float(rn.norm() * an.norm())
        cosine = min(cosine, float(rn @ an) / denom if denom > 0 else (1.0 if float(diff.max()) == 0 else 0.0))
    return max_abs, mean_abs, cosine


def _old_layer_metric(r: torch.Tensor, a: torch.Tensor) -> tuple[float, float, float]:
    """compare._metric before it used fxcompress.metrics (finite inputs)."""
    r, a = r.double().flatten(), a.double().flatten()
    max_abs = float((r - a).abs().max())
    denom = float(r.norm() * a.norm())
    cosine = float(r @ a) / denom if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return max_abs, cosine, float(r.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_finite_values_are_what_both_implementations_reported(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    refs = [torch.randn(4, 10, generator=g).to(dtype), torch.randn(3, 5, 7, generator=g).to(dtype), torch.zeros(6)]
    outs = [r + (1e-3 * torch.randn(r.shape, generator=g)).to(dtype) for r in refs[:2]] + [torch.zeros(6)]
    outs[0][1] = refs[0][1]  # an exactly equal row
    m = error_metrics(tuple(refs), tuple(outs))
    assert (m.max_abs, m.mean_abs, m.cosine) == _old_error_metrics(refs, outs)
    for r, a in zip(refs, outs):
        layer = layer_metric([(r, a)], Tolerance(), "x")
        assert (layer.max_abs, layer.cosine, layer.ref_max) == _old_layer_metric(r, a)
