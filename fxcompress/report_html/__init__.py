"""A self-contained HTML report of a pipeline run: run facts, the per-pass table, plots and graph diffs.

One file, nothing fetched: styles are inline, plots are matplotlib figures drawn on the Agg canvas
(``plots``; never pyplot, so no window and no change to the user's matplotlib state) and embedded
as base64 PNG or inline SVG, and every string taken from the report is HTML-escaped. The per-layer
plots and tables come from what passes declare (``PassResult.layers``), never from their ``stats``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from ..report import PassRecord, Report
from ._html import IMAGE_FORMATS, e, embed, stage_rows
from .diffs import diffs_section
from .layers import layers_section
from .plots import params_macs_plot, stage_plots
from .sections import CSS, diagnostics_section, meta_section, summary_section, table_section

__all__ = ["IMAGE_FORMATS", "report_to_html_string", "write_html"]


def _plots_section(report: Sequence[PassRecord], image_format: str) -> tuple[str, bool]:
    """The stage plots, and whether matplotlib could draw them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return (f'<section id="plots"><h2>Plots</h2><p class="note">matplotlib is not available ({e(exc)}); '
                "install it to get plots.</p></section>"), False
    rows = stage_rows(report)
    figures = stage_plots(rows) + params_macs_plot(rows)
    images = "".join(embed(fig, alt, image_format) for fig, alt in figures)
    return f'<section id="plots"><h2>Plots</h2><div class="plots">{images}</div></section>', True


def report_to_html_string(report: Report | Sequence[PassRecord] | Any, *,
                          snapshots: Sequence[Any] | None = None, title: str = "fxcompress report",
                          image_format: str = "png") -> str:
    """The whole report as one HTML document (a string). ``report`` may also be a ``Compiled``,
    whose report and snapshots are then used."""
    if snapshots is None and hasattr(report, "snapshots") and hasattr(report, "report"):
        snapshots = report.snapshots
    if hasattr(report, "report") and not isinstance(report, Report):
        report = report.report
    if not isinstance(report, Sequence) or not all(isinstance(r, PassRecord) for r in report):
        raise InputError("write_html needs a fxcompress Report (or a sequence of PassRecord, or a Compiled); "
                         f"got {type(report).__name__}")
    if image_format not in IMAGE_FORMATS:
        raise InputError(f"image_format={image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    meta = dict(getattr(report, "meta", {}) or {})
    plots, drawn = _plots_section(report, image_format)
    body = [meta_section(meta), summary_section(report), table_section(report), diagnostics_section(report),
            plots, layers_section(report, image_format if drawn else None), diffs_section(report, snapshots)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{e(title)}</h1>" + "".join(body) + "</body></html>\n")


def write_html(report: Report | Sequence[PassRecord] | Any, path: str | Path, *,
               snapshots: Sequence[Any] | None = None, title: str = "fxcompress report",
               image_format: str = "png") -> Path:
    """Write the report as one self-contained HTML file (parents created); returns its path."""
    text = report_to_html_string(report, snapshots=snapshots, title=title, image_format=image_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
