"""A self-contained HTML report of a pipeline run: run facts, the per-pass table, plots and graph diffs.

One file, nothing fetched: styles are inline, plots are matplotlib figures drawn with the Agg
canvas (never pyplot, so no window and no change to the user's matplotlib state) and embedded
as base64 PNG or inline SVG, and every string taken from the report is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import InputError
from .report import PassRecord, Report
from .units import KIB, format_bytes, format_count, format_value

IMAGE_FORMATS = ("png", "svg")
#: rows that produced no graph of their own: plotted as gaps, not as a repeat of the previous stage
SKIPPED_STATUSES = ("rolled-back", "not-run")
MAX_DIFF_LINES = 4000
MAX_BARS = 60


# -------------------------------------------------------------------------------- small helpers

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A finite float from a number or a numeric string (JSON stores nan/inf as text); else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _short(name: str, width: int = 28) -> str:
    base = name.split("{", 1)[0]
    return base if len(base) <= width else base[: width - 1] + "…"


def _css_token(value: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-") or "unknown"


# -------------------------------------------------------------------------------- data extraction

@dataclass
class LayerChannels:
    """Per-layer pruning facts found in a pass's stats (any field may be unknown)."""

    name: str
    kind: str = ""
    before: float | None = None
    after: float | None = None
    sparsity: float | None = None


@dataclass
class Sensitivity:
    """One row of a per-layer quantization sensitivity table."""

    name: str
    value: float
    skipped: bool = False


_NAME_KEYS = ("name", "layer", "node", "module", "path", "target")
_BEFORE_KEYS = ("channels_before", "out_channels_before", "units_before", "before", "total", "original",
                "channels", "out_channels")
_AFTER_KEYS = ("channels_after", "out_channels_after", "units_after", "after", "kept_channels",
               "channels_kept", "kept", "remaining")
_PRUNE_TABLE_KEYS = ("layers", "per_layer", "layer_stats", "channels", "kept_channels", "channels_kept")
_SENSITIVITY_KEYS = ("sensitivity", "sensitivities", "ranking", "ranked", "per_layer_error", "layer_errors",
                     "layer_sensitivity")
#: metric names of a sensitivity row, most useful first, with whether a larger value is worse
_SENSITIVITY_METRICS = (("error", True), ("max_abs", True), ("mse", True), ("mean_abs", True),
                        ("kl", True), ("loss", True), ("accuracy_drop", True), ("drop", True),
                        ("sensitivity", True), ("score", True), ("sqnr_db", False), ("sqnr", False),
                        ("cosine", False), ("top1", False), ("accuracy", False), ("value", True))


def _rows_of(table: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(name, fields)`` pairs from a dict of dicts/scalars/pairs or a list of named dicts."""
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(table, dict):
        for name, value in table.items():
            if isinstance(value, dict):
                out.append((str(name), _flatten(value)))
            elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_num(v) is not None
                                                                               for v in value):
                out.append((str(name), {"before": value[0], "after": value[1]}))
            elif _num(value) is not None:
                out.append((str(name), {"value": value}))
    elif isinstance(table, (list, tuple)):
        for i, item in enumerate(table):
            if isinstance(item, dict):
                fields = _flatten(item)
                name = next((str(fields[k]) for k in _NAME_KEYS if isinstance(fields.get(k), str)), f"#{i}")
                out.append((name, fields))
            elif isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[0], str):
                out.append((item[0], {"value": item[1]} if len(item) == 2
                            else {"before": item[1], "after": item[2]}))
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"channels": {"before": 8}}`` -> ``{"channels.before": 8, "before": 8}`` (outer keys win)."""
    flat: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            for nk, nv in _flatten(v).items():
                flat[f"{key}.{nk}"] = nv
                nested.setdefault(nk, nv)
        else:
            flat[key] = v
    for k, v in nested.items():
        flat.setdefault(k, v)
    return flat


def _count(value: Any) -> float | None:
    if isinstance(value, (list, tuple)):
        return float(len(value))
    return _num(value)


def pruning_layers(stats: dict[str, Any]) -> list[LayerChannels]:
    """Per-layer channel counts / sparsity from a pruning pass's ``stats`` (empty when there are none).

    Understands ``layers: {path: {kind, channels_before, channels_after, kept}}`` (prune-channels),
    per-layer ``{params, zeros | nonzero}`` or ``sparsity`` (prune-magnitude, prune-nm), and the looser forms
    ``channels: {path: [before, after]}`` or a list of ``{"layer": ..., ...}`` dicts.
    """
    if not isinstance(stats, dict):
        return []
    for key in _PRUNE_TABLE_KEYS:
        rows = _rows_of(stats.get(key))
        layers = [_layer(name, fields, key) for name, fields in rows]
        layers = [layer for layer in layers if layer.before is not None or layer.after is not None
                  or layer.sparsity is not None]
        if layers:
            return layers
    return []


def _layer(name: str, f: dict[str, Any], table_key: str) -> LayerChannels:
    before = next((_count(f[k]) for k in _BEFORE_KEYS if k in f and _count(f[k]) is not None), None)
    after = next((_count(f[k]) for k in _AFTER_KEYS if k in f and _count(f[k]) is not None), None)
    if after is None and "value" in f and table_key in ("kept_channels", "channels_kept", "channels"):
        after = _num(f["value"])
    sparsity = _num(f.get("sparsity"))
    params = _num(f.get("params", f.get("params_before", f.get("total_params"))))
    if sparsity is None and params and _num(f.get("zeros")) is not None:
        sparsity = float(_num(f.get("zeros")) or 0.0) / params
    if sparsity is None and params:
        nonzero = _num(f.get("nonzero", f.get("active_params", f.get("params_after"))))
        if nonzero is not None:
            sparsity = 1.0 - nonzero / params
    if sparsity is None and "value" in f and table_key in ("layers", "per_layer", "layer_stats"):
        v = _num(f["value"])
        sparsity = v if v is not None and 0.0 <= v <= 1.0 else None
    if sparsity is not None and sparsity > 1.0:
        sparsity /= 100.0
    kind = str(f.get("kind", f.get("type", "")))
    return LayerChannels(name, kind, before, after, sparsity)


def sensitivity_table(stats: dict[str, Any], *, name_hint: str = "") -> tuple[str, list[Sensitivity]]:
    """The per-layer sensitivity ranking in ``stats`` (metric name, rows worst first), or ``("", [])``.

    Looks for ``sensitivity`` / ``ranking`` / ... keys holding a list of ``{layer, <metric>}`` dicts
    or a ``{layer: value | {metric: value}}`` dict; for a pass whose name mentions sensitivity,
    ``layers`` is accepted too. Layers listed in ``stats["skip"]`` are flagged.
    """
    if not isinstance(stats, dict):
        return "", []
    keys = list(_SENSITIVITY_KEYS) + [k for k in stats if isinstance(k, str) and k not in _SENSITIVITY_KEYS
                                      and ("sensitiv" in k or "rank" in k)]
    if "sensitiv" in name_hint:
        keys += ["layers", "table", "per_layer"]
    for key in keys:
        table = stats.get(key)
        rows = _rows_of(table)
        if not rows:
            continue
        metric, worse_high = _pick_metric(rows)
        if not metric:
            continue
        raw_skip = stats.get("skip")
        skip = {str(s) for s in raw_skip} if isinstance(raw_skip, (list, tuple)) else set()
        out = [Sensitivity(name, float(_num(fields[metric])), name in skip or bool(fields.get("skipped")))
               for name, fields in rows if _num(fields.get(metric)) is not None]
        if not isinstance(table, (list, tuple)):
            out.sort(key=lambda s: -s.value if worse_high else s.value)
        return (metric if metric != "value" else key), out
    return "", []


def _pick_metric(rows: list[tuple[str, dict[str, Any]]]) -> tuple[str, bool]:
    for metric, worse_high in _SENSITIVITY_METRICS:
        if any(_num(fields.get(metric)) is not None for _, fields in rows):
            return metric, worse_high
    for _, fields in rows:
        for k, v in fields.items():
            if k not in _NAME_KEYS and _num(v) is not None:
                return k, True
    return "", True


def _stage_rows(report: Sequence[PassRecord]) -> list[PassRecord]:
    return [r for r in report if r.status not in SKIPPED_STATUSES]


def _stat(record: PassRecord, key: str) -> float | None:
    return _num((record.stats or {}).get(key))


def _err(record: PassRecord, key: str) -> float | None:
    return _num((record.error or {}).get(key))


# -------------------------------------------------------------------------------- figures

class _Figures:
    """Draws matplotlib figures on an Agg canvas and returns them as embeddable HTML."""

    def __init__(self, image_format: str) -> None:
        self.format = image_format
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._figure_cls, self._canvas_cls = Figure, FigureCanvasAgg

    def new(self, width: float, height: float) -> Any:
        fig = self._figure_cls(figsize=(width, height), dpi=100, layout="constrained")
        self._canvas_cls(fig)
        return fig

    def embed(self, fig: Any, alt: str) -> str:
        buf = io.BytesIO()
        if self.format == "png":
            fig.savefig(buf, format="png", metadata={"Software": None})
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            return f'<img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{data}">'
        import matplotlib

        with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fxcompress"}):
            fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None,
                                                     "Type": None})
        svg = buf.getvalue().decode("utf-8")
        svg = svg[svg.index("<svg"):]
        svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
        svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
        return f'<div class="plot" role="img" aria-label="{_e(alt)}">{svg}</div>'


def _stage_axis(ax: Any, rows: list[PassRecord]) -> None:
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r.index} {_short(r.name)}" for r in rows], rotation=35, ha="right", fontsize=8)
    ax.grid(True, alpha=0.3)


def plot_stages(figs: _Figures, rows: list[PassRecord]) -> list[str]:
    """(a) accuracy / error, size and latency across the stages; plus size vs quality when both exist."""
    if not rows:
        return []
    x = list(range(len(rows)))
    series: list[tuple[str, list[float | None], str]] = []
    accuracy = [_stat(r, "accuracy") for r in rows]
    if any(v is not None for v in accuracy):
        series.append(("accuracy (%)", [None if v is None else 100 * v for v in accuracy], "tab:green"))
    max_abs = [_err(r, "max_abs") for r in rows]
    if any(v is not None for v in max_abs):
        series.append(("max abs error vs original", max_abs, "tab:red"))
    top1 = [_err(r, "top1") for r in rows]
    if any(v is not None for v in top1) and not any(v is not None for v in accuracy):
        series.append(("top-1 agreement with original", top1, "tab:purple"))
    series.append(("weights (KiB)", [r.bytes / KIB for r in rows], "tab:blue"))
    latency = [_stat(r, "ort_latency_ms") for r in rows]
    if any(v is not None for v in latency):
        series.append(("ORT latency (ms)", latency, "tab:orange"))

    out: list[str] = []
    fig = figs.new(max(6.0, 0.7 * len(rows) + 3), 1.9 * len(series) + 1.2)
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, values, colour) in zip(axes, series):
        pts = [(i, v) for i, v in zip(x, values) if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour)
        for i, v in pts:
            ax.annotate(f"{v:.3g}", (i, v), textcoords="offset points", xytext=(0, 5), ha="center",
                        fontsize=7)
        ax.set_ylabel(label, fontsize=8)
        ax.margins(x=0.08, y=0.25)
        ax.grid(True, alpha=0.3)
    _stage_axis(axes[-1], rows)
    fig.suptitle("Quality, size and latency across stages")
    out.append(figs.embed(fig, "quality, size and latency across stages: " + ", ".join(s[0] for s in series)))

    quality_label, quality = ("accuracy (%)", series[0][1]) if series[0][0] == "accuracy (%)" else \
        ("max abs error vs original", max_abs)
    pts = [(r, q) for r, q in zip(rows, quality) if q is not None]
    if len(pts) >= 2:
        fig = figs.new(6.5, 4.5)
        ax = fig.subplots()
        sizes = [r.bytes / KIB for r, _ in pts]
        lat = [_stat(r, "ort_latency_ms") for r, _ in pts]
        if all(v is not None for v in lat):
            sc = ax.scatter(sizes, [q for _, q in pts], c=lat, cmap="viridis", s=60, zorder=3)
            fig.colorbar(sc, ax=ax, label="ORT latency (ms)")
        else:
            ax.scatter(sizes, [q for _, q in pts], s=60, color="tab:blue", zorder=3)
        ax.plot(sizes, [q for _, q in pts], color="grey", alpha=0.5, zorder=2)
        labels: dict[tuple[float, float], list[str]] = {}
        for (r, q), s in zip(pts, sizes):
            labels.setdefault((s, q), []).append(f"{r.index} {_short(r.name, 18)}")
        for (s, q), names in labels.items():
            ax.annotate("\n".join(names), (s, q), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.margins(0.15)
        ax.set_xlabel("weights (KiB)")
        ax.set_ylabel(quality_label)
        ax.grid(True, alpha=0.3)
        ax.set_title("quality vs size per stage" + (" (colour: ORT latency)" if all(
            v is not None for v in lat) else ""))
        out.append(figs.embed(fig, f"{quality_label} vs size per stage"))
    return out


def plot_params_macs(figs: _Figures, rows: list[PassRecord]) -> list[str]:
    """(b) params, non-zero params and MACs per stage."""
    if not rows:
        return []
    fig = figs.new(max(6.0, 0.7 * len(rows) + 3), 5.0)
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
        ax_m.annotate(format_count(r.macs), (i, r.macs), textcoords="offset points", xytext=(0, 3), ha="center",
                      fontsize=7)
    ax_m.set_ylabel("MACs")
    ax_m.margins(y=0.15)
    _stage_axis(ax_m, rows)
    fig.suptitle("Parameters and MACs per stage")
    return [figs.embed(fig, "parameters, non-zero parameters and MACs per stage")]


def plot_pruning(figs: _Figures, record: PassRecord, layers: list[LayerChannels]) -> list[str]:
    """(c) kept vs original channels per layer, and per-layer sparsity, of one pruning step."""
    out: list[str] = []
    shown = layers[:MAX_BARS]
    more = f" (first {MAX_BARS} of {len(layers)} layers)" if len(layers) > MAX_BARS else ""
    channels = [layer for layer in shown if layer.before is not None and layer.after is not None]
    sparse = [layer for layer in shown if layer.sparsity is not None]
    panels = [p for p in (channels, sparse) if p]
    if not panels:
        return out
    height = 0.28 * max(len(p) for p in panels) + 1.6
    fig = figs.new(6.0 * len(panels), height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    k = 0
    if channels:
        ax = axes[k]
        k += 1
        y = list(range(len(channels)))
        ax.barh(y, [c.before for c in channels], color="lightgray", label="before")
        ax.barh(y, [c.after for c in channels], color="tab:blue", label="kept")
        for i, c in zip(y, channels):
            ax.annotate(f"{c.after:g}/{c.before:g}", (c.before, i), textcoords="offset points",
                        xytext=(3, -3), fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([_short(c.name, 32) for c in channels], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.2 * max(c.before for c in channels) or 1)
        ax.set_xlabel("channels")
        ax.set_title("kept channels per layer", fontsize=10)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=7)
    if sparse:
        ax = axes[k]
        y = list(range(len(sparse)))
        ax.barh(y, [100 * s.sparsity for s in sparse], color="tab:red")
        for i, s in zip(y, sparse):
            ax.annotate(f"{100 * s.sparsity:.1f}%", (100 * s.sparsity, i), textcoords="offset points",
                        xytext=(3, -3), fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([_short(s.name, 32) for s in sparse], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("sparsity (%)")
        ax.set_title("sparsity per layer", fontsize=10)
    fig.suptitle(f"#{record.index} {_short(record.name, 60)}{more}", fontsize=10)
    out.append(figs.embed(fig, f"per-layer pruning of step {record.index} {record.name}"))
    return out


def plot_sensitivity(figs: _Figures, record: PassRecord, metric: str, rows: list[Sensitivity]) -> list[str]:
    """(d) per-layer quantization sensitivity, worst first; layers kept in float are highlighted."""
    shown = rows[:MAX_BARS]
    fig = figs.new(7.5, 0.28 * len(shown) + 1.6)
    ax = fig.subplots()
    y = list(range(len(shown)))
    ax.barh(y, [s.value for s in shown], color=["tab:orange" if s.skipped else "tab:purple" for s in shown])
    for i, s in zip(y, shown):
        ax.annotate(f"{s.value:.3g}", (s.value, i), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.margins(x=0.12)
    ax.set_yticks(y)
    ax.set_yticklabels([_short(s.name, 36) + ("  [float]" if s.skipped else "") for s in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.grid(True, axis="x", alpha=0.3)
    more = f", first {MAX_BARS} of {len(rows)}" if len(rows) > MAX_BARS else ""
    ax.set_title(f"quantization sensitivity per layer (#{record.index} {_short(record.name, 40)}{more})",
                 fontsize=10)
    return [figs.embed(fig, f"per-layer quantization sensitivity ({metric}) of step {record.index}")]


# -------------------------------------------------------------------------------- HTML sections

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;
color:#1d1d1f;background:#fff;max-width:1500px}@media (max-width:1400px){body{margin:16px}}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 7px;vertical-align:top}th{background:#f3f3f5;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.passes{font-size:12px}table.passes th,table.passes td{padding:2px 3px}table.passes th{font-size:11px}
table.passes td code{overflow-wrap:anywhere;display:inline-block;min-width:10em}table.passes .badge{font-size:11px}
tr.status-rolled-back td{background:#fde2e1}tr.status-not-run td{color:#888;background:#f7f7f7}
tr.status-unchanged td{color:#555}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:12px;background:#e6f4ea}
.badge.status-rolled-back{background:#d93025;color:#fff}.badge.status-unchanged{background:#eee}
.badge.status-not-run{background:#ddd}
.sev-error{color:#b3261e;font-weight:600}.sev-warning{color:#a56300;font-weight:600}.sev-info{color:#555}
.fallback{color:#a56300;font-weight:600}
pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;background:#fafafa;
border:1px solid #eee;padding:8px;overflow:auto;max-height:600px}
pre.diff span{display:block;white-space:pre}pre.diff .add{background:#e6ffed}pre.diff .del{background:#ffeef0}
pre.diff .hunk{color:#6f42c1}pre.diff .hdr{color:#555;font-weight:600}
details{margin:.4em 0}summary{cursor:pointer}
.plot{max-width:100%;height:auto;display:block;margin:8px 0}.plots{display:flex;flex-wrap:wrap;gap:12px}
.note{color:#666;font-size:13px}dl.meta dt{font-weight:600;float:left;clear:left;width:11em}
dl.meta dd{margin-left:12em;margin-bottom:4px}
"""


def _meta_section(meta: dict[str, Any]) -> str:
    parts = ['<section id="run"><h2>Run</h2><dl class="meta">']
    order = ["target", "backend", "pipeline", "precision"]
    keys = [k for k in order if k in meta] + [k for k in meta if k not in order and k != "opaque_modules"]
    for key in keys:
        value = meta[key]
        if key == "backend" and "fallback" in str(value):
            body = f'<span class="fallback">{_e(value)}</span>'
        elif key == "pipeline":
            body = f"<code>{_e(value)}</code>"
        elif isinstance(value, dict):
            cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in value.items())
            body = f"<table>{cells}</table>" if value else "-"
        else:
            body = _e(value) if value not in (None, "") else "-"
        parts.append(f"<dt>{_e(key)}</dt><dd>{body}</dd>")
    opaque = meta.get("opaque_modules") or {}
    if isinstance(opaque, dict) and opaque:
        rows = "".join(f"<tr><td><code>{_e(k)}</code></td><td>{_e(v)}</td></tr>" for k, v in opaque.items())
        body = f"<table><tr><th>module</th><th>why it stays a leaf</th></tr>{rows}</table>"
    elif opaque:
        body = _e(opaque)
    else:
        body = "none (every module was traced through)"
    parts.append(f"<dt>opaque modules</dt><dd>{body}</dd></dl></section>")
    return "".join(parts)


def _summary_section(report: Sequence[PassRecord]) -> str:
    rows = _stage_rows(report)
    if len(rows) < 2:
        return ""
    first, last = rows[0], rows[-1]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    items = [("params", format_count(first.params), format_count(last.params), ratio(first.params, last.params)),
             ("non-zero params", format_count(first.nonzero), format_count(last.nonzero),
              ratio(first.nonzero, last.nonzero)),
             ("weights", format_bytes(first.bytes), format_bytes(last.bytes), ratio(first.bytes, last.bytes)),
             ("MACs", format_count(first.macs), format_count(last.macs), ratio(first.macs, last.macs))]
    a0, a1 = _stat(first, "accuracy"), _stat(last, "accuracy")
    if a0 is not None and a1 is not None:
        items.append(("accuracy", f"{a0:.2%}", f"{a1:.2%}", f"{100 * (a1 - a0):+.2f} pt"))
    l0, l1 = _stat(first, "ort_latency_ms"), _stat(last, "ort_latency_ms")
    if l0 is not None and l1 is not None:
        items.append(("ORT latency", f"{l0:.3f} ms", f"{l1:.3f} ms", f"{l0 / l1:.2f}x" if l1 else "-"))
    body = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(a)}</td><td class="num">{_e(b)}</td>'
                   f'<td class="num">{_e(c)}</td></tr>' for k, a, b, c in items)
    return (f'<section id="summary"><h2>Summary</h2><table><tr><th></th><th>{_e(first.name)}</th>'
            f'<th>#{last.index} {_e(_short(last.name, 40))}</th><th>reduction / change</th></tr>{body}'
            "</table></section>")


def _cell(text: str, exact: Any = None) -> str:
    title = f' title="{_e(exact)}"' if exact is not None else ""
    return f'<td class="num"{title}>{_e(text)}</td>'


def _table_section(report: Sequence[PassRecord]) -> str:
    has_acc = any(_stat(r, "accuracy") is not None for r in report)
    has_lat = any(_stat(r, "ort_latency_ms") is not None for r in report)
    head = ["#", "pass", "stage", "status", "changed", "weights changed", "time (s)", "nodes", "params",
            "non-zero", "sparsity", "weights", "MACs", "max abs err", "mean abs err", "cosine", "top-1"]
    head += (["accuracy"] if has_acc else []) + (["ORT latency (ms)"] if has_lat else []) + ["diagnostics"]
    out = ['<section id="passes"><h2>Passes</h2><table class="passes"><thead><tr>',
           "".join(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in report:
        status = _css_token(r.status)
        err = r.error or {}
        cells = [
            _cell(str(r.index)),
            f"<td><code>{_e(r.name)}</code></td>",
            f"<td>{_e(r.stage)}</td>",
            f'<td><span class="badge status-{status}">{_e(r.status)}</span></td>',
            f"<td>{'yes' if r.changed else 'no'}</td>",
            f"<td>{'yes' if r.weights_changed else 'no'}</td>",
            _cell(f"{r.seconds:.3f}", r.seconds),
            _cell(f"{r.nodes:,}", r.nodes),
            _cell(f"{r.params:,}", r.params),
            _cell(f"{r.nonzero:,}", r.nonzero),
            _cell(f"{r.sparsity:.2%}", r.sparsity),
            _cell(format_bytes(r.bytes), f"{r.bytes:,} bytes"),
            _cell(format_count(r.macs), f"{r.macs:,} MACs"),
            _cell(format_value(_num(err.get("max_abs")), "{:.3e}"), err.get("max_abs")),
            _cell(format_value(_num(err.get("mean_abs")), "{:.3e}"), err.get("mean_abs")),
            _cell(format_value(_num(err.get("cosine")), "{:.6f}"), err.get("cosine")),
            _cell(format_value(_num(err.get("top1")), "{:.3f}"), err.get("top1")),
        ]
        if has_acc:
            acc = _stat(r, "accuracy")
            cells.append(_cell("-" if acc is None else f"{acc:.2%}", acc))
        if has_lat:
            cells.append(_cell(format_value(_stat(r, "ort_latency_ms"), "{:.3f}")))
        n_diag = len(r.diagnostics)
        worst = _worst(r.diagnostics)
        cells.append(f'<td><a href="#diag-{r.index}" class="sev-{worst}">{n_diag}</a></td>' if n_diag
                     else "<td>0</td>")
        out.append(f'<tr class="status-{status}" id="pass-{r.index}">{"".join(cells)}</tr>')
    out.append("</tbody></table></section>")
    return "".join(out)


def _worst(diagnostics: Iterable[dict[str, Any]]) -> str:
    rank = {"error": 3, "warning": 2, "info": 1}
    worst = max((str(d.get("severity", "info")) for d in diagnostics), key=lambda s: rank.get(s, 0),
                default="info")
    return _css_token(worst)


def _diagnostics_section(report: Sequence[PassRecord]) -> str:
    rows = [r for r in report if r.diagnostics]
    if not rows:
        return '<section id="diagnostics"><h2>Diagnostics</h2><p class="note">No diagnostics.</p></section>'
    out = ['<section id="diagnostics"><h2>Diagnostics</h2>']
    for r in rows:
        out.append(f'<h3 id="diag-{r.index}">#{r.index} <code>{_e(r.name)}</code></h3><ul>')
        for d in r.diagnostics:
            sev = str(d.get("severity", "info"))
            node = f" <code>[{_e(d['node'])}]</code>" if d.get("node") else ""
            message = str(d.get("message", ""))
            first, _, rest = message.partition("\n")
            more = f"<details><summary>details</summary><pre>{_e(rest)}</pre></details>" if rest else ""
            body = _e(first) + more
            out.append(f'<li><span class="sev-{_css_token(sev)}">{_e(sev)}</span>{node}: {body}</li>')
        out.append("</ul>")
    out.append("</section>")
    return "".join(out)


def _diff_html(text: str) -> tuple[str, int, int]:
    lines = text.splitlines()
    adds = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    dels = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    cut = len(lines) > MAX_DIFF_LINES
    spans = []
    for line in lines[:MAX_DIFF_LINES]:
        if line.startswith(("+++", "---")):
            cls = "hdr"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        elif line.startswith("@@"):
            cls = "hunk"
        else:
            cls = "ctx"
        spans.append(f'<span class="{cls}">{_e(line)}</span>')
    if cut:
        spans.append(f'<span class="hdr">... {len(lines) - MAX_DIFF_LINES} more lines not shown</span>')
    return f'<pre class="diff">{"".join(spans)}</pre>', adds, dels


def _text_block(text: str) -> str:
    lines = text.splitlines()
    shown = "\n".join(lines[:MAX_DIFF_LINES])
    if len(lines) > MAX_DIFF_LINES:
        shown += f"\n... {len(lines) - MAX_DIFF_LINES} more lines not shown"
    return f"<pre>{_e(shown)}</pre>"


def _diffs_section(report: Sequence[PassRecord], snapshots: Sequence[Any] | None) -> str:
    out = ['<section id="diffs"><h2>Graph diffs</h2>']
    if not snapshots:
        out.append('<p class="note">No graph snapshots were given '
                   "(pass <code>snapshots=compiled.snapshots</code>).</p></section>")
        return "".join(out)
    from .graph_text import diff

    snaps = list(snapshots)
    first = snaps[0]
    out.append(f"<details><summary>#0 <code>{_e(first.name)}</code>: graph text "
               f"({len(first.text.splitlines())} lines)</summary>{_text_block(first.text)}</details>")
    j, prev = 1, first
    for r in report:
        if r.index == 0 and r.name == first.name:
            continue
        label = f"#{r.index} <code>{_e(r.name)}</code>"
        if j < len(snaps) and snaps[j].name == r.name and r.status not in SKIPPED_STATUSES:
            snap = snaps[j]
            j += 1
            if snap.stage != prev.stage:
                out.append(f"<details><summary>{label}: {_e(snap.stage)} graph text "
                           f"({len(snap.text.splitlines())} lines; a new graph form, no diff)</summary>"
                           f"{_text_block(snap.text)}</details>")
            else:
                text = diff(prev.text, snap.text, f"{prev.index:02d} {prev.name}",
                            f"{snap.index:02d} {snap.name}")
                if text:
                    body, adds, dels = _diff_html(text)
                    out.append(f"<details><summary>{label}: +{adds} &minus;{dels} lines</summary>{body}"
                               "</details>")
                else:
                    what = "weights changed, graph text unchanged" if r.weights_changed else "no change"
                    out.append(f'<p class="note">{label}: {what}</p>')
            prev = snap
        elif r.status == "rolled-back":
            message = "\n".join(str(d.get("message", "")) for d in r.diagnostics
                                if d.get("severity") == "error")
            first_line, _, rest = message.partition("\n")
            body, _, _ = _diff_html(rest) if rest else ("", 0, 0)
            badge = '<span class="badge status-rolled-back">rolled back</span>'
            no_diff = '<p class="note">no diff</p>'
            out.append(f'<details class="rolled-back"><summary>{label}: {badge} {_e(first_line)}</summary>'
                       f"{body or no_diff}</details>")
        else:
            out.append(f'<p class="note">{label}: {_e(r.status)}</p>')
    for snap in snaps[j:]:
        out.append(f"<details><summary>#{snap.index} <code>{_e(snap.name)}</code>: {_e(snap.stage)} "
                   f"graph text</summary>{_text_block(snap.text)}</details>")
    fx = [s for s in snaps if s.stage == first.stage]
    if len(fx) > 2:
        text = diff(first.text, fx[-1].text, f"00 {first.name}", f"{fx[-1].index:02d} {fx[-1].name}")
        if text:
            body, adds, dels = _diff_html(text)
            out.append(f"<details><summary>overall: <code>{_e(first.name)}</code> &rarr; "
                       f"<code>{_e(fx[-1].name)}</code>: +{adds} &minus;{dels} lines</summary>{body}"
                       "</details>")
    out.append("</section>")
    return "".join(out)


def _plots_section(report: Sequence[PassRecord], image_format: str) -> str:
    try:
        figs = _Figures(image_format)
    except ImportError as exc:
        return (f'<section id="plots"><h2>Plots</h2><p class="note">matplotlib is not available ({_e(exc)}); '
                "install it to get plots.</p></section>")
    rows = _stage_rows(report)
    out = ['<section id="plots"><h2>Plots</h2><div class="plots">']
    out += plot_stages(figs, rows)
    out += plot_params_macs(figs, rows)
    out.append("</div>")
    sensitivity = [(r, *sensitivity_table(r.stats, name_hint=r.name)) for r in rows]
    sensitivity = [s for s in sensitivity if s[2]]
    ranked = {id(s[0]) for s in sensitivity}
    pruning = [(r, layers) for r in rows if id(r) not in ranked and (layers := pruning_layers(r.stats))]
    if pruning:
        out.append("<h3>Per-layer pruning</h3>")
        for r, layers in pruning:
            out += plot_pruning(figs, r, layers)
            out.append(_pruning_table(layers))
    if sensitivity:
        out.append("<h3>Per-layer quantization sensitivity</h3>")
        for r, metric, table in sensitivity:
            out += plot_sensitivity(figs, r, metric, table)
    out.append("</section>")
    return "".join(out)


def _pruning_table(layers: list[LayerChannels]) -> str:
    rows = "".join(
        f"<tr><td><code>{_e(c.name)}</code></td><td>{_e(c.kind)}</td>"
        f'<td class="num">{format_value(c.before, "{:g}")}</td><td class="num">{format_value(c.after, "{:g}")}</td>'
        f'<td class="num">{format_value(None if c.sparsity is None else 100 * c.sparsity, "{:.1f}%")}</td></tr>'
        for c in layers)
    return ("<details><summary>per-layer table</summary><table><tr><th>layer</th><th>kind</th>"
            f"<th>channels before</th><th>kept</th><th>sparsity</th></tr>{rows}</table></details>")


# -------------------------------------------------------------------------------- public API

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
    body = [_meta_section(meta), _summary_section(report), _table_section(report),
            _diagnostics_section(report), _plots_section(report, image_format),
            _diffs_section(report, snapshots)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1>" + "".join(body) + "</body></html>\n")


def write_html(report: Report | Sequence[PassRecord] | Any, path: str | Path, *,
               snapshots: Sequence[Any] | None = None, title: str = "fxcompress report",
               image_format: str = "png") -> Path:
    """Write the report as one self-contained HTML file (parents created); returns its path."""
    text = report_to_html_string(report, snapshots=snapshots, title=title, image_format=image_format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
