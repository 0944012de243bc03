"""Saved artifacts: round trip in a process that cannot import the model, tamper and version checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress as fxc


class SecretNet(nn.Module):
    """Defined only in this test module: the loading process cannot import it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


X = (torch.randn(2, 1, 6, 6),)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, fxc.Compiled]:
    out = tmp_path_factory.mktemp("artifact") / "out"
    compiled = fxc.compile(SecretNet().eval(), X, "fold-batchnorm,eliminate-dead-code", target="onnxruntime")
    compiled.save(out)
    return out, compiled


def test_layout_and_manifest(saved: tuple[Path, fxc.Compiled]) -> None:
    out, compiled = saved
    assert sorted(p.name for p in (out / "graphs").iterdir()) == [
        "00_input.fxg", "01_fold-batchnorm.fxg", "02_eliminate-dead-code.fxg", "03_export-onnx.fxg"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["pipeline"] == "fold-batchnorm,eliminate-dead-code"
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 1, 6, 6], "dtype": "float32"}]
    assert manifest["versions"]["torch"].startswith("2.") and manifest["versions"]["onnxruntime"]
    assert set(manifest["files"]) == {"model.onnx", "report.json", *(f"graphs/{p.name}" for p in (out / "graphs").iterdir())}
    assert manifest["backend"] == "onnxruntime"
    assert b"pickle" not in (out / "model.onnx").read_bytes()[:0]  # artifacts hold no pickles: only ONNX/JSON/text
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["passes"]] == ["input", "fold-batchnorm", "eliminate-dead-code", "export-onnx"]


def test_load_in_a_fresh_process_without_the_model_code(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    out, compiled = saved
    np.save(tmp_path / "x.npy", X[0].numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        try:
            import test_artifact
            raise SystemExit("the model's module must not be importable here")
        except ImportError:
            pass
        import fxcompress as fxc
        c = fxc.load({str(out)!r})
        y = c(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))
        np.save({str(tmp_path / 'y.npy')!r}, y.numpy())
        print(c.backend, c.pipeline)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["onnxruntime", "fold-batchnorm,eliminate-dead-code"]
    with torch.no_grad():
        expected = SecretNet().eval()(*X)
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "y.npy")), expected, rtol=1e-4, atol=1e-5)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_file_is_refused(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    out = _copy(saved[0], tmp_path / "copy")
    data = bytearray((out / "model.onnx").read_bytes())
    data[-5] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(fxc.ArtifactError, match=r"model.onnx was modified after saving: sha256"):
        fxc.load(out)


def test_missing_file_and_unknown_version_are_refused(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    out = _copy(saved[0], tmp_path / "v2")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxc.ArtifactError, match=r"unknown artifact format version 99; this fxcompress reads version 1"):
        fxc.load(out)
    gone = _copy(saved[0], tmp_path / "gone")
    (gone / "report.json").unlink()
    with pytest.raises(fxc.ArtifactError, match=r"report.json is listed in the manifest but missing"):
        fxc.load(gone)
    with pytest.raises(fxc.ArtifactError, match=r"manifest.json is missing"):
        fxc.load(tmp_path)


def test_fx_target_saves_an_exported_model(tmp_path: Path) -> None:
    compiled = fxc.compile(SecretNet().eval(), X, "fold-batchnorm", target="fx")
    again = fxc.load(compiled.save(tmp_path / "fx"))
    with torch.no_grad():
        assert torch.allclose(again(*X), compiled.graph_module(*X), rtol=1e-4, atol=1e-5)


def test_input_validation_names_the_input(saved: tuple[Path, fxc.Compiled]) -> None:
    compiled = saved[1]
    with pytest.raises(fxc.InputError, match="takes 1 input"):
        compiled(X[0], X[0])
    with pytest.raises(fxc.InputError, match="x"):
        compiled(torch.randn(2, 3, 6, 6))


def test_tensorrt_rtx_engine_in_artifact_and_fallback_in_manifest(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu12 is not installed (test extra)")
    from fxcompress.backends.tensorrt import gpu_available

    compiled = fxc.compile(SecretNet().eval(), X, "fold-batchnorm", target="tensorrt-rtx", fallback="onnxruntime")
    assert compiled.engine and len(compiled.engine) > 10_000
    out = compiled.save(tmp_path / "trt")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"]["module"] == "tensorrt_rtx" and manifest["engine"]["options"]["precision"] == "fp32"
    assert (out / "model.engine").read_bytes() == compiled.engine
    if not gpu_available():
        assert manifest["backend"].startswith("onnxruntime (fallback from tensorrt-rtx: ")
        assert "GPU" in manifest["backend"]
        again = fxc.load(out)
        assert again.backend == manifest["backend"]
        with torch.no_grad():
            assert torch.allclose(again(*X), SecretNet().eval()(*X), rtol=1e-4, atol=1e-5)
        strict = fxc.compile(SecretNet().eval(), X, "fold-batchnorm", target="tensorrt-rtx")
        with pytest.raises(fxc.BackendUnavailable, match="needs an NVIDIA GPU"):
            strict(*X)
