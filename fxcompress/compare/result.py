"""What ``compare`` returns: per-layer rows of per-stage metrics, a summary and a rich table."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import InputError
from .tolerance import Tolerance

__all__ = ["STAGES", "Comparison", "LayerRow", "Metric", "fmt_shape"]

#: stage -> (title, stage it is compared with)
STAGES: dict[str, tuple[str, str]] = {
    "fx": ("FX vs original", "original"),
    "ort": ("ORT vs FX", "fx"),
    "trt": ("TRT vs ORT", "ort"),
}


@dataclass(frozen=True)
class Metric:
    """One stage's error at one layer, against the stage before it (``against`` names what)."""

    max_abs: float
    cosine: float
    ref_max: float
    drift: bool
    against: str

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


@dataclass
class LayerRow:
    """One FX node: its error per stage, or why a stage has none (``notes[stage]``)."""

    index: int
    node: str
    op: str
    kind: str
    shape: tuple[int, ...] | None
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def drifted(self, stage: str) -> bool:
        m = self.metrics.get(stage)
        return m is not None and m.drift

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "node": self.node, "op": self.op, "kind": self.kind,
                "shape": list(self.shape) if self.shape is not None else None,
                "metrics": {s: m.to_dict() for s, m in self.metrics.items()}, "notes": dict(self.notes)}


@dataclass
class Comparison:
    """Per-layer rows in graph order; ``stages[s]`` is ``"ran"``, ``"not run: <reason>"`` or
    ``"omitted: <reason>"``."""

    rows: list[LayerRow]
    stages: dict[str, str]
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    def ran(self, stage: str) -> bool:
        return self.stages.get(stage) == "ran"

    def first_divergent(self, stage: str) -> LayerRow | None:
        """The first row (graph order) where ``stage`` drifts beyond the tolerance, else None."""
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return next((r for r in self.rows if r.drifted(stage)), None)

    def summary(self) -> list[str]:
        """One line per stage: status, and the first divergent layer when there is one."""
        lines = []
        for stage, (title, _) in STAGES.items():
            status = self.stages.get(stage, "omitted")
            if status != "ran":
                lines.append(f"{title}: {status}")
                continue
            row = self.first_divergent(stage)
            if row is None:
                compared = sum(stage in r.metrics for r in self.rows)
                lines.append(f"{title}: no divergent layer ({compared} compared; drift = {self.tolerance})")
            else:
                m = row.metrics[stage]
                lines.append(f"{title}: first divergent layer: {row.node} ({row.kind}), "
                             f"max abs {m.max_abs:.3g}, cosine {m.cosine:.6f}, vs {m.against}")
        return lines

    def table(self) -> Any:
        """A rich ``Table``: one row per layer, one column per stage that ran (or could run)."""
        shown = [s for s in STAGES if not self.stages.get(s, "omitted").startswith("omitted")]
        first = {s: self.first_divergent(s) for s in shown}
        table = Table(title="per-layer error across stages", caption=escape("\n".join(self.caption())),
                      caption_justify="left")
        table.add_column("#", justify="right")
        table.add_column("node", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        for s in shown:
            title = STAGES[s][0]
            status = self.stages[s]
            header = f"{title}\nmax abs  cosine" if status == "ran" else f"{title}\n{escape(_short(status))}"
            table.add_column(header, no_wrap=True)
        for row in self.rows:
            cells = [str(row.index), escape(row.node), escape(row.kind), fmt_shape(row.shape)]
            for s in shown:
                cells.append(self._cell(row, s, first[s]))
            table.add_row(*cells)
        return table

    def render(self, width: int | None = None) -> str:
        """The table as plain text, ``width`` columns wide (default: as wide as the table needs)."""
        table = self.table()
        probe = Console(file=io.StringIO(), width=10_000)
        width = width or max(probe.measure(table).maximum, *(len(line) for line in self.caption()))
        out = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
        out.print(table)
        return "\n".join(line.rstrip() for line in out.file.getvalue().rstrip("\n").splitlines())

    def _cell(self, row: LayerRow, stage: str, first: LayerRow | None) -> str:
        if self.stages[stage] != "ran":
            return "-"
        m = row.metrics.get(stage)
        if m is None:
            note = row.notes.get(stage, "")
            return "[dim]" + ("skipped: shape" if note.startswith("shapes differ") else "n/a") + "[/dim]"
        text = f"{m.max_abs:8.2e}  {m.cosine:.6f}"
        if first is row:
            return f"[bold red]{text} << first[/bold red]"
        return f"[red]{text}[/red]" if m.drift else text

    def caption(self) -> list[str]:
        """The drift rule, the notes and the skipped tensors (stage statuses are in ``summary()``)."""
        lines = [f"drift: {self.tolerance}"]
        lines += self.notes
        skipped = [(r.node, s, n) for r in self.rows for s, n in r.notes.items()
                   if n.startswith("shapes differ")]
        lines += [f"{node} ({STAGES[s][0]}): {note}" for node, s, note in skipped]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": asdict(self.tolerance),
            "stages": dict(self.stages),
            "first_divergent": {s: (r.node if (r := self.first_divergent(s)) else None) for s in STAGES},
            "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
        }


def _finite(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _short(status: str) -> str:
    """The status up to its first ';' or '(' (column headers stay narrow; ``summary()`` has it all)."""
    head = status.split(";")[0].split(" (")[0].strip()
    return head if len(head) <= 60 else head[:59] + "…"


def fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(map(str, shape)) or "scalar"
