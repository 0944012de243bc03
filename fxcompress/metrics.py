"""The error between a reference tensor and an actual one, computed one way for every caller:
``verify.error_metrics`` (a model's outputs, for reports and ``NumericCheck``) and
``fxcompress.compare`` (per layer, across backends).

Both tensors are flattened and compared in float64 on the CPU; they must have the same number of
elements.

* ``max_abs`` / ``mean_abs``: the largest / mean ``|reference - actual|``.
* ``cosine``: ``<r, a> / (|r| |a|)``; when a norm is zero, 1.0 if the tensors are equal (both all
  zero) and 0.0 otherwise.
* ``ref_max``: the largest ``|reference|``.
* Empty tensors agree: ``max_abs = mean_abs = 0``, ``cosine = 1``, ``ref_max = 0``.

Non-finite values make a pair incomparable, and the result says so in a way no threshold test can
mistake for agreement: a NaN in either tensor gives ``max_abs = mean_abs = cosine = NaN``; an
infinity in either tensor (and no NaN) gives ``max_abs = mean_abs = inf`` and ``cosine = NaN``,
also where both tensors hold the same infinity (an overflowing layer is reported, not excused).
``ref_max`` is the plain ``max|reference|`` (NaN or inf when the reference holds one). Over several
tensors, ``worst`` keeps the largest errors and the lowest cosine, and a NaN wins over any number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

__all__ = ["AGREE", "TensorError", "tensor_error", "worst"]


@dataclass(frozen=True)
class TensorError:
    """How far one tensor is from its reference (see the module doc for the rules)."""

    max_abs: float
    mean_abs: float
    cosine: float
    ref_max: float


#: what empty tensors (and no tensors at all) give
AGREE = TensorError(0.0, 0.0, 1.0, 0.0)


def tensor_error(reference: torch.Tensor, actual: torch.Tensor) -> TensorError:
    """The error of ``actual`` against ``reference`` (same number of elements)."""
    r = reference.detach().to("cpu", torch.float64).flatten()
    a = actual.detach().to("cpu", torch.float64).flatten()
    if r.numel() == 0:
        return AGREE
    ref_max = float(r.abs().max())
    if bool(torch.isnan(r).any() or torch.isnan(a).any()):
        return TensorError(math.nan, math.nan, math.nan, ref_max)
    if bool(torch.isinf(r).any() or torch.isinf(a).any()):
        return TensorError(math.inf, math.inf, math.nan, ref_max)
    diff = (r - a).abs()
    max_abs = float(diff.max())
    denom = float(r.norm() * a.norm())
    if denom > 0:
        cosine = float(r @ a) / denom
    else:
        cosine = 1.0 if max_abs == 0 else 0.0
    return TensorError(max_abs, float(diff.mean()), cosine, ref_max)


def worst(errors: Iterable[TensorError]) -> TensorError:
    """The worst of several errors: largest ``max_abs``/``mean_abs``/``ref_max``, lowest ``cosine``;
    NaN when any of them is NaN. No errors at all: the empty-tensor result."""
    errors = list(errors)
    if not errors:
        return AGREE
    return TensorError(_nan_or(max, [e.max_abs for e in errors]), _nan_or(max, [e.mean_abs for e in errors]),
                       _nan_or(min, [e.cosine for e in errors]), _nan_or(max, [e.ref_max for e in errors]))


def _nan_or(pick: Callable[[list[float]], float], values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else pick(values)
