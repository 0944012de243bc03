"""Streaming range observers for INT8 calibration.

Every observer sees tensors batch by batch and keeps bounded state: min/max, or a histogram of
fixed size whose range grows by powers of two (bins merge pairwise, so growth is exact and two
histograms of the same size always share a grid). State is a dict of tensors (``state()``) that
can be merged (``merge``) or all-reduced across processes, so distributed calibration is a sum /
min / max of these tensors.

``range()`` gives the clipping range ``(lo, hi)`` the observer chose; ``qparams`` turns a range
into scale and zero point for symmetric INT8 (zero point 0) or asymmetric UINT8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import numpy as np
import torch

from fxcompress.errors import PassError

#: the activation observers, by name (a pass option's type)
ObserverName = Literal["minmax", "moving-average", "percentile", "mse", "entropy"]
OBSERVERS: tuple[str, ...] = get_args(ObserverName)


@dataclass(frozen=True)
class QSpec:
    """An integer grid: dtype name, quantized range and whether the zero point is fixed at 0."""

    dtype: str = "int8"
    qmin: int = -128
    qmax: int = 127
    symmetric: bool = True

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin


INT8 = QSpec("int8", -128, 127, True)
UINT8 = QSpec("uint8", 0, 255, False)


def qparams(lo: float, hi: float, spec: QSpec) -> tuple[float, int]:
    """Scale (a float32 value) and zero point for the range ``[lo, hi]`` on ``spec``'s grid.

    Symmetric: scale = max(|lo|, |hi|) / qmax, zero point 0. Asymmetric: the range is widened to
    contain 0 (so zero is exact: padding, ReLU) and the zero point is rounded onto the grid."""
    lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
    if spec.symmetric:
        amax = max(-lo, hi)
        scale = amax / spec.qmax if amax > 0 else 1.0
        return _f32(max(scale, 1e-12)), 0
    span = hi - lo
    if span <= 0:
        return 1.0, spec.qmin if spec.qmin >= 0 else 0
    scale = _f32(max(span / spec.levels, 1e-12))
    zp = int(round(spec.qmin - lo / scale))
    return scale, max(spec.qmin, min(spec.qmax, zp))


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


class Observer:
    """Base class: ``observe`` batches, then read ``range()``."""

    kind: ClassVar[str] = ""

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    @property
    def seen(self) -> bool:
        return bool(self.state()["count"].item() > 0)

    def qparams(self, spec: QSpec) -> tuple[float, int]:
        if not self.seen:
            raise PassError(f"{type(self).__name__} has observed no data: calibration never reached this tensor")
        lo, hi = self.range()
        return qparams(lo, hi, spec)


class MinMaxObserver(Observer):
    """Running min and max (exact, cheap; sensitive to outliers)."""

    kind = "minmax"

    def __init__(self) -> None:
        self.lo = torch.tensor(math.inf)
        self.hi = torch.tensor(-math.inf)
        self.count = torch.tensor(0)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x.float())
        self.lo = torch.minimum(self.lo, lo.cpu())
        self.hi = torch.maximum(self.hi, hi.cpu())
        self.count += 1

    def range(self) -> tuple[float, float]:
        return float(self.lo), float(self.hi)

    def state(self) -> dict[str, torch.Tensor]:
        return {"lo": self.lo.clone(), "hi": self.hi.clone(), "count": self.count.clone()}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        self.lo = torch.minimum(self.lo, state["lo"])
        self.hi = torch.maximum(self.hi, state["hi"])
        self.count = self.count + state["count"]


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (``momentum`` weight of a new batch).

    Merging averages two observers weighted by their batch counts."""

    kind = "moving-average"

    def __init__(self, momentum: float = 0.01) -> None:
        super().__init__()
        self.momentum = momentum

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (v.cpu() for v in torch.aminmax(x.float()))
        if self.count == 0:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)
        self.count += 1

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        n1, n2 = float(self.count), float(state["count"])
        if n2 == 0:
            return
        if n1 == 0:
            self.lo, self.hi, self.count = state["lo"].clone(), state["hi"].clone(), state["count"].clone()
            return
        self.lo = (self.lo * n1 + state["lo"] * n2) / (n1 + n2)
        self.hi = (self.hi * n1 + state["hi"] * n2) / (n1 + n2)
        self.count = self.count + state["count"]


class HistogramObserver(Observer):
    """A signed histogram on ``[-R, R]`` with ``bins`` bins per side, anchored at 0.

    ``R`` is a power of two; when a batch exceeds it, ``R`` doubles and neighbouring bins merge
    in pairs, so memory stays ``2 * bins`` counts whatever the number of batches. The exact
    min and max are kept alongside. Subclasses choose the range from the histogram."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16 or bins & (bins - 1):
            raise PassError(f"histogram observer: bins must be a power of two >= 16; got {bins}")
        self.bins = bins
        self.hist = torch.zeros(2 * bins, dtype=torch.float64)
        self.log2_range = torch.tensor(-1000)
        self.lo = torch.tensor(math.inf)
        self.hi = torch.tensor(-math.inf)
        self.count = torch.tensor(0)

    @property
    def bound(self) -> float:
        return 2.0 ** int(self.log2_range)

    @property
    def bin_width(self) -> float:
        return self.bound / self.bins

    def _grow_to(self, log2_range: int) -> None:
        steps = log2_range - int(self.log2_range)
        if steps <= 0:
            return
        if self.hist.sum() > 0:
            factor = 2 ** min(steps, int(math.log2(self.bins)) + 1)
            h = self.hist.view(2, self.bins)
            neg, pos = h[0].flip(0), h[1]
            if factor > self.bins:
                neg_new, pos_new = torch.zeros(self.bins, dtype=h.dtype), torch.zeros(self.bins, dtype=h.dtype)
                neg_new[0], pos_new[0] = neg.sum(), pos.sum()
            else:
                neg_new = torch.zeros(self.bins, dtype=h.dtype)
                pos_new = torch.zeros(self.bins, dtype=h.dtype)
                neg_new[: self.bins // factor] = neg.view(-1, factor).sum(1)
                pos_new[: self.bins // factor] = pos.view(-1, factor).sum(1)
            self.hist = torch.cat([neg_new.flip(0), pos_new])
        self.log2_range = torch.tensor(log2_range)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        lo, hi = (v.cpu() for v in torch.aminmax(x))
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise PassError("calibration produced non-finite activations (inf/nan); check the calibration data")
        amax = max(float(-lo), float(hi), 1e-30)
        need = math.ceil(math.log2(amax))
        if 2.0 ** need < amax:
            need += 1
        if self.count == 0 or self.hist.sum() == 0:
            self.log2_range = torch.tensor(need)
        else:
            self._grow_to(need)
        bound = self.bound
        idx = torch.floor(x * (self.bins / bound)).long().clamp_(-self.bins, self.bins - 1) + self.bins
        self.hist += torch.bincount(idx.cpu(), minlength=2 * self.bins).to(torch.float64)
        self.lo = torch.minimum(self.lo, lo)
        self.hi = torch.maximum(self.hi, hi)
        self.count += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {"hist": self.hist.clone(), "log2_range": self.log2_range.clone(), "lo": self.lo.clone(),
                "hi": self.hi.clone(), "count": self.count.clone()}

    def merge(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["count"]) == 0:
            return
        other = type(self).__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.hist, other.log2_range = state["hist"].clone(), state["log2_range"].clone()
        if int(self.count) == 0:
            self.hist, self.log2_range = other.hist, other.log2_range
        else:
            target = max(int(self.log2_range), int(other.log2_range))
            self._grow_to(target)
            HistogramObserver._grow_to(other, target)
            self.hist = self.hist + other.hist
        self.lo = torch.minimum(self.lo, state["lo"])
        self.hi = torch.maximum(self.hi, state["hi"])
        self.count = self.count + state["count"]

    def edges(self) -> torch.Tensor:
        """Bin edges, ``2 * bins + 1`` values from ``-R`` to ``R``."""
        return torch.linspace(-self.bound, self.bound, 2 * self.bins + 1, dtype=torch.float64)

    def abs_hist(self) -> torch.Tensor:
        """Histogram of ``|x|`` on ``[0, R]`` (``bins`` bins)."""
        h = self.hist.view(2, self.bins)
        return h[1] + h[0].flip(0)

    def _clip(self, lo: float, hi: float) -> tuple[float, float]:
        return max(lo, float(self.lo)), min(hi, float(self.hi))


class PercentileObserver(HistogramObserver):
    """Clip at a percentile of the distribution (default 99.99): one outlier does not set the range.

    For a range with both signs the clip is taken on ``|x|`` (symmetric grids) or on each tail
    separately (``two_sided``)."""

    kind = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048, two_sided: bool = False) -> None:
        super().__init__(bins)
        if not 0 < percentile <= 100:
            raise PassError(f"percentile observer: percentile must be in (0, 100]; got {percentile}")
        self.percentile = percentile
        self.two_sided = two_sided

    def range(self) -> tuple[float, float]:
        q = self.percentile / 100.0
        if self.two_sided:
            cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
            edges = self.edges()
            lo_i = int(torch.searchsorted(cdf, torch.tensor(1 - q, dtype=cdf.dtype)))
            hi_i = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)))
            return self._clip(float(edges[lo_i]), float(edges[min(hi_i + 1, len(edges) - 1)]))
        h = self.abs_hist()
        cdf = torch.cumsum(h, 0) / h.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(q, dtype=cdf.dtype)))
        t = (min(i, self.bins - 1) + 1) * self.bin_width
        return self._clip(-t, t)


class MSEObserver(HistogramObserver):
    """The clipping range that minimises the expected squared quantization error on the histogram.

    Candidates shrink the observed range by factors in ``(0, 1]``; for each, the error of every
    bin (rounding noise inside the range, clipping error outside) is summed. ``spec`` is the grid
    the range is searched for (the number of levels matters)."""

    kind = "mse"

    def __init__(self, bins: int = 2048, spec: QSpec = INT8, candidates: int = 100) -> None:
        super().__init__(bins)
        self.spec = spec
        self.candidates = candidates

    def range(self) -> tuple[float, float]:
        centers = (self.edges()[:-1] + self.edges()[1:]) / 2
        lo0, hi0 = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        best, best_err = (lo0, hi0), math.inf
        total = self.hist.sum()
        for k in range(self.candidates, 0, -1):
            a = k / self.candidates
            lo, hi = lo0 * a, hi0 * a
            scale, zp = qparams(lo, hi, self.spec)
            qlo, qhi = (self.spec.qmin - zp) * scale, (self.spec.qmax - zp) * scale
            clipped = centers.clamp(qlo, qhi)
            err = torch.where(centers == clipped, torch.full_like(centers, scale * scale / 12.0),
                              (centers - clipped) ** 2)
            e = float((err * self.hist).sum() / total)
            if e < best_err:
                best, best_err = (lo, hi), e
        return best


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: the threshold on ``|x|`` whose quantized distribution is
    closest (Kullback-Leibler) to the reference distribution clipped at that threshold.

    Runs on the observer's ``|x|`` histogram with 128 quantized bins (256 when the grid is
    asymmetric and the tensor never negative)."""

    kind = "entropy"

    def __init__(self, bins: int = 2048, spec: QSpec = INT8) -> None:
        super().__init__(bins)
        self.spec = spec

    def range(self) -> tuple[float, float]:
        one_sided = not self.spec.symmetric and float(self.lo) >= 0
        levels = (self.spec.levels + 1) // (1 if one_sided else 2)
        t = entropy_threshold(self.abs_hist(), self.bin_width, levels)
        return self._clip(-t, t)


def entropy_threshold(hist: torch.Tensor, bin_width: float, levels: int = 128) -> float:
    """KL-optimal clipping threshold for a histogram of ``|x|`` (TensorRT's entropy calibrator).

    For every candidate number of bins ``i`` (``levels`` .. all), the reference distribution P is
    the first ``i`` bins with the tail folded into the last; Q merges them into ``levels`` groups
    of ``i // levels`` bins (the remainder joins the last group) and spreads each group's mass
    evenly over its non-empty bins. The threshold is the right edge of the ``i`` with the smallest
    KL(P || Q), both smoothed so empty bins cost ``eps`` instead of infinity (as MXNet's
    calibrator does; otherwise a lone outlier makes every clipped candidate infinite). As in
    TensorRT's and pytorch-quantization's calibrators, the first bin takes its neighbour's count,
    so a spike of exact zeros (ReLU outputs, image padding) does not dominate the divergence. Wide histograms are searched coarse-to-fine (every ``stride``-th candidate,
    then each one around the best), which keeps calibration of many tensors fast."""
    h = hist.detach().to(torch.float64).cpu().numpy().copy()
    if len(h) > 1:
        h[0] = h[1]
    nonzero = np.nonzero(h)[0]
    if len(nonzero) == 0:
        return bin_width
    last = int(nonzero[-1]) + 1
    if last <= levels:
        return last * bin_width
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    stride = max(1, (last - levels) // 384)
    best_i, best_kl = _kl_search(h, tail, levels, range(levels, last + 1, stride), last, math.inf)
    if stride > 1:  # coarse pass, then every candidate around the best one
        lo, hi = max(levels, best_i - stride), min(last, best_i + stride)
        best_i, best_kl = _kl_search(h, tail, levels, range(lo, hi + 1), best_i, best_kl)
    return best_i * bin_width


def _kl_search(h: np.ndarray, tail: np.ndarray, levels: int, candidates: range, best_i: int,
               best_kl: float) -> tuple[int, float]:
    for i in candidates:
        src = h[:i]
        p = src.copy()
        p[-1] += tail[i]
        nz = src > 0
        group = np.minimum(np.arange(i) // (i // levels), levels - 1)
        sums = np.bincount(group, weights=src, minlength=levels)
        counts = np.bincount(group, weights=nz, minlength=levels)
        q = np.where(nz, sums[group] / np.maximum(counts[group], 1), 0.0)
        if q.sum() <= 0:
            continue
        pn, qn = _smooth(p), _smooth(q)
        pn, qn = pn / pn.sum(), qn / qn.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i, best_kl


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Move ``eps`` counts onto every empty bin of a count histogram, taken evenly from the others."""
    zeros = p == 0
    n_zero = int(zeros.sum())
    if n_zero == 0 or n_zero == p.size:
        return p
    return p + np.where(zeros, eps, -eps * n_zero / (p.size - n_zero))


def make_observer(kind: str, *, percentile: float = 99.99, spec: QSpec = INT8, bins: int = 2048) -> Observer:
    """The activation observer called ``kind`` (one of ``OBSERVERS``)."""
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "moving-average":
        return MovingAverageMinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile, bins, two_sided=not spec.symmetric)
    if kind == "mse":
        return MSEObserver(bins, spec)
    if kind == "entropy":
        return EntropyObserver(bins, spec)
    raise PassError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")


def per_channel_absmax(w: torch.Tensor, axis: int) -> torch.Tensor:
    """``max |w|`` over every axis but ``axis`` (the per-channel range of a weight)."""
    dims = [d for d in range(w.dim()) if d != axis]
    return w.detach().abs().amax(dim=dims) if dims else w.detach().abs()


def per_channel_mse_absmax(w: torch.Tensor, axis: int, qmax: int, candidates: int = 50) -> torch.Tensor:
    """Per-channel clipping threshold minimising the squared rounding + clipping error of ``w``."""
    w = w.detach().float().movedim(axis, 0).flatten(1)
    amax = w.abs().amax(1).clamp(min=1e-12)
    best = amax.clone()
    best_err = torch.full_like(amax, math.inf)
    for k in range(candidates, candidates // 5, -1):
        t = amax * (k / candidates)
        s = (t / qmax).unsqueeze(1)
        q = torch.clamp(torch.round(w / s), -qmax, qmax) * s
        err = ((q - w) ** 2).sum(1)
        better = err < best_err
        best = torch.where(better, t, best)
        best_err = torch.where(better, err, best_err)
    return best
