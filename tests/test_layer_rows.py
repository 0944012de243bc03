"""``PassLayerRow``, a pass's typed per-layer table: JSON round trip, report.json, artifacts saved before it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.artifact import write_manifest
from fxcompress.report import PassRecord, Report


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


X = (torch.randn(2, 3, 8, 8),)


def test_json_round_trip_keeps_every_field() -> None:
    row = fxc.PassLayerRow("layer1.0.conv", kind="Conv2d", unit="channels", before=64, after=32, precision="int8",
                       metrics={"sparsity": 0.5, "rel_mse": float("nan")}, key_metric="sparsity",
                       worse="higher", note="ranked <first>")
    data = json.loads(json.dumps(row.to_dict()))
    assert data["metrics"]["rel_mse"] == "nan"
    back = fxc.PassLayerRow.from_dict(data)
    assert math.isnan(back.metrics.pop("rel_mse")) and row.metrics.pop("rel_mse") != 0
    assert back == row and back.before == 64.0 and back.key_value == 0.5


def test_defaults_are_left_out_and_checked() -> None:
    assert fxc.PassLayerRow("fc", precision="float").to_dict() == {"layer": "fc", "precision": "float"}
    assert fxc.PassLayerRow.from_dict({"layer": "fc"}) == fxc.PassLayerRow("fc")
    assert fxc.PassLayerRow("fc").key_value is None
    with pytest.raises(ValueError, match="key_metric='mse' is not one of its metrics"):
        fxc.PassLayerRow("fc", metrics={"cosine": 1.0}, key_metric="mse")
    with pytest.raises(ValueError, match="worse='up'"):
        fxc.PassLayerRow("fc", worse="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no field"):
        fxc.PassLayerRow.from_dict({"layer": "fc", "colour": "red"})


def test_report_json_carries_the_rows_and_reads_rows_without_them() -> None:
    rows = [fxc.PassLayerRow("conv", unit="channels", before=8, after=4)]
    report = Report([PassRecord(0, "input", "fx"), PassRecord(1, "prune-channels", "fx", layers=rows)])
    data = json.loads(report.to_json())
    assert data["passes"][0]["layers"] == [] and data["passes"][1]["layers"] == [r.to_dict() for r in rows]
    assert Report.from_dict(data)[1].layers == rows
    for row in data["passes"]:
        del row["layers"]
    assert [r.layers for r in Report.from_dict(data)] == [[], []]


def _resign(out: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["report.json"] = hashlib.sha256((out / "report.json").read_bytes()).hexdigest()
    write_manifest(out, manifest)


def test_artifacts_keep_the_rows_and_older_ones_still_load(tmp_path: Path) -> None:
    compiled = fxc.compile(Net(), X, "prune-channels{ratio=0.5}", target="onnxruntime")
    (pruned,) = compiled.report.find("prune-channels")
    assert [(r.layer, r.unit, r.before, r.after) for r in pruned.layers] == [("conv", "channels", 8, 4),
                                                                           ("fc", "channels", 3, 3)]
    out = compiled.save(tmp_path / "new")
    assert fxc.load(out).report.find("prune-channels")[0].layers == pruned.layers

    old = compiled.save(tmp_path / "old")  # as written before report rows had ``layers``
    report = json.loads((old / "report.json").read_text())
    for row in report["passes"]:
        del row["layers"]
    (old / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _resign(old)
    loaded = fxc.load(old)
    assert [r.layers for r in loaded.report] == [[] for _ in compiled.report]
    assert loaded.report.find("prune-channels")[0].stats["layers"]["conv"]["channels_after"] == 4
