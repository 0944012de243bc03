"""The per-pass report: one row per pipeline step, printable as a table, saved as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .layer_rows import PassLayerRow
from .units import format_bytes, format_count, format_value


@dataclass(frozen=True)
class Snapshot:
    """Canonical text of the graph after a pipeline step (``index`` 0 = before the first pass)."""

    index: int
    name: str
    stage: str
    text: str

    @property
    def filename(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name.split("{", 1)[0])
        return f"{self.index:02d}_{safe}.fxg"

    def __str__(self) -> str:
        return self.text


@dataclass
class PassRecord:
    """What one step of the pipeline did (the first row, ``input``, is the traced graph)."""

    index: int
    name: str
    stage: str
    status: str = "ok"  # ok | unchanged | rolled-back | not-run
    changed: bool = False
    weights_changed: bool = False
    seconds: float = 0.0
    nodes: int = 0
    params: int = 0
    nonzero: int = 0
    #: weight bytes (parameters and buffers in their dtypes), not the size of a model file
    bytes: int = 0
    macs: int = 0
    error: dict[str, Any] | None = None
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    #: the pass's per-layer table (``PassResult.layers``)
    layers: list[PassLayerRow] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**_jsonable(asdict(self)), "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PassRecord":
        """The inverse of ``to_dict``; a row saved before ``layers`` existed loads with none."""
        row = dict(data)
        row["layers"] = [PassLayerRow.from_dict(layer) for layer in row.get("layers", [])]
        return cls(**row)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


class Report(Sequence[PassRecord]):
    """Rows of a pipeline run plus run-level facts (``meta``: backend, opaque modules, ...)."""

    def __init__(self, rows: Sequence[PassRecord] = (), meta: dict[str, Any] | None = None) -> None:
        self.rows: list[PassRecord] = list(rows)
        self.meta: dict[str, Any] = dict(meta or {})

    def __getitem__(self, i):  # type: ignore[override]
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PassRecord]:
        return iter(self.rows)

    def append(self, row: PassRecord) -> None:
        self.rows.append(row)

    def find(self, name: str) -> list[PassRecord]:
        """Rows whose pass is ``name`` (the pass name or its full pipeline-string form)."""
        return [r for r in self.rows if r.name == name or r.name.split("{", 1)[0] == name]

    def table(self, title: str | None = "fxcompress report") -> Table:
        t = Table(title=title, show_lines=False)
        for col, justify in (("#", "right"), ("pass", "left"), ("status", "left"), ("time", "right"),
                             ("nodes", "right"), ("params", "right"), ("nonzero", "right"),
                             ("weights", "right"), ("MACs", "right"), ("max abs err", "right"),
                             ("cosine", "right"), ("top-1", "right")):
            t.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r in self.rows:
            err = r.error or {}
            t.add_row(
                str(r.index), escape(r.name), r.status, f"{r.seconds:.2f}s", str(r.nodes), format_count(r.params),
                format_count(r.nonzero), format_bytes(r.bytes), format_count(r.macs),
                format_value(err.get("max_abs"), "{:.2e}"), format_value(err.get("cosine"), "{:.6f}"),
                format_value(err.get("top1"), "{:.3f}"))
        return t

    def render(self, width: int = 160) -> str:
        console = Console(width=width, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        for key, value in self.meta.items():
            if value:
                console.print(f"{key}: {_meta_text(key, value)}", markup=False, highlight=False)
        for r in self.rows:
            for d in r.diagnostics:
                if d.get("severity") in ("warning", "error"):
                    where = f" [{d['node']}]" if d.get("node") else ""
                    console.print(f"{r.index} {r.name}: {d['severity']}{where}: {d['message']}", markup=False,
                                  highlight=False)
        return console.export_text()

    def __str__(self) -> str:
        return self.render()

    def __repr__(self) -> str:
        return f"Report({len(self.rows)} rows)"

    def to_dict(self) -> dict[str, Any]:
        return {"meta": _jsonable(self.meta), "passes": [r.to_dict() for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        rows = [PassRecord.from_dict(row) for row in data.get("passes", [])]
        return cls(rows, data.get("meta", {}))


def _meta_text(key: str, value: Any) -> str:
    if key == "engine" and isinstance(value, dict):
        return (f"{value.get('module')} {value.get('version')}, {format_bytes(value.get('bytes') or 0)}, "
                f"built in {value.get('build_seconds', 0):.2f}s, precision {value.get('options', {}).get('precision')}")
    if isinstance(value, dict):
        return ", ".join(f"{k} ({v})" for k, v in value.items())
    return str(value)


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        return None
