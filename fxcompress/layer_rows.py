"""``PassLayerRow``: one row of a pass's per-layer table, typed so reports draw it without knowing the pass.

A pruning pass fills ``before``/``after`` (channels, heads, non-zero parameters per layer), a
quantization pass ``precision``, an analysis pass a ranked error in ``metrics``. Not to be confused
with ``fxcompress.stats.LayerStats``, which the framework measures on any graph, nor with
``fxcompress.compare.LayerRow``, one layer's error across backends: these are the facts only the
pass knows (what it kept, chose, or measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .errors import InputError

__all__ = ["PassLayerRow", "Worse"]

#: which way a metric is worse: ``"higher"`` (an error), ``"lower"`` (a similarity), ``""`` (neither)
Worse = Literal["", "higher", "lower"]


@dataclass(frozen=True)
class PassLayerRow:
    """What a pass did to, or measured on, one layer.

    ``layer`` is a module path or node name; ``unit`` says what ``before``/``after`` count
    ("channels", "heads", "non-zero params", "bytes"); ``precision`` is the number format the pass
    chose ("int8", "float", "int4"); ``metrics`` are per-layer measurements, of which ``key_metric``
    is the one a report plots, worse in the direction ``worse``; ``note`` says why in a few words
    (e.g. why a layer stays in floating point). Rows come in the order the pass wants them shown
    (a ranking is worst first).
    """

    layer: str
    kind: str = ""
    unit: str = ""
    before: float | None = None
    after: float | None = None
    precision: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    key_metric: str = ""
    worse: Worse = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.worse not in ("", "higher", "lower"):
            raise InputError(f"PassLayerRow.worse={self.worse!r}; choose 'higher', 'lower' or ''")
        if self.key_metric and self.key_metric not in self.metrics:
            raise InputError(f"PassLayerRow.key_metric={self.key_metric!r} is not one of its metrics "
                             f"({', '.join(self.metrics) or 'none'})")

    @property
    def key_value(self) -> float | None:
        """The value of ``key_metric`` (None when there is none)."""
        return self.metrics[self.key_metric] if self.key_metric else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: fields left at their default are omitted; nan/inf become strings."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            default = f.default_factory() if callable(f.default_factory) else f.default
            if f.name == "layer" or value != default:
                out[f.name] = _json_number(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassLayerRow":
        """The inverse of ``to_dict`` (numbers stored as text, such as ``"nan"``, become floats)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"PassLayerRow has no field(s) {', '.join(unknown)}")
        values = dict(data)
        for key in ("before", "after"):
            if values.get(key) is not None:
                values[key] = float(values[key])
        values["metrics"] = {str(k): float(v) for k, v in (values.get("metrics") or {}).items()}
        return cls(**values)


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_number(v) for k, v in value.items()}
    return value
