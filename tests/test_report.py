"""The printed report keeps text that looks like rich markup (node tags, option lists) verbatim."""

from __future__ import annotations

from fxcompress.report import PassRecord, Report


def test_render_keeps_brackets_in_names_nodes_and_messages() -> None:
    row = PassRecord(1, "repeat{n=2}[prune]", "fx", status="rolled back",
                     diagnostics=[{"severity": "error", "node": "relu", "message": "bad value [bold]x[/bold]"}])
    text = Report([PassRecord(0, "input", "fx"), row], meta={"backend": "onnxruntime [cpu]"}).render()
    assert "1 repeat{n=2}[prune]: error [relu]: bad value [bold]x[/bold]" in text
    assert "backend: onnxruntime [cpu]" in text
    (table_row,) = [line for line in text.splitlines() if line.startswith("│ 1 ")]
    assert "│ repeat{n=2}[prune] │" in table_row
