"""Saved artifacts: round trip in a process that cannot import the model, tamper and version checks."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

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
    assert manifest["format_version"] == 2 and manifest["pipeline"] == "fold-batchnorm,eliminate-dead-code"
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 1, 6, 6], "dtype": "float32"}]
    assert manifest["versions"]["torch"].startswith("2.") and manifest["versions"]["onnxruntime"]
    assert set(manifest["files"]) == {"model.onnx", "report.json", *(f"graphs/{p.name}" for p in (out / "graphs").iterdir())}
    assert manifest["backend"] == "onnxruntime"
    assert_no_pickles(out)
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["passes"]] == ["input", "fold-batchnorm", "eliminate-dead-code", "export-onnx"]


def assert_no_pickles(out: Path) -> None:
    """Every file is ONNX, JSON, graph text or an engine: none starts like a pickle (0x80 + protocol) or
    a torch.save zip, and each parses as what its name says."""
    import onnx

    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.suffix for p in files} <= {".onnx", ".json", ".fxg", ".engine"}, files
    for p in files:
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", p
        if p.suffix == ".onnx":
            onnx.checker.check_model(onnx.load_model(str(p)))
        elif p.suffix == ".json":
            assert isinstance(json.loads(p.read_text(encoding="utf-8")), dict), p
        elif p.suffix == ".fxg":
            assert p.read_text(encoding="utf-8").startswith("# fxg 1 "), p


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
    _edit_manifest(out, lambda m: m.update(format_version=99))
    with pytest.raises(fxc.ArtifactError, match=r"unknown artifact format version 99; this fxcompress reads version 2"):
        fxc.load(out)
    gone = _copy(saved[0], tmp_path / "gone")
    (gone / "report.json").unlink()
    with pytest.raises(fxc.ArtifactError, match=r"report.json is listed in the manifest but missing"):
        fxc.load(gone)
    with pytest.raises(fxc.ArtifactError, match=r"manifest.json is missing"):
        fxc.load(tmp_path)


def _edit_manifest(out: Path, edit: Any) -> None:
    """Edit the manifest and re-sign it (its digest), so load gets past the digest to the check under test."""
    from fxcompress.artifact import write_manifest

    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    write_manifest(out, manifest)


def test_unlisted_model_with_rewritten_weights_is_refused(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    out = _copy(saved[0], tmp_path / "unlisted")
    model = onnx.load_model(str(out / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.dims))
    weight.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(weight)), weight.name))
    onnx.save_model(model, str(out / "model.onnx"))
    _edit_manifest(out, lambda m: m["files"].pop("model.onnx"))
    with pytest.raises(fxc.ArtifactError, match=r"model.onnx is not listed in the manifest's files, so its sha256 "
                                                r"cannot be checked; refusing to load it"):
        fxc.load(out)
    snap = _copy(saved[0], tmp_path / "snap")
    _edit_manifest(snap, lambda m: m["files"].pop("graphs/01_fold-batchnorm.fxg"))
    with pytest.raises(fxc.ArtifactError, match=r"graphs/01_fold-batchnorm.fxg is not listed"):
        fxc.load(snap)


def test_empty_files_map_is_refused(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    for name, edit in [("empty", lambda m: m.update(files={})), ("absent", lambda m: m.pop("files"))]:
        out = _copy(saved[0], tmp_path / name)
        _edit_manifest(out, edit)
        with pytest.raises(fxc.ArtifactError, match=r"the manifest lists no files \(its 'files' map is missing or "
                                                    r"empty\), so nothing can be verified"):
            fxc.load(out)


def test_unlisted_engine_is_refused_and_a_listed_one_is_verified(saved: tuple[Path, fxc.Compiled],
                                                                 tmp_path: Path) -> None:
    out = _copy(saved[0], tmp_path / "engine")
    (out / "model.engine").write_bytes(b"not an engine")
    with pytest.raises(fxc.ArtifactError, match=r"model.engine is not listed in the manifest, so its sha256 cannot "
                                                r"be checked; refusing to load an unverified engine"):
        fxc.load(out)
    _edit_manifest(out, lambda m: m["files"].update({"model.engine": "0" * 64}))
    with pytest.raises(fxc.ArtifactError, match=r"model.engine was modified after saving"):
        fxc.load(out)


def test_resaving_without_an_engine_removes_a_stale_one(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    """An engine the old manifest lists goes; one it does not list is refused unless overwrite=True."""
    out = _copy(saved[0], tmp_path / "stale")
    (out / "model.engine").write_bytes(b"from an earlier save")
    with pytest.raises(fxc.ArtifactError, match=r"model.engine is not listed in the artifact's manifest; save only "
                                                r"removes files a previous manifest listed: .* overwrite=True"):
        saved[1].save(out)
    assert (out / "model.engine").read_bytes() == b"from an earlier save"
    saved[1].save(out, overwrite=True)
    assert not (out / "model.engine").exists()
    _edit_manifest(out, lambda m: m.update(engine={"module": "tensorrt_rtx"}))
    (out / "model.engine").write_bytes(b"listed")
    _edit_manifest(out, lambda m: m["files"].update({"model.engine": hashlib.sha256(b"listed").hexdigest()}))
    saved[1].save(out)
    assert not (out / "model.engine").exists()
    assert fxc.load(out).engine is None


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].update({"../outside.txt": "0" * 64}),
     r"file path '\.\./outside\.txt' leaves the artifact directory"),
    (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), r"file path '/etc/hostname' leaves the artifact"),
    (lambda m: m["snapshots"][0].update(file="../outside.txt"),
     r"\.\./outside\.txt is not listed in the manifest's files"),
])
def test_paths_leaving_the_directory_are_refused(saved: tuple[Path, fxc.Compiled], tmp_path: Path, edit: Any,
                                                 message: str) -> None:
    out = _copy(saved[0], tmp_path / "traversal")
    (tmp_path / "outside.txt").write_text("secret")
    _edit_manifest(out, edit)
    with pytest.raises(fxc.ArtifactError, match=message):
        fxc.load(out)


def test_symlink_out_of_the_directory_is_refused(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    out = _copy(saved[0], tmp_path / "link")
    (tmp_path / "elsewhere.onnx").write_bytes((out / "model.onnx").read_bytes())
    (out / "model.onnx").unlink()
    (out / "model.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    with pytest.raises(fxc.ArtifactError, match=r"file path 'model.onnx' leaves the artifact directory"):
        fxc.load(out)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return y, y.softmax(-1)


@pytest.mark.parametrize("target", ["onnxruntime", "fx"])
def test_manifest_io_names_are_the_onnx_graphs(target: str, tmp_path: Path) -> None:
    import onnx

    x = torch.randn(2, 4)
    compiled = fxc.compile(TwoHeads().eval(), (x,), "eliminate-dead-code", target=target)
    out = compiled.save(tmp_path / target)
    graph = onnx.load_model(str(out / "model.onnx")).graph
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == [o.name for o in graph.output] == ["output", "output_1"]
    assert [i["name"] for i in manifest["inputs"]] == [i.name for i in graph.input] == ["x"]
    assert [o["shape"] for o in manifest["outputs"]] == [[2, 3], [2, 3]]
    again = fxc.load(out)
    assert [o["name"] for o in again.outputs] == ["output", "output_1"]
    y, p = again(x)
    torch.testing.assert_close(p, y.softmax(-1))


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


@pytest.mark.parametrize("target, runs_before_saving", [("fx", True), ("onnx", False)])
def test_loaded_backend_label_is_what_it_runs_on(target: str, runs_before_saving: bool, tmp_path: Path) -> None:
    compiled = fxc.compile(SecretNet().eval(), X, "fold-batchnorm", target=target)
    assert compiled.backend == ("fx" if target == "fx" else "none")
    if not runs_before_saving:
        with pytest.raises(fxc.BackendUnavailable):
            compiled(*X)
    out = compiled.save(tmp_path / target)
    again = fxc.load(out)
    assert again.backend == again.report.meta["backend"] == "onnxruntime"
    assert again.target == json.loads((out / "manifest.json").read_text())["target"] == target
    assert repr(again) == f"Compiled(target={target!r}, backend='onnxruntime', pipeline='fold-batchnorm')"
    with torch.no_grad():
        assert torch.allclose(again(*X), SecretNet().eval()(*X), rtol=1e-4, atol=1e-5)
    assert fxc.load(out, backend="none").backend == "none"


def test_load_rejects_a_backend_it_cannot_run_on(saved: tuple[Path, fxc.Compiled]) -> None:
    out = saved[0]
    with pytest.raises(fxc.InputError, match=r"unknown backend 'bogus'; choose one of: fx, onnxruntime, tensorrt, "
                                             r"tensorrt-rtx, none"):
        fxc.load(out, backend="bogus")
    with pytest.raises(fxc.BackendUnavailable, match=r"backend 'fx' needs the torch.fx GraphModule .* it can run on: "
                                                     r"onnxruntime \(or 'none'\)"):
        fxc.load(out, backend="fx")
    no_engine = fxc.load(out, backend="tensorrt")  # fails when run, like an engine without a GPU
    with pytest.raises(fxc.BackendUnavailable, match=r"no tensorrt engine in this artifact; it can run on: onnxruntime"):
        no_engine(*X)
    rtx = fxc.load(out)
    rtx.engine, rtx.engine_info = b"an engine", {"module": "tensorrt_rtx"}
    assert rtx.runnable_backends() == ["onnxruntime", "tensorrt-rtx"]
    with pytest.raises(fxc.BackendUnavailable, match=r"backend 'tensorrt' needs an engine built with tensorrt, .* "
                                                     r"it can run on: onnxruntime, tensorrt-rtx"):
        rtx.use_backend("tensorrt")
    with pytest.raises(fxc.InputError, match="unknown backend 'ort'"):
        saved[1].use_backend("ort")
    assert saved[1].backend == "onnxruntime"


def test_resaving_removes_stale_graph_files(saved: tuple[Path, fxc.Compiled], tmp_path: Path) -> None:
    out = _copy(saved[0], tmp_path / "regraph")
    (out / "graphs" / "07_old-pass.fxg").write_text("# fxg 1 fx\n")
    (out / "graphs" / "notes.txt").write_text("kept: not a graph file")
    shorter = fxc.compile(SecretNet().eval(), X, "fold-batchnorm", target="onnxruntime")
    with pytest.raises(fxc.ArtifactError, match=r"07_old-pass.fxg is not listed in the artifact's manifest"):
        shorter.save(out)
    (out / "graphs" / "07_old-pass.fxg").unlink()
    shorter.save(out)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = {s["file"] for s in manifest["snapshots"]}
    assert {f"graphs/{p.name}" for p in (out / "graphs").glob("*.fxg")} == listed == {
        "graphs/00_input.fxg", "graphs/01_fold-batchnorm.fxg", "graphs/02_export-onnx.fxg"}
    assert (out / "graphs" / "notes.txt").read_text() == "kept: not a graph file"
    with pytest.warns(UserWarning, match=r"ignoring graphs/notes.txt: not part of the artifact"):
        assert len(fxc.load(out).snapshots) == 3


def test_manifest_pipeline_full_writes_every_option_and_parses_to_the_same_passes(tmp_path: Path) -> None:
    from passes import FoldBatchNorm, PruneChannels

    from fxcompress.options import option_names

    pipeline = fxc.Pipeline([FoldBatchNorm(), fxc.Repeat(2, (PruneChannels(ratio=0.25),))])
    compiled = fxc.compile(SecretNet().eval(), X, pipeline, target="onnxruntime")
    out = compiled.save(tmp_path / "full")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pipeline"] == "fold-batchnorm,repeat{n=2}(prune-channels{ratio=0.25})"
    full = manifest["pipeline_full"]
    assert all(f"{o}=" in full for o in option_names(PruneChannels)) and "round-to=1" in full
    assert tuple(fxc.parse_pipeline(full)) == pipeline.passes == tuple(fxc.parse_pipeline(manifest["pipeline"]))
    loaded = fxc.load(out)
    assert loaded.pipeline_full == full
    _edit_manifest(out, lambda m: m.update(pipeline_full=full.replace("round-to=1", "round-to=8")))
    resaved = fxc.load(out).save(tmp_path / "again")
    assert "round-to=8" in json.loads((resaved / "manifest.json").read_text())["pipeline_full"]
