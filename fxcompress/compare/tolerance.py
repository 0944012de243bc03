"""When a layer counts as drifted between two stages (``Tolerance``), and the per-layer metric
judged by it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Tolerance:
    """When a layer counts as drifted: ``cosine < min_cosine`` or
    ``max_abs > max_abs_rel * max(1, |ref|max)``.

    Defaults: fp32 backends agree with torch to ~1e-6 relative per layer, so ``max_abs_rel=1e-3``
    leaves three orders of magnitude for kernel differences while a wrong weight, a bad rewrite or
    fp16 rounding crosses it; ``min_cosine=0.999`` (a relative L2 error of about 4.5%) catches a
    layer whose direction changed even when its scale is tiny. The cosine test is not applied
    when ``max_abs <= noise * max(1, |ref|max)``: both tensors are then equal up to float noise,
    and the cosine of near-zero tensors means nothing. A NaN or infinite error always drifts.

    Q/DQ graphs: a DequantizeLinear output may differ by ``quant_steps`` quantization steps (its
    scale): when the input of a QuantizeLinear lies on a rounding boundary, float noise upstream
    flips it by one step in one backend and not the other. The flip then propagates: the next
    Conv/MatMul differs by about ``step * sum|w|``, which exceeds the fp32 default. Measured with
    the ``int8`` recipe on the zoo's resnet_basic and inverted_residual (three calibrations each,
    ORT vs FX): worst max abs 1.2e-2 x max(1,|ref|max), lowest cosine 0.99999. Compare INT8 graphs
    with ``Tolerance(max_abs_rel=5e-2)`` (``--tolerance abs=5e-2``); the cosine test still holds.
    """

    min_cosine: float = 0.999
    max_abs_rel: float = 1e-3
    noise: float = 1e-6
    quant_steps: float = 1.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise InputError(f"Tolerance.min_cosine must be in [-1, 1], got {self.min_cosine}")
        for name in ("max_abs_rel", "noise", "quant_steps"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise InputError(f"Tolerance.{name} must be a finite number >= 0, got {value}")

    def abs_limit(self, ref_max: float) -> float:
        """The largest max-abs error allowed for a reference whose largest magnitude is ``ref_max``."""
        return self.max_abs_rel * max(1.0, ref_max)

    def drifts(self, max_abs: float, cosine: float, ref_max: float, step: float = 0.0) -> bool:
        """Whether a layer drifted; ``step`` is the quantization step of a DequantizeLinear output."""
        if not math.isfinite(max_abs) or math.isnan(cosine):
            return True
        if max_abs > max(self.abs_limit(ref_max), self.quant_steps * step + self.noise * max(1.0, ref_max)):
            return True
        return max_abs > self.noise * max(1.0, ref_max) and cosine < self.min_cosine

    @classmethod
    def parse(cls, text: str) -> "Tolerance":
        """``"cosine=0.99,abs=1e-2"`` (any of ``cosine``, ``abs``, ``noise``, ``steps``), or a bare
        number for ``abs`` (the max-abs limit relative to ``max(1, |ref|max)``)."""
        keys = {"cosine": "min_cosine", "abs": "max_abs_rel", "noise": "noise", "steps": "quant_steps"}
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, raw = part.partition("=")
            if not sep:
                key, raw = "abs", key
            key = key.strip().lower()
            if key not in keys:
                raise InputError(f"tolerance {text!r}: unknown key {key!r}; use cosine=..., abs=..., "
                                 "noise=..., steps=... (e.g. 'cosine=0.999,abs=1e-3')")
            try:
                values[keys[key]] = float(raw)
            except ValueError:
                raise InputError(f"tolerance {text!r}: {key}={raw!r} is not a number") from None
        if not values:
            raise InputError(f"tolerance {text!r}: give cosine=..., abs=... or a number")
        return cls(**values)

    def __str__(self) -> str:
        steps = f" (Q/DQ outputs: or {self.quant_steps:g} step)" if self.quant_steps else ""
        return f"cosine < {self.min_cosine:g} or max abs > {self.max_abs_rel:g}*max(1,|ref|max){steps}"
