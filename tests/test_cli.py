"""The command line, run as a user runs it: a subprocess on a real model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()

    def with_inputs():
        return make_model(), (torch.randn(1, 3, 8, 8),)

    def not_a_model():
        return 42
""")


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fxcompress.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=_env())


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["COLUMNS"] = "200"
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "mymodels.py").write_text(MODELS)
    proc = run("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "fold-batchnorm",
               "--target", "onnxruntime", "--out", "out", cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert "fold-batchnorm" in proc.stdout and "export-onnx" in proc.stdout and "wrote out/" in proc.stdout
    return d


def test_compile_writes_the_artifact(workdir: Path) -> None:
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert manifest["pipeline"] == "fold-batchnorm"
    assert manifest["source"] == {"factory": "mymodels:make_model", "input_shape": "1x3x8x8"}
    assert (workdir / "out" / "graphs" / "02_export-onnx.fxg").is_file()


def test_compile_with_factory_inputs(workdir: Path) -> None:
    proc = run("compile", "mymodels:with_inputs", "--target", "fx", "--out", "out_fx", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((workdir / "out_fx" / "manifest.json").read_text())["inputs"][0]["shape"] == [1, 3, 8, 8]


def test_inspect_artifact_and_onnx(workdir: Path) -> None:
    proc = run("inspect", "out", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "# fxg 1 onnx" in proc.stdout and "Conv(" in proc.stdout and "fold-batchnorm" in proc.stdout
    proc = run("inspect", "out/model.onnx", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "# fxg 1 onnx" in proc.stdout and "CheckTensorRT: 1 finding(s)" in proc.stdout
    assert "has dynamic dims (0:batch) but no optimization profile" in proc.stdout
    proc = run("inspect", "out/model.onnx", "--input-shape", "1x3x8x8", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "CheckTensorRT: 0 finding(s)" in proc.stdout


def test_diff(workdir: Path) -> None:
    proc = run("diff", "out/graphs/00_input.fxg", "out/graphs/01_fold-batchnorm.fxg", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "-call_module   %_1 = 1:BatchNorm2d(8" in proc.stdout
    assert "+++ out/graphs/01_fold-batchnorm.fxg" in proc.stdout


def test_bench_compare_eager(workdir: Path) -> None:
    proc = run("bench", "out", "--compare-eager", "--iters", "20", "--warmup", "2", "--json", "bench.json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "eager (torch)" in proc.stdout and "compiled (onnxruntime)" in proc.stdout
    data = json.loads((workdir / "bench.json").read_text())["results"]
    assert data[0]["name"] == "eager (torch)" and data[1]["vs_baseline"]["speedup"] > 0
    assert data[1]["size_bytes"] > 0 and data[1]["median_ms"] > 0


@pytest.mark.parametrize("args, message", [
    (("compile", "nosuchmodule:make", "--input-shape", "1x3x8x8"), "cannot import module 'nosuchmodule'"),
    (("compile", "mymodels", "--input-shape", "1x3x8x8"), "expected 'module:factory'"),
    (("compile", "mymodels:missing", "--input-shape", "1x3x8x8"), "has no callable 'missing'"),
    (("compile", "mymodels:not_a_model", "--input-shape", "1x3x8x8"), "returned int, not a torch.nn.Module"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3xeight"), "--input-shape '1x3xeight'"),
    (("compile", "mymodels:make_model", "--input-shape", "1x5x8x8"), "x"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "fold-batchnrom"),
     "unknown pass 'fold-batchnrom'"),
    (("inspect", "missing.onnx"), "missing.onnx: no such file"),
    (("diff", "a.fxg", "b.fxg"), "a.fxg: no such file"),
    (("bench", "nowhere"), "not an artifact directory"),
])
def test_errors_are_one_clear_line(workdir: Path, args: tuple[str, ...], message: str,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's own entry point, in-process (a subprocess per case would only add interpreter start-up)."""
    from fxcompress import cli

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["fxcompress", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


def test_error_exit_code_in_a_real_process(workdir: Path) -> None:
    proc = run("inspect", "missing.onnx", cwd=workdir)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: missing.onnx: no such file or directory"


def test_list_recipes(workdir: Path) -> None:
    proc = run("compile", "--list-recipes", cwd=workdir)
    assert proc.returncode == 0
    assert "prune50-int8" in proc.stdout and "fold-batchnorm" in proc.stdout


@pytest.mark.parametrize("cmd", ["compile", "inspect", "diff", "bench", "compare", "demo", "passes"])
def test_help_for_every_command(cmd: str) -> None:
    from typer.testing import CliRunner

    from fxcompress.cli import app

    result = CliRunner().invoke(app, [cmd, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output and cmd in result.output
