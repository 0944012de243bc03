"""``fxcompress.bench.interleaved``: variants timed in turns, each keeping its best round."""

from __future__ import annotations

import io
import time

import pytest
import torch

from fxcompress.bench import interleaved
from fxcompress.errors import InputError


def test_interleaved_times_every_variant_in_turns_on_copies() -> None:
    calls: list[str] = []
    x = torch.ones(3)

    def fast(t: torch.Tensor) -> None:
        calls.append("fast")
        t.mul_(2)  # in place: must not reach the caller's tensor

    def slow(t: torch.Tensor) -> None:
        calls.append("slow")
        time.sleep(0.01)

    ms = interleaved({"fast": fast, "slow": slow}, (x,), iters=3, rounds=2, warmup=1)
    assert set(ms) == {"fast", "slow"}
    # a sleep lasts at least as long as asked; ``fast`` (best round of a 3-element multiply) would
    # need every round preempted for 10 ms to lose its place, so the order does not hang on load
    assert ms["slow"] >= 10.0 and ms["slow"] > ms["fast"] > 0.0
    assert calls == (["fast"] * 4 + ["slow"] * 4) * 2  # warmup + iters per variant, variants alternate
    assert x.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("arg", [{"iters": 0}, {"rounds": 0}, {"warmup": -1}, {"iters": True}])
def test_interleaved_rejects_bad_counts(arg: dict) -> None:
    with pytest.raises(InputError, match=f"interleaved\\({next(iter(arg))}="):
        interleaved({"f": lambda: None}, (), **arg)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).eval()


def test_weights_and_file_are_separate_sizes_and_ratios_compare_like_with_like() -> None:
    """An eager model has weights but no file; a compiled one has both, the file being larger (graph,
    names); the ``vs baseline`` ratio divides weights by weights."""
    import fxcompress as fxc
    from fxcompress.bench import COLUMNS, benchmark, ratios, table
    from fxcompress.report import Report
    from rich.console import Console

    model, x = _model(), torch.randn(2, 4)
    compiled = fxc.compile(model, (x,), "fold-batchnorm", target="onnxruntime", progress=False)
    eager = benchmark(model, (x,), name="eager", warmup=0, iters=3)
    comp = benchmark(compiled, (x,), name="compiled", warmup=0, iters=3)
    params = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    assert (eager.weight_bytes, eager.file_bytes) == (params, None)
    assert comp.weight_bytes == compiled.report[-1].bytes == (4 * 8 + 8 + 8 * 2 + 2) * 4  # BN folded away
    assert comp.file_bytes == compiled.onnx_model.ByteSize() > comp.weight_bytes
    q = ratios(comp, eager)
    assert q["weights"] == pytest.approx(comp.weight_bytes / params) and q["file"] is None
    console = Console(width=200, record=True, color_system=None, file=io.StringIO())
    console.print(table([eager, comp], eager))
    console.print(Report(compiled.report.rows).table())
    text = console.export_text()
    assert "process peak RSS MiB" in text and "weights" in text and " size" not in text
    assert f"{q['weights']:.2f}x weights" in text
    assert COLUMNS[5:8] == ("process peak RSS MiB", "weights", "file")
