"""The report's plots as matplotlib figures, from report rows alone: usable outside the HTML page.

Figures are drawn on the Agg canvas, never through pyplot, so no window opens and the user's
matplotlib state is left alone. Each function returns ``(figure, description)`` pairs; the
description names what is drawn (the HTML report uses it as the image's alt text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..layer_rows import PassLayerRow
from ..report import PassRecord
from ..units import KIB, format_count
from ._html import err, num, short, stat

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: at most this many layers are drawn per step (the tables list them all)
MAX_BARS = 60
Plot = tuple["Figure", str]


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _stage_axis(ax: Any, rows: list[PassRecord]) -> None:
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.index} {short(r.name)}" for r in rows], rotation=35, ha="right", fontsize=8)
    ax.grid(True, alpha=0.3)


def _stage_series(rows: list[PassRecord]) -> list[tuple[str, list[float | None], str]]:
    """(label, value per stage, colour) of each quantity known for some stage; quality first."""
    series: list[tuple[str, list[float | None], str]] = []
    accuracy = [stat(r, "accuracy") for r in rows]
    if any(v is not None for v in accuracy):
        series.append(("accuracy (%)", [None if v is None else 100 * v for v in accuracy], "tab:green"))
    max_abs = [err(r, "max_abs") for r in rows]
    if any(v is not None for v in max_abs):
        series.append(("max abs error vs original", max_abs, "tab:red"))
    top1 = [err(r, "top1") for r in rows]
    if any(v is not None for v in top1) and not any(v is not None for v in accuracy):
        series.append(("top-1 agreement with original", top1, "tab:purple"))
    series.append(("weights (KiB)", [r.bytes / KIB for r in rows], "tab:blue"))
    latency = [stat(r, "ort_latency_ms") for r in rows]
    if any(v is not None for v in latency):
        series.append(("ORT latency (ms)", latency, "tab:orange"))
    return series


def stage_plots(rows: list[PassRecord]) -> list[Plot]:
    """Accuracy / error, size and latency across the stages; plus quality vs size when both exist."""
    if not rows:
        return []
    series = _stage_series(rows)
    fig = new_figure(max(6.0, 0.7 * len(rows) + 3), 1.9 * len(series) + 1.2)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, values, colour) in zip(axes, series):
        pts = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour)
        for i, v in pts:
            ax.annotate(f"{v:.3g}", (i, v), textcoords="offset points", xytext=(0, 5), ha="center",
                        fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.margins(x=0.08, y=0.25)
        ax.grid(True, alpha=0.3)
    _stage_axis(axes[-1], rows)
    fig.suptitle("Quality, size and latency across stages")
    out = [(fig, "quality, size and latency across stages: " + ", ".join(s[0] for s in series))]
    label, quality = series[0][:2] if series[0][0] == "accuracy (%)" else \
        ("max abs error vs original", [err(r, "max_abs") for r in rows])
    return out + _quality_vs_size(rows, label, quality)


def _quality_vs_size(rows: list[PassRecord], label: str, quality: list[float | None]) -> list[Plot]:
    pts = [(r, q) for r, q in zip(rows, quality) if q is not None]
    if len(pts) < 2:
        return []
    fig = new_figure(6.5, 4.5)
    ax = fig.subplots()
    sizes = [r.bytes / KIB for r, _ in pts]
    lat = [stat(r, "ort_latency_ms") for r, _ in pts]
    coloured = all(v is not None for v in lat)
    if coloured:
        sc = ax.scatter(sizes, [q for _, q in pts], c=lat, cmap="viridis", s=60, zorder=3)
        fig.colorbar(sc, ax=ax, label="ORT latency (ms)")
    else:
        ax.scatter(sizes, [q for _, q in pts], s=60, color="tab:blue", zorder=3)
    ax.plot(sizes, [q for _, q in pts], color="grey", alpha=0.5, zorder=2)
    for (s, q), names in _label_groups(sizes, [q for _, q in pts],
                                       [f"{r.index} {short(r.name, 18)}" for r, _ in pts]):
        ax.annotate("\n".join(names), (s, q), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(0.15)
    ax.set_xlabel("weights (KiB)")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)
    ax.set_title("quality vs size per stage" + (" (colour: ORT latency)" if coloured else ""))
    return [(fig, f"{label} vs size per stage")]


def _label_groups(xs: list[float], ys: list[float], names: list[str]) -> list[tuple[tuple[float, float], list[str]]]:
    """Point labels merged where the points nearly coincide (within 8% of the x range, labels being
    wide, and 5% of the y range), so stages that barely move (a clean-up, the export) share one
    stacked label instead of overprinting each other."""
    dx = 0.08 * ((max(xs) - min(xs)) or 1.0)
    dy = 0.05 * ((max(ys) - min(ys)) or 1.0)
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for x, y, name in zip(xs, ys, names):
        group = next((g for g in groups if abs(g[0][0] - x) <= dx and abs(g[0][1] - y) <= dy), None)
        if group is None:
            groups.append(((x, y), [name]))
        else:
            group[1].append(name)
    return groups


def params_macs_plot(rows: list[PassRecord]) -> list[Plot]:
    """Params, non-zero params and MACs per stage."""
    if not rows:
        return []
    fig = new_figure(max(6.0, 0.7 * len(rows) + 3), 5.0)
    ax_p, ax_m = fig.subplots(2, 1, sharex=True)
    x = list(range(len(rows)))
    w = 0.4
    ax_p.bar([i - w / 2 for i in x], [r.params for r in rows], w, label="params", color="tab:blue")
    ax_p.bar([i + w / 2 for i in x], [r.nonzero for r in rows], w, label="non-zero", color="tab:cyan")
    ax_p.set_ylabel("parameters")
    ax_p.legend(fontsize=8)
    ax_p.grid(True, axis="y", alpha=0.3)
    ax_m.bar(x, [r.macs for r in rows], 0.6, color="tab:gray")
    for i, r in zip(x, rows):
        ax_m.annotate(format_count(r.macs), (i, r.macs), textcoords="offset points", xytext=(0, 3),
                      ha="center", fontsize=7)
    ax_m.set_ylabel("MACs")
    ax_m.margins(y=0.15)
    _stage_axis(ax_m, rows)
    fig.suptitle("Parameters and MACs per stage")
    return [(fig, "parameters, non-zero parameters and MACs per stage")]


def counted(rows: list[PassLayerRow]) -> list[PassLayerRow]:
    """The rows with a count before and after the pass."""
    return [r for r in rows if num(r.before) is not None and num(r.after) is not None]


def keyed(rows: list[PassLayerRow]) -> list[PassLayerRow]:
    """The rows measuring the first row's key metric (a finite value)."""
    metric = next((r.key_metric for r in rows if r.key_metric), "")
    return [r for r in rows if metric and r.key_metric == metric and num(r.key_value) is not None]


def layer_plot(record: PassRecord) -> list[Plot]:
    """One step's ``PassLayerRow``s drawn, in the pass's order: the count before and after per layer
    (after drawn over before), and the key metric per layer; none when the rows have neither."""
    shown = record.layers[:MAX_BARS]
    panels = [p for p in ((_draw_counts, counted(shown)), (_draw_key_metric, keyed(shown))) if p[1]]
    if not panels:
        return []
    fig = new_figure(6.0 * len(panels), 0.28 * max(len(rows) for _, rows in panels) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    titles = [draw(ax, rows) for ax, (draw, rows) in zip(axes, panels)]
    more = f" (first {MAX_BARS} of {len(record.layers)} layers)" if len(record.layers) > MAX_BARS else ""
    fig.suptitle(f"#{record.index} {short(record.name, 60)}{more}", fontsize=10)
    return [(fig, f"per-layer {' and '.join(titles)} of step {record.index} {record.name}")]


def _draw_counts(ax: Any, rows: list[PassLayerRow]) -> str:
    units = sorted({r.unit for r in rows})
    unit = units[0] if len(units) == 1 and units[0] else "count"
    y = list(range(len(rows)))
    ax.barh(y, [r.before for r in rows], height=0.8, color="lightgray", label="before")
    ax.barh(y, [r.after for r in rows], height=0.5, color="tab:blue", label="after")
    for i, r in zip(y, rows):
        ax.annotate(f"{r.after:g}/{r.before:g}", (max(r.before, r.after), i), textcoords="offset points",
                    xytext=(3, -3), fontsize=7)
    ax.set_yticks(y, [short(r.layer, 32) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.2 * max(max(r.before, r.after) for r in rows) or 1)
    ax.set_xlabel(unit)
    ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=7)
    title = f"{unit} before and after"
    ax.set_title(title + " per layer", fontsize=10)
    return title


def _draw_key_metric(ax: Any, rows: list[PassLayerRow]) -> str:
    """Bars of the key metric; coloured and labelled by precision when the rows chose several."""
    metric, worse = rows[0].key_metric, rows[0].worse
    precisions = list(dict.fromkeys(r.precision for r in rows))
    colours = dict(zip(precisions, ("tab:purple", "tab:orange", "tab:green", "tab:brown", "tab:pink")))
    mixed = len(precisions) > 1
    y = list(range(len(rows)))
    values = [float(r.key_value) for r in rows]  # type: ignore[arg-type]
    ax.barh(y, values, color=[colours.get(r.precision, "tab:gray") if mixed else "tab:purple" for r in rows])
    for i, v in zip(y, values):
        ax.annotate(f"{v:.3g}", (v, i), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.margins(x=0.12)
    ax.set_yticks(y, [short(r.layer, 36) + (f"  [{r.precision}]" if mixed and r.precision else "")
                      for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(metric + (f" ({worse} is worse)" if worse else ""))
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"{metric} per layer", fontsize=10)
    return metric
