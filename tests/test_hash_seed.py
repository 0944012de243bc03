"""Nothing a run produces depends on ``PYTHONHASHSEED`` (set and dict order, ``hash()``): the same
compile in processes with different seeds gives byte-identical pipeline strings, pass-order
warnings, report rows (all but the timings), pass statistics, snapshots and ONNX bytes. This is
how CI proves hash-seed independence without running the suite twice (``.ci/run``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEEDS = ("0", "98765")
PIPELINE = ("remove-dropout,fold-batchnorm,prune-nm,prune-channels{ratio=0.4},quantize-int8{calibration-batches=2},"
            "onnx-fold-constants,onnx-cleanup")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(self.drop(y.mean(dim=(2, 3))))


def run_record() -> str:
    """Everything one compile produces that must not depend on the hash seed, as text."""
    import fxcompress as fxc

    torch.manual_seed(0)
    model = Net().eval()
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 3, 8, 8, generator=gen),)
    calibration = [(torch.randn(2, 3, 8, 8, generator=gen),) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fxc.compile(model, x, PIPELINE, target="onnx", calibration=calibration, progress=False)
    rows = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in compiled.report]
    return json.dumps({
        "pipeline": compiled.pipeline,
        "warnings": [str(w.message) for w in caught if issubclass(w.category, fxc.PassOrderWarning)],
        "rows": rows,
        "snapshots": [s.text for s in compiled.snapshots],
        "onnx": hashlib.sha256(compiled.onnx_model.SerializeToString(deterministic=True)).hexdigest(),
    }, indent=1, sort_keys=True, default=repr)


def test_compile_is_identical_across_hash_seeds() -> None:
    code = f"import sys\nsys.path.insert(0, {str(HERE)!r})\nfrom test_hash_seed import run_record\n" \
           "sys.stdout.write(run_record())\n"
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in SEEDS]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    assert outs[0] == outs[1]
    record = json.loads(outs[0])
    assert record["pipeline"] == PIPELINE
    (warning,) = record["warnings"]   # the record covers the warning text too
    assert "suggested order: remove-dropout,fold-batchnorm,prune-channels{ratio=0.4},prune-nm," in warning
    assert [r["name"] for r in record["rows"]][-3:] == ["export-onnx", "onnx-fold-constants", "onnx-cleanup"]
    assert all(r["status"] in ("ok", "unchanged") for r in record["rows"]), record["rows"]
    assert record["rows"][4]["stats"]["layers"]  # prune-channels' per-layer choices are in the record
