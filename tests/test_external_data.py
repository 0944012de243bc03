"""Models over protobuf's 2 GiB (issue #15): external-data ONNX, exercised on a small model by lowering
``onnx_graph.EXTERNAL_DATA_THRESHOLD``: export, ONNX Runtime sessions, artifact hashes and tampering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress import onnx_graph
from fxcompress.errors import ArtifactError


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> tuple[fxc.Compiled, torch.Tensor]:
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 4096)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 32)
    return fxc.compile(model, (x,), "remove-dropout,onnx-cleanup", progress=False), x


def test_a_model_over_the_threshold_runs_in_onnx_runtime(compiled: tuple[fxc.Compiled, torch.Tensor]) -> None:
    c, x = compiled
    assert onnx_graph.needs_external_data(c.onnx_model)
    with torch.no_grad():
        torch.testing.assert_close(c(x), c.graph_module(x), rtol=1e-5, atol=1e-6)


def test_the_artifact_keeps_weights_in_a_hashed_data_file(compiled: tuple[fxc.Compiled, torch.Tensor],
                                                          tmp_path: Path) -> None:
    c, x = compiled
    out = c.save(tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    loaded = fxc.load(out)
    torch.testing.assert_close(loaded(x), c(x), rtol=0, atol=0)
    data = bytearray((out / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data was modified after saving"):
        fxc.load(out)


def test_an_unlisted_data_file_is_refused(compiled: tuple[fxc.Compiled, torch.Tensor], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    c, _ = compiled
    monkeypatch.setattr(onnx_graph, "EXTERNAL_DATA_THRESHOLD", 2**31)
    out = c.save(tmp_path / "small")
    assert not (out / "model.onnx.data").exists()
    (out / "model.onnx.data").write_bytes(b"\0" * 64)
    with pytest.raises(ArtifactError, match="not listed in the manifest"):
        fxc.load(out)
