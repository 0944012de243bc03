"""HTML building blocks of the report: escaping, numbers read from report rows, embedded figures."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from typing import Any, Sequence

from ..report import PassRecord

IMAGE_FORMATS = ("png", "svg")
#: rows that produced no graph of their own: plotted as gaps, not as a repeat of the previous stage
SKIPPED_STATUSES = ("rolled-back", "not-run")


def e(value: Any) -> str:
    """``value`` as escaped HTML text (also safe inside a quoted attribute)."""
    return html.escape(str(value), quote=True)


def num(value: Any) -> float | None:
    """A finite float from a number or a numeric string (JSON stores nan/inf as text); else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def short(name: str, width: int = 28) -> str:
    """A pass or layer name cut to ``width`` characters, without its options."""
    base = name.split("{", 1)[0]
    return base if len(base) <= width else base[: width - 1] + "…"


def css_token(value: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-") or "unknown"


def stage_rows(report: Sequence[PassRecord]) -> list[PassRecord]:
    """The rows that produced a graph (not rolled back, not skipped)."""
    return [r for r in report if r.status not in SKIPPED_STATUSES]


def stat(record: PassRecord, key: str) -> float | None:
    """A number an instrument wrote into the row (``accuracy``, ``ort_latency_ms``), or None."""
    return num((record.stats or {}).get(key))


def err(record: PassRecord, key: str) -> float | None:
    """One of the row's error metrics against the original model, or None."""
    return num((record.error or {}).get(key))


def embed(fig: Any, alt: str, image_format: str) -> str:
    """A matplotlib figure as HTML: a base64 PNG ``<img>`` or inline SVG, with ``alt`` as its label.
    The SVG carries no metadata, ids from a fixed salt and text as text, so reports are reproducible."""
    buf = io.BytesIO()
    if image_format == "png":
        fig.savefig(buf, format="png", metadata={"Software": None})
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img class="plot" alt="{e(alt)}" src="data:image/png;base64,{data}">'
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fxcompress"}):
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue().decode("utf-8")
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return f'<div class="plot" role="img" aria-label="{e(alt)}">{svg}</div>'
