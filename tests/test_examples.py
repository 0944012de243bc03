"""Every example in ``examples/`` runs as a user would run it (a subprocess, ``--quick``), and its
printed results are checked; the examples' own pytest suite (golden tests) passes too."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FXCOMPRESS_ACCEPT"}  # never rewrite goldens here
    env["OMP_NUM_THREADS"] = "1"  # tiny models on a shared machine: no thread oversubscription
    return env


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    print(proc.stdout[-4000:])
    print(proc.stderr[-4000:], file=sys.stderr)
    return proc


def run_example(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(EXAMPLES / script), *args], cwd)


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"no line matching {pattern!r} in the output:\n{text}"
    return float(found.group(1).replace(",", ""))


@pytest.mark.slow
def test_quickstart(tmp_path: Path) -> None:
    proc = run_example("quickstart.py", "--quick", "--out", "artifact", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    before = number(r"accuracy before: ([\d.]+)%", out)
    after = number(r"accuracy after: ([\d.]+)%", out)
    assert before > 95.0 and after > before - 3.0, (before, after)
    assert number(r"\(([\d.]+)x smaller\)", out) > 5.0
    assert "prune-channels" in out and "quantize-int8" in out and "export-onnx" in out  # the report
    assert number(r"loaded: backend onnxruntime, accuracy ([\d.]+)%", out) == after
    assert number(r"max \|loaded - compiled\| = ([\d.e+-]+)", out) == 0.0
    files = {p.name for p in (tmp_path / "artifact").iterdir()}
    assert {"manifest.json", "model.onnx", "report.json"} <= files


def test_quickstart_rejects_an_unknown_recipe(tmp_path: Path) -> None:
    proc = run_example("quickstart.py", "--recipe", "int3", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown recipe 'int3'" in proc.stderr and "prune50-int8" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12)")
def test_tensorrt_int8_builds_real_engines(tmp_path: Path) -> None:
    proc = run_example("tensorrt_int8.py", "--quick", "--out", "artifact", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "CheckTensorRT: 0 findings (tensorrt_rtx" in out
    assert number(r"(\d+) QuantizeLinear", out) > 0
    fp32 = number(r"FP32 engine: (\d+) bytes", out)
    int8 = number(r"INT8 engine: (\d+) bytes", out)
    assert int8 < fp32, (int8, fp32)
    assert number(r"INT8 Q/DQ graph on ONNX Runtime .*: accuracy ([\d.]+)%", out) > 90.0
    engine = tmp_path / "artifact" / "model.engine"
    assert engine.stat().st_size == int8
    assert 'target="tensorrt", precision="int8"' in out and "--target tensorrt --precision int8" in out
    from fxcompress.backends.tensorrt import gpu_available

    if not gpu_available():
        assert "engine not run: running a TensorRT engine needs an NVIDIA GPU" in out
        assert "engine ran" not in out


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_int8_without_tensorrt_explains_and_prints_the_gpu_commands(tmp_path: Path) -> None:
    proc = run_example("tensorrt_int8.py", "--quick", "--target", "tensorrt", cwd=tmp_path)
    assert proc.returncode == 1
    assert "cannot build for target='tensorrt'" in proc.stdout and "pip install" in proc.stdout
    assert "examples/tensorrt_int8.py --target tensorrt" in proc.stdout
    assert not (tmp_path / "tensorrt_int8_out").exists()


def test_transformer_dynamic_quant(tmp_path: Path) -> None:
    proc = run_example("transformer_dynamic_quant.py", "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "DynamicQuantizeLinear" in out and "MatMulInteger" in out
    assert number(r"INT8 vs eager: .*cosine ([\d.]+)", out) > 0.999
    assert number(r"FP32 vs eager: .*cosine ([\d.]+)", out) > 0.99999
    assert number(r"latency FP32 ONNX Runtime: ([\d.]+) ms", out) > 0
    assert number(r"latency INT8 ONNX Runtime: ([\d.]+) ms", out) > 0
    assert number(r"\(([\d.]+)x smaller\)", out) > 3.0


def test_custom_pass_script(tmp_path: Path) -> None:
    proc = run_example("custom_pass.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fuse-silu" in proc.stdout and "torch.nn.functional.silu" in proc.stdout
    assert "Tensor.mul" not in proc.stdout.split("after fuse-silu:", 1)[1]


def test_examples_pytest_suite_passes(tmp_path: Path) -> None:
    proc = run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"], EXAMPLES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b\d+ passed\b", proc.stdout) and " failed" not in proc.stdout


DISTILL = EXAMPLES / "distill_ddp.py"


def check_distill_output(out: str, processes: int) -> None:
    assert f"{processes} process(es)" in out
    assert f"1/{processes} of the data" in out
    assert "largest weight difference between processes: 0" in out
    original = number(r"accuracy: original ([\d.]+)%", out)
    distilled = number(r"pruned \+ distilled \(ONNX Runtime\) ([\d.]+)%", out)
    assert original > 95.0 and distilled > 90.0, (original, distilled)


@pytest.mark.slow
def test_distill_ddp_single_process(tmp_path: Path) -> None:
    proc = run_example("distill_ddp.py", "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_distill_output(proc.stdout, 1)


@pytest.mark.slow
def test_distill_ddp_with_torchrun_two_processes(tmp_path: Path) -> None:
    """``torchrun --standalone`` (a free rendezvous port, so parallel runs do not collide), gloo on CPU."""
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(DISTILL), "--quick"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_distill_output(proc.stdout, 2)
