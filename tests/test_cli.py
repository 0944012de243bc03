"""The command line, run as a user runs it: a subprocess on a real model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fxcompress.artifact import write_manifest

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

ZOO_MODELS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from zoo import ZOO

    def digits():
        return ZOO["classifier_digits"]()
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
    gen = np.random.default_rng(0)
    np.save(d / "x8.npy", gen.standard_normal((6, 3, 8, 8)).astype(np.float32))
    np.save(d / "x7.npy", gen.standard_normal((6, 3, 7, 8)).astype(np.float32))
    np.save(d / "y5.npy", gen.integers(0, 5, 5))
    np.save(d / "x1.npy", gen.standard_normal((1, 3, 8, 8)).astype(np.float32))
    (d / "x8.onnx").write_bytes((d / "x8.npy").read_bytes())
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
    # the artifact's model.onnx is checked too, with profiles from the shapes it was compiled with
    assert "check-tensorrt: 0 finding(s)" in proc.stdout
    # a bare model.onnx has no shapes: a warning whose fix is the flag this command takes
    proc = run("inspect", "out/model.onnx", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "# fxg 1 onnx" in proc.stdout and "check-tensorrt: 1 finding(s)" in proc.stdout
    finding = next(line for line in proc.stdout.splitlines() if "dynamic dims" in line)
    assert finding.strip().startswith("warning [input:") and "(0:batch) but no optimization profile" in finding
    assert "--input-shape" in finding and "BuildOptions(profiles=" in finding
    proc = run("inspect", "out/model.onnx", "--input-shape", "1x3x8x8", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "check-tensorrt: 0 finding(s)" in proc.stdout


def test_inspect_groups_repeated_tensorrt_findings_of_an_onnxruntime_int8_artifact(workdir: Path) -> None:
    """ONNX Runtime's asymmetric UINT8 Q/DQ is a TensorRT error on every Q/DQ node: one line per rule
    and fix, naming the nodes, and a note that the artifact was not compiled for TensorRT."""
    proc = run("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "fold-batchnorm,quantize-int8",
               "--calibration", "x8.npy", "--out", "out_int8", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    proc = run("inspect", "out_int8", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    count = int(next(line for line in lines if line.startswith("check-tensorrt:")).split()[1])
    findings = lines[lines.index(f"check-tensorrt: {count} finding(s)") + 1:]
    assert findings[0].strip() == ("(this graph was compiled for onnxruntime; for TensorRT recompile with "
                                   "--target tensorrt-rtx or --target tensorrt)")
    findings = [line for line in findings if not line.strip().startswith("(")]  # notes (parser warnings) first
    grouped = [line for line in findings if " on " in line.split("[", 1)[0] and " nodes [" in line]
    assert grouped and all(line.strip().startswith("error on ") for line in grouped)
    assert any("UINT8" in line for line in grouped)
    nodes_in_groups = sum(int(line.split(" on ", 1)[1].split(" nodes", 1)[0]) for line in grouped)
    assert len(findings) < count and nodes_in_groups + (len(findings) - len(grouped)) == count


def test_diff(workdir: Path) -> None:
    """Like diff(1): exit 1 when the graphs differ, 0 when identical."""
    proc = run("diff", "out/graphs/00_input.fxg", "out/graphs/01_fold-batchnorm.fxg", cwd=workdir)
    assert proc.returncode == 1, proc.stderr
    assert "-call_module   %_1 = 1:BatchNorm2d(8" in proc.stdout
    assert "+++ out/graphs/01_fold-batchnorm.fxg" in proc.stdout


@pytest.fixture(scope="module")
def unfolded(workdir: Path) -> Path:
    """A second artifact of the same model compiled without passes (its BatchNorm stays)."""
    import os

    from fxcompress.api import compile as fx_compile
    from fxcompress.cli import _model_and_inputs

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        model, example = _model_and_inputs("mymodels:make_model", "1x3x8x8")
    finally:
        os.chdir(cwd)
    fx_compile(model, example, "", target="onnxruntime", progress=False).save(workdir / "unfolded")
    return workdir / "unfolded"


def cli_main(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *args: str) -> tuple[int, str, str]:
    """``fxcompress ARGS`` in-process: (exit status, stdout, stderr)."""
    from fxcompress import cli

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["fxcompress", *args])
    monkeypatch.setitem(cli._state, "debug", False)
    capsys.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("a, b", [("out/model.onnx", "unfolded/model.onnx"), ("out", "unfolded"),
                                  ("out", "unfolded/model.onnx"), ("out/graphs/02_export-onnx.fxg", "unfolded")])
def test_diff_of_onnx_models_and_artifact_directories(workdir: Path, unfolded: Path, a: str, b: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """.onnx files and artifact directories diff as their canonical ONNX text; the folded model lost the
    BatchNormalization node the unfolded one still has."""
    code, out, err = cli_main(workdir, monkeypatch, capsys, "diff", a, b)
    assert code == 1, err
    assert f"--- {a}" in out and f"+++ {b}" in out
    added = [line for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any("BatchNormalization(" in line for line in added), out


@pytest.mark.parametrize("a, b", [("out", "out/model.onnx"), ("out/model.onnx", "out/graphs/02_export-onnx.fxg")])
def test_diff_of_the_same_graph_exits_0(workdir: Path, a: str, b: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli_main(workdir, monkeypatch, capsys, "diff", a, b)
    assert (code, out.strip(), err) == (0, "(no differences)", "")


def test_bench_compare_eager(workdir: Path) -> None:
    proc = run("bench", "out", "--compare-eager", "--original", "mymodels:make_model", "--iters", "20", "--warmup",
               "2", "--json", "bench.json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "eager (torch)" in proc.stdout and "compiled (onnxruntime)" in proc.stdout
    data = json.loads((workdir / "bench.json").read_text())["results"]
    assert [r["name"] for r in data] == ["eager (torch)", "compiled (onnxruntime)"]
    eager, compiled = data
    for r in data:
        assert 0 < r["median_ms"] <= r["p90_ms"], r
        assert r["batch"] == 1 and r["throughput"] == pytest.approx(r["batch"] / (r["median_ms"] / 1e3), rel=1e-6)
    # weights compare with weights (the report's size), the file is what ships; eager has no file
    report = json.loads((workdir / "out" / "report.json").read_text())["passes"]
    assert compiled["file_bytes"] == (workdir / "out" / "model.onnx").stat().st_size
    assert compiled["weight_bytes"] == report[-1]["bytes"] < compiled["file_bytes"]
    assert eager["weight_bytes"] == report[0]["bytes"] and eager["file_bytes"] is None
    assert compiled["vs_baseline"]["speedup"] == pytest.approx(eager["median_ms"] / compiled["median_ms"])
    assert compiled["vs_baseline"]["weights"] == pytest.approx(compiled["weight_bytes"] / eager["weight_bytes"])
    assert compiled["vs_baseline"]["file"] is None
    header = next(line for line in proc.stdout.splitlines() if "median ms" in line)
    assert "process peak RSS MiB" in header and "weights" in header and "file" in header and "size" not in header


@pytest.mark.parametrize("engine, meta, expected", [
    ({"module": "tensorrt_rtx", "options": {"precision": "fp16"}}, "fp32", "fp16"),
    (None, "int8", "int8"),
    (None, None, "fp32"),
])
def test_compare_builds_the_trt_side_at_the_artifacts_precision(
        workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: Any, meta: Any,
        expected: str) -> None:
    """`compare` hands compare() the precision the artifact was built with (engine options, else report)."""
    import shutil

    from fxcompress import cli
    from fxcompress import compare as cmp

    art = tmp_path / "art"
    shutil.copytree(workdir / "out", art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest.update(engine=engine, target="tensorrt-rtx", source=None)
    report = json.loads((art / "report.json").read_text())
    report["meta"]["precision"] = meta
    (art / "report.json").write_text(json.dumps(report))
    manifest["files"]["report.json"] = __import__("hashlib").sha256((art / "report.json").read_bytes()).hexdigest()
    write_manifest(art, manifest)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_compare(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(cmp, "compare", fake_compare)
    monkeypatch.setattr(sys, "argv", ["fxcompress", "--debug", "compare", str(art), "--inputs", str(tmp_path / "x.npy")])
    with pytest.raises(Stop):
        cli.main()
    assert seen["precision"] == expected and seen["target"] == "tensorrt-rtx"


@pytest.mark.slow
def test_compile_a_training_recipe_from_npy_files_with_an_html_report(workdir: Path) -> None:
    """prune50-int8 (prune, fine-tune, INT8) on a zoo model, from --train-data/--train-targets .npy files;
    calibration defaults to the training inputs. The HTML report holds the tables and plots."""
    import base64
    import re

    tests = Path(__file__).resolve().parent
    (workdir / "zoomodels.py").write_text(ZOO_MODELS.format(tests=str(tests)))
    gen = np.random.default_rng(1)
    np.save(workdir / "digits_x.npy", gen.standard_normal((48, 1, 8, 8)).astype(np.float32))
    np.save(workdir / "digits_y.npy", gen.integers(0, 10, 48))
    proc = run("compile", "zoomodels:digits", "--recipe", "prune50-int8", "--train-data", "digits_x.npy",
               "--train-targets", "digits_y.npy", "--batch", "16", "--out", "out_train", "--report-html",
               "report.html", cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training data: 48 samples from digits_x.npy, 3 batch(es)" in proc.stdout
    assert "calibration: the --train-data inputs (no --calibration given)" in proc.stdout
    report = json.loads((workdir / "out_train" / "report.json").read_text())
    rows = {r["name"].split("{", 1)[0]: r for r in report["passes"]}
    assert rows["fine-tune"]["status"] == "ok" and rows["fine-tune"]["stats"]["steps"] == 2 * 3
    assert rows["quantize-int8"]["status"] == "ok"
    assert rows["export-onnx"]["params"] < rows["input"]["params"]

    html = (workdir / "report.html").read_text(encoding="utf-8")
    for section in ("summary", "passes", "plots", "diffs"):
        assert f'<section id="{section}">' in html, section
    passes_table = html[html.index('<section id="passes">'):html.index("</section>", html.index('<section id="passes">'))]
    assert passes_table.count("<tr") >= len(rows) + 1
    for name in ("prune-channels", "fine-tune", "quantize-int8", "export-onnx"):
        assert name in passes_table, name
    assert f'<h3 id="layers-{rows["prune-channels"]["index"]}">' in html and "<th>channels before</th>" in html
    assert rows["prune-channels"]["layers"] and rows["quantize-int8"]["layers"]  # kept in report.json
    images = re.findall(r'<img class="plot" alt="[^"]*" src="data:image/png;base64,([^"]+)">', html)
    assert len(images) >= 3
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)


@pytest.mark.parametrize("args, message", [
    (("compile", "nosuchmodule:make", "--input-shape", "1x3x8x8"), "cannot import module 'nosuchmodule'"),
    (("compile", "mymodels", "--input-shape", "1x3x8x8"), "expected 'module:factory'"),
    (("compile", "mymodels:missing", "--input-shape", "1x3x8x8"), "has no callable 'missing'"),
    (("compile", "mymodels:not_a_model", "--input-shape", "1x3x8x8"), "returned int, not a torch.nn.Module"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3xeight"), "--input-shape '1x3xeight'"),
    (("compile", "mymodels:make_model", "--input-shape", "1x5x8x8"),
     ("shape propagation failed at node '_0' (module '0': Conv2d): RuntimeError: Given groups=1, weight of size "
      "[8, 3, 3, 3], expected input[1, 5, 8, 8] to have 3 channels, but got 5 channels instead")),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--train-data", "x7.npy"),
     ("--train-data x7.npy: input 'input' has samples of shape (3, 7, 8) (array (6, 3, 7, 8)), but the model "
      "takes (3, 8, 8) per sample")),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--train-data", "x8.npy", "--train-targets",
      "y5.npy"), "--train-targets y5.npy: 5 targets for 6 training samples; give one target per sample"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--train-targets", "y5.npy"),
     "--train-targets needs --train-data"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--calib", "nope.npy"),
     "--calibration: inputs file nope.npy does not exist"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--train-data", "x8.npy", "--batch", "0"),
     "--batch 0: the batch size must be a positive integer"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "fold-batchnrom"),
     "unknown pass 'fold-batchnrom'"),
    (("inspect", "missing.onnx"), "missing.onnx: no such file"),
    (("diff", "a.fxg", "b.fxg"), "a.fxg: no such file"),
    (("diff", "x8.npy", "out"), "x8.npy: not a graph text; give a .fxg file, a .onnx model or an artifact directory"),
    (("diff", "mymodels.py", "out/nothing.onnx"), "out/nothing.onnx: no such file"),
    (("diff", "out/report.json", "x8.onnx"), "x8.onnx: not an ONNX model"),
    (("diff", "out/graphs", "out"),
     "out/graphs is not an fxcompress artifact: manifest.json is missing (make one with `fxcompress compile"),
    # the advice names the command line's flags, not compile()'s keywords
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "quantize-int8"),
     "pass 'quantize-int8' needs calibration data: give --calibration samples.npy (or --train-data"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "fine-tune"),
     "pass 'fine-tune' needs train data: give --train-data inputs.npy (and --train-targets targets.npy"),
    (("compile", "mymodels:make_model", "--input-shape", "1x3x8x8", "--passes", "fold-batchnorm,fine-tune",
      "--train-data", "x8.npy"), "pass 'fine-tune' needs train labels: give --train-targets targets.npy"),
    (("bench", "out", "--backend", "cuda"), "--backend 'cuda': choose one of onnxruntime, tensorrt, tensorrt-rtx"),
    (("compare", "out", "--inputs", "x1.npy", "--target", "onnxruntime"), "--target 'onnxruntime': choose one of"),
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


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_fallback_flag(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli_main(workdir, monkeypatch, capsys, "compile", "mymodels:make_model", "--input-shape",
                            "1x3x8x8", "--target", "tensorrt", "--out", "out_trt")
    assert code == 2 and "pip install" in err and "--fallback onnxruntime" in err, err
    assert "fallback='onnxruntime'" not in err


def _as_tensorrt_rtx_artifact(src: Path, dst: Path) -> Path:
    """A copy of an ONNX Runtime artifact that says it runs on TensorRT-RTX (manifest hashes kept valid)."""
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.update(target="tensorrt-rtx", backend="tensorrt-rtx", load_backend="tensorrt-rtx")
    write_manifest(dst, manifest)
    return dst


def test_bench_backend_option_and_its_hint(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A TensorRT artifact that cannot run here points at `bench --backend onnxruntime`, which works."""
    art = _as_tensorrt_rtx_artifact(workdir / "out", tmp_path / "rtx")
    code, _, err = cli_main(workdir, monkeypatch, capsys, "bench", str(art), "--iters", "3", "--warmup", "0")
    assert code == 2 and f"fxcompress bench {art} --backend onnxruntime" in err, err
    assert "fallback=" not in err and "compile with" not in err
    code, out, err = cli_main(workdir, monkeypatch, capsys, "bench", str(art), "--backend", "onnxruntime",
                              "--iters", "3", "--warmup", "0", "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    assert [r["name"] for r in json.loads((tmp_path / "b.json").read_text())["results"]] == ["compiled (onnxruntime)"]


def test_compare_target_option_and_its_hint(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Without a TensorRT target the status names `--target`; with it, compare() gets that target."""
    from fxcompress import compare as cmp

    code, out, err = cli_main(workdir, monkeypatch, capsys, "compare", "out", "--inputs", "x1.npy")
    assert code == 0, err
    status = next(line for line in out.splitlines() if line.startswith("TRT vs ORT:"))
    assert "give --target tensorrt-rtx or --target tensorrt" in status and "target='" not in status
    seen: dict[str, Any] = {}
    real = cmp.compare

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(cmp, "compare", spy)
    code, out, err = cli_main(workdir, monkeypatch, capsys, "compare", "out", "--inputs", "x1.npy",
                              "--target", "tensorrt-rtx")
    assert code == 0, err
    assert seen["target"] == "tensorrt-rtx" and seen["engine"] is None  # the artifact has no engine for it


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
