"""The report page's HTML sections: run facts, summary, pass table, diagnostics, per-layer tables.

Every string taken from the report is HTML-escaped; styles are inline (``CSS``) so the page is one file.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..report import PassRecord
from ..units import format_bytes, format_count, format_value
from ._html import css_token, e, num, short, stage_rows, stat

CSS = """
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


def meta_section(meta: dict[str, Any]) -> str:
    parts = ['<section id="run"><h2>Run</h2><dl class="meta">']
    order = ["target", "backend", "pipeline", "precision"]
    keys = [k for k in order if k in meta] + [k for k in meta if k not in order and k != "opaque_modules"]
    for key in keys:
        value = meta[key]
        if key == "backend" and "fallback" in str(value):
            body = f'<span class="fallback">{e(value)}</span>'
        elif key == "pipeline":
            body = f"<code>{e(value)}</code>"
        elif isinstance(value, dict):
            cells = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in value.items())
            body = f"<table>{cells}</table>" if value else "-"
        else:
            body = e(value) if value not in (None, "") else "-"
        parts.append(f"<dt>{e(key)}</dt><dd>{body}</dd>")
    opaque = meta.get("opaque_modules") or {}
    if isinstance(opaque, dict) and opaque:
        rows = "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>" for k, v in opaque.items())
        body = f"<table><tr><th>module</th><th>why it stays a leaf</th></tr>{rows}</table>"
    elif opaque:
        body = e(opaque)
    else:
        body = "none (every module was traced through)"
    parts.append(f"<dt>opaque modules</dt><dd>{body}</dd></dl></section>")
    return "".join(parts)


def summary_section(report: Sequence[PassRecord]) -> str:
    rows = stage_rows(report)
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
    a0, a1 = stat(first, "accuracy"), stat(last, "accuracy")
    if a0 is not None and a1 is not None:
        items.append(("accuracy", f"{a0:.2%}", f"{a1:.2%}", f"{100 * (a1 - a0):+.2f} pt"))
    l0, l1 = stat(first, "ort_latency_ms"), stat(last, "ort_latency_ms")
    if l0 is not None and l1 is not None:
        items.append(("ORT latency", f"{l0:.3f} ms", f"{l1:.3f} ms", f"{l0 / l1:.2f}x" if l1 else "-"))
    body = "".join(f'<tr><th>{e(k)}</th><td class="num">{e(a)}</td><td class="num">{e(b)}</td>'
                   f'<td class="num">{e(c)}</td></tr>' for k, a, b, c in items)
    return (f'<section id="summary"><h2>Summary</h2><table><tr><th></th><th>{e(first.name)}</th>'
            f'<th>#{last.index} {e(short(last.name, 40))}</th><th>reduction / change</th></tr>{body}'
            "</table></section>")


def _cell(text: str, exact: Any = None) -> str:
    title = f' title="{e(exact)}"' if exact is not None else ""
    return f'<td class="num"{title}>{e(text)}</td>'


def table_section(report: Sequence[PassRecord]) -> str:
    has_acc = any(stat(r, "accuracy") is not None for r in report)
    has_lat = any(stat(r, "ort_latency_ms") is not None for r in report)
    head = ["#", "pass", "stage", "status", "changed", "weights changed", "time (s)", "nodes", "params",
            "non-zero", "sparsity", "weights", "MACs", "max abs err", "mean abs err", "cosine", "top-1"]
    head += (["accuracy"] if has_acc else []) + (["ORT latency (ms)"] if has_lat else []) + ["diagnostics"]
    out = ['<section id="passes"><h2>Passes</h2><table class="passes"><thead><tr>',
           "".join(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for r in report:
        status = css_token(r.status)
        err = r.error or {}
        cells = [
            _cell(str(r.index)),
            f"<td><code>{e(r.name)}</code></td>",
            f"<td>{e(r.stage)}</td>",
            f'<td><span class="badge status-{status}">{e(r.status)}</span></td>',
            f"<td>{'yes' if r.changed else 'no'}</td>",
            f"<td>{'yes' if r.weights_changed else 'no'}</td>",
            _cell(f"{r.seconds:.3f}", r.seconds),
            _cell(f"{r.nodes:,}", r.nodes),
            _cell(f"{r.params:,}", r.params),
            _cell(f"{r.nonzero:,}", r.nonzero),
            _cell(f"{r.sparsity:.2%}", r.sparsity),
            _cell(format_bytes(r.bytes), f"{r.bytes:,} bytes"),
            _cell(format_count(r.macs), f"{r.macs:,} MACs"),
            _cell(format_value(num(err.get("max_abs")), "{:.3e}"), err.get("max_abs")),
            _cell(format_value(num(err.get("mean_abs")), "{:.3e}"), err.get("mean_abs")),
            _cell(format_value(num(err.get("cosine")), "{:.6f}"), err.get("cosine")),
            _cell(format_value(num(err.get("top1")), "{:.3f}"), err.get("top1")),
        ]
        if has_acc:
            acc = stat(r, "accuracy")
            cells.append(_cell("-" if acc is None else f"{acc:.2%}", acc))
        if has_lat:
            cells.append(_cell(format_value(stat(r, "ort_latency_ms"), "{:.3f}")))
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
    return css_token(worst)


def diagnostics_section(report: Sequence[PassRecord]) -> str:
    rows = [r for r in report if r.diagnostics]
    if not rows:
        return '<section id="diagnostics"><h2>Diagnostics</h2><p class="note">No diagnostics.</p></section>'
    out = ['<section id="diagnostics"><h2>Diagnostics</h2>']
    for r in rows:
        out.append(f'<h3 id="diag-{r.index}">#{r.index} <code>{e(r.name)}</code></h3><ul>')
        for d in r.diagnostics:
            sev = str(d.get("severity", "info"))
            node = f" <code>[{e(d['node'])}]</code>" if d.get("node") else ""
            message = str(d.get("message", ""))
            first, _, rest = message.partition("\n")
            more = f"<details><summary>details</summary><pre>{e(rest)}</pre></details>" if rest else ""
            body = e(first) + more
            out.append(f'<li><span class="sev-{css_token(sev)}">{e(sev)}</span>{node}: {body}</li>')
        out.append("</ul>")
    out.append("</section>")
    return "".join(out)
