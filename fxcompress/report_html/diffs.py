"""The report page's graph-diff section: each pass's change to the graph text, collapsible."""

from __future__ import annotations

from typing import Any, Sequence

from ..graph_text import diff
from ..report import PassRecord
from ._html import SKIPPED_STATUSES, e

MAX_DIFF_LINES = 4000


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
        spans.append(f'<span class="{cls}">{e(line)}</span>')
    if cut:
        spans.append(f'<span class="hdr">... {len(lines) - MAX_DIFF_LINES} more lines not shown</span>')
    return f'<pre class="diff">{"".join(spans)}</pre>', adds, dels


def _text_block(text: str) -> str:
    lines = text.splitlines()
    shown = "\n".join(lines[:MAX_DIFF_LINES])
    if len(lines) > MAX_DIFF_LINES:
        shown += f"\n... {len(lines) - MAX_DIFF_LINES} more lines not shown"
    return f"<pre>{e(shown)}</pre>"


def diffs_section(report: Sequence[PassRecord], snapshots: Sequence[Any] | None) -> str:
    out = ['<section id="diffs"><h2>Graph diffs</h2>']
    if not snapshots:
        out.append('<p class="note">No graph snapshots were given '
                   "(pass <code>snapshots=compiled.snapshots</code>).</p></section>")
        return "".join(out)
    snaps = list(snapshots)
    first = snaps[0]
    out.append(f"<details><summary>#0 <code>{e(first.name)}</code>: graph text "
               f"({len(first.text.splitlines())} lines)</summary>{_text_block(first.text)}</details>")
    j, prev = 1, first
    for r in report:
        if r.index == 0 and r.name == first.name:
            continue
        label = f"#{r.index} <code>{e(r.name)}</code>"
        if j < len(snaps) and snaps[j].name == r.name and r.status not in SKIPPED_STATUSES:
            snap = snaps[j]
            j += 1
            if snap.stage != prev.stage:
                out.append(f"<details><summary>{label}: {e(snap.stage)} graph text "
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
            out.append(f'<details class="rolled-back"><summary>{label}: {badge} {e(first_line)}</summary>'
                       f"{body or no_diff}</details>")
        else:
            out.append(f'<p class="note">{label}: {e(r.status)}</p>')
    for snap in snaps[j:]:
        out.append(f"<details><summary>#{snap.index} <code>{e(snap.name)}</code>: {e(snap.stage)} "
                   f"graph text</summary>{_text_block(snap.text)}</details>")
    fx = [s for s in snaps if s.stage == first.stage]
    if len(fx) > 2:
        text = diff(first.text, fx[-1].text, f"00 {first.name}", f"{fx[-1].index:02d} {fx[-1].name}")
        if text:
            body, adds, dels = _diff_html(text)
            out.append(f"<details><summary>overall: <code>{e(first.name)}</code> &rarr; "
                       f"<code>{e(fx[-1].name)}</code>: +{adds} &minus;{dels} lines</summary>{body}"
                       "</details>")
    out.append("</section>")
    return "".join(out)
