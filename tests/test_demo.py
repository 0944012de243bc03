"""`fxcompress demo` end to end, as a user runs it: its printed table is the claim being tested."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _size(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)([KMG]?)B", text).groups()  # type: ignore[union-attr]
    return float(value) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[unit]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="220")
    proc = subprocess.run([sys.executable, "-m", "fxcompress.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 7 and cells[1].endswith("%"):
            rows[cells[0]] = cells
    stages = list(rows)
    assert stages[:2] == ["original (eager torch)", "input"]
    assert any(s.startswith("prune-channels") for s in stages) and any(s.startswith("distill") for s in stages)
    assert "quantize-int8" in stages and stages[-1] == "export-onnx"
    original_acc = float(rows["original (eager torch)"][1].rstrip("%"))
    final_acc = float(rows["export-onnx"][1].rstrip("%"))
    assert original_acc > 95.0
    assert final_acc >= original_acc - 2.0, (original_acc, final_acc)
    fp32_size, int8_size = _size(rows["input"][4]), _size(rows["export-onnx"][4])
    assert fp32_size > 3 * int8_size, (fp32_size, int8_size)
    assert "result: accuracy" in proc.stdout
    out = tmp_path / "demo"
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "distill" in html and "<img" in html
