"""`fxcompress demo` end to end, as a user runs it: its printed table is the claim being tested."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _size(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+) ([KMG]i)?B", text).groups()  # type: ignore[union-attr]
    return float(value) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[unit]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="220")
    proc = subprocess.run([sys.executable, "-m", "fxcompress.cli", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, bench = {}, {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 7 and cells[1].endswith("%"):
            rows[cells[0]] = cells
        elif len(cells) == 9 and cells[1] == "1":  # the benchmark table, batch 1
            bench[cells[0]] = cells
    stages = list(rows)
    assert stages[:2] == ["original (eager torch)", "input"]
    assert any(s.startswith("prune-channels") for s in stages) and any(s.startswith("distill") for s in stages)
    assert "quantize-int8" in stages and stages[-1] == "export-onnx"
    original_acc = float(rows["original (eager torch)"][1].rstrip("%"))
    final_acc = float(rows["export-onnx"][1].rstrip("%"))
    assert original_acc > 95.0
    assert final_acc >= original_acc - 2.0, (original_acc, final_acc)
    # INT8 against the FP32 graph it was made from (after pruning), not against the unpruned input
    before_int8 = stages[stages.index("quantize-int8") - 1]
    assert before_int8 == "fold-batchnorm"
    fp32_size, int8_size = _size(rows[before_int8][4]), _size(rows["export-onnx"][4])
    assert fp32_size > 3 * int8_size, (fp32_size, int8_size)
    assert _size(rows["input"][4]) > fp32_size, "pruning is expected to shrink the FP32 graph too"

    # median, p90, throughput, process peak RSS, weights and file of the final ORT session next to eager
    assert list(bench) == ["eager (torch)", "final (onnxruntime)"], proc.stdout
    for name, (_, _, median, p90, throughput, peak, weights, _, _) in bench.items():
        assert 0 < float(median) <= float(p90), (name, median, p90)
        rounding = 0.0005 / float(median)  # the median is printed to 3 decimals of a ms
        assert float(throughput) == pytest.approx(1e3 / float(median), rel=0.01 + rounding, abs=0.1), name
        assert float(peak) > 0 and _size(weights) > 0, (name, peak, weights)
    eager, final = bench["eager (torch)"], bench["final (onnxruntime)"]
    # weights as the stage table counts them; the file (graph and Q/DQ params included) only for ONNX
    assert (eager[6], final[6]) == (rows["original (eager torch)"][4], rows["export-onnx"][4])
    assert eager[7] == "-" and _size(final[7]) > _size(final[6])
    speed, direction, weights_ratio = re.fullmatch(r"([\d.]+)x (faster|slower), ([\d.]+)x weights", final[8]).groups()  # type: ignore[union-attr]
    ratio = float(eager[2]) / float(final[2])
    assert float(speed) == pytest.approx(ratio if direction == "faster" else 1 / ratio, rel=0.05)
    assert float(weights_ratio) == pytest.approx(_size(final[6]) / _size(eager[6]), rel=0.05, abs=0.006)
    assert float(weights_ratio) < 1 / 3
    assert "result: accuracy" in proc.stdout
    out = tmp_path / "demo"
    assert (out / "model.onnx").is_file() and (out / "manifest.json").is_file()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "distill" in html and "<img" in html


def test_quick_pipeline_cuts_every_training_pass_and_keeps_the_rest() -> None:
    """--quick runs the demo's recipe with distillation (the demo's longest step) cut to QUICK_EPOCHS."""
    from fxcompress.demo import DEMO_RECIPE, QUICK_EPOCHS, quick_pipeline
    from fxcompress.registry import parse_pipeline, recipes

    full = parse_pipeline(recipes()[DEMO_RECIPE])
    quick = parse_pipeline(quick_pipeline(recipes()[DEMO_RECIPE]))
    assert [p.name for p in quick] == [p.name for p in full]
    (distill_full,) = [p for p in full if p.name == "distill"]
    (distill_quick,) = [p for p in quick if p.name == "distill"]
    assert distill_quick.epochs == QUICK_EPOCHS < distill_full.epochs and distill_quick.lr == distill_full.lr
    assert [p for p in quick if p.name != "distill"] == [p for p in full if p.name != "distill"]
    cut = quick_pipeline("fine-tune{epochs=5},distill{epochs=1}", epochs=2)
    assert cut == "fine-tune{epochs=2},distill{epochs=1}"
