"""The report page's per-layer section: each pass's ``PassLayerRow``s as a plot and a table.

Drawn from the typed ``PassRecord.layers`` alone: the page knows no pass and no ``stats`` key.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..layer_rows import PassLayerRow
from ..report import PassRecord
from ..units import format_value
from ._html import e, embed, num, stage_rows
from .plots import layer_plot

Column = tuple[str, Callable[[PassLayerRow], str]]


def layers_section(report: Sequence[PassRecord], image_format: str | None) -> str:
    """One heading per step that reported layers, its plot (none when ``image_format`` is None:
    no matplotlib) and its table; empty when no step did."""
    steps = [r for r in stage_rows(report) if r.layers]
    if not steps:
        return ""
    out = ['<section id="layers"><h2>Per-layer statistics</h2>']
    for r in steps:
        out.append(f'<h3 id="layers-{r.index}">#{r.index} <code>{e(r.name)}</code></h3>')
        if image_format is not None:
            out += [embed(fig, alt, image_format) for fig, alt in layer_plot(r)]
        out.append(f"<details><summary>per-layer table ({len(r.layers)} layers)</summary>"
                   f"{layer_table(r.layers)}</details>")
    out.append("</section>")
    return "".join(out)


def _number(value: float | None, spec: str) -> str:
    return f'<td class="num">{e(format_value(num(value), spec))}</td>'


def _columns(rows: list[PassLayerRow]) -> list[Column]:
    """The columns of the fields some row fills, with one unit in the count headers when all share it."""
    cols: list[Column] = [("layer", lambda r: f"<td><code>{e(r.layer)}</code></td>")]
    if any(r.kind for r in rows):
        cols.append(("kind", lambda r: f"<td>{e(r.kind)}</td>"))
    if any(r.precision for r in rows):
        cols.append(("precision", lambda r: f"<td>{e(r.precision)}</td>"))
    units = list(dict.fromkeys(r.unit for r in rows if r.before is not None or r.after is not None))
    if units:
        unit = units[0] + " " if len(units) == 1 and units[0] else ""
        if not unit:
            cols.append(("unit", lambda r: f"<td>{e(r.unit)}</td>"))
        cols += [(f"{unit}before", lambda r: _number(r.before, "{:g}")),
                 (f"{unit}after", lambda r: _number(r.after, "{:g}"))]
    for metric in dict.fromkeys(k for r in rows for k in r.metrics):
        cols.append((metric, lambda r, m=metric: _number(r.metrics.get(m), "{:.4g}")))
    if any(r.note for r in rows):
        cols.append(("note", lambda r: f"<td>{e(r.note)}</td>"))
    return cols


def layer_table(rows: list[PassLayerRow]) -> str:
    """``rows`` as an HTML table, in the pass's order, one column per field some row fills."""
    cols = _columns(rows)
    head = "".join(f"<th>{e(name)}</th>" for name, _ in cols)
    body = "".join("<tr>" + "".join(cell(r) for _, cell in cols) + "</tr>" for r in rows)
    return f'<table class="layers"><tr>{head}</tr>{body}</table>'
