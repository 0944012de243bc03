"""Latency, throughput, peak memory and size of compiled models, side by side with eager.

Numbers here are measurements of one run on one machine: compare ratios from the same run,
never absolute numbers across runs (the machine is shared and noisy).

Two sizes, never mixed: **weights** (bytes of the parameters and buffers a model holds, in their
dtypes: what the per-pass report's size counts) and **file** (bytes of what ships: model.onnx plus
any engine; an eager torch model has none). Ratios compare weights with weights. Peak RSS is the
whole process's (``VmHWM`` during the timed calls, everything loaded so far included), so it does
not tell variants measured in one process apart.
"""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import InputError
from .stats import onnx_stats
from .units import MIB, format_bytes
from .verify import fresh_inputs


@dataclass(frozen=True)
class BenchResult:
    """One model's measurements; latency in milliseconds per call of ``batch`` samples."""

    name: str
    batch: int
    median_ms: float
    p90_ms: float
    throughput: float
    #: the whole process's peak resident set during the timed calls, not this model's footprint
    peak_rss_mb: float | None
    peak_cuda_mb: float | None
    #: bytes of parameters and buffers (the report's size); ``file_bytes``: model.onnx (+ engine)
    weight_bytes: int | None
    file_bytes: int | None
    iters: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def file_size(obj: Any) -> int | None:
    """Bytes of what would be shipped: an artifact directory's model files, a compiled model's ONNX
    model and engine; ``None`` for an eager model (no file)."""
    if isinstance(obj, (str, Path)) and Path(obj).is_dir():
        return sum(f.stat().st_size for f in Path(obj).iterdir() if f.is_file() and f.suffix in (".onnx", ".engine"))
    onnx_model = getattr(obj, "onnx_model", None)
    if onnx_model is not None:
        return onnx_model.ByteSize() + len(getattr(obj, "engine", None) or b"")
    return None


def weight_size(obj: Any) -> int | None:
    """Bytes of the weights (parameters and buffers, in their dtypes) of an ``nn.Module``, an ONNX
    model, anything with an ``onnx_model`` (a ``Compiled``), or an artifact directory's model.onnx."""
    import onnx

    if isinstance(obj, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in list(obj.parameters()) + list(obj.buffers()))
    if isinstance(obj, (str, Path)) and Path(obj).is_dir():
        obj = Path(obj) / "model.onnx"
    if isinstance(obj, (str, Path)) and Path(obj).is_file():
        return onnx_stats(obj).bytes
    onnx_model = getattr(obj, "onnx_model", obj)
    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_stats(onnx_model).bytes
    return None


def _check_counts(function: str, **counts: tuple[Any, int]) -> None:
    """Each ``name=(value, least)`` must be an integer >= ``least``; ``InputError`` naming it otherwise."""
    for arg, (value, least) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{function}({arg}=...) must be an integer >= {least}, got {value!r}")


def benchmark(fn: Callable[..., Any], inputs: Sequence[Any], *, name: str = "model", warmup: int = 10,
              iters: int = 100, weight_bytes: int | None = None, file_bytes: int | None = None,
              torch_threads: int | None = None) -> BenchResult:
    """Time ``fn(*inputs)``: median and p90 latency, throughput (samples/s), peak memory.

    ``weight_bytes`` / ``file_bytes`` default to ``weight_size(fn)`` / ``file_size(fn)`` (give them
    when ``fn`` is a runner that does not carry its model).

    An ``nn.Module`` is timed in eval mode and its training flags are restored afterwards; the
    inputs are cloned once, so an in-place model does not change the caller's tensors.
    ``torch_threads`` sets torch's intra-op thread count for the measurement only (compare eager
    with an ONNX Runtime session of the same thread count)."""
    _check_counts("benchmark", iters=(iters, 1), warmup=(warmup, 0))
    if torch_threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        try:
            return benchmark(fn, inputs, name=name, warmup=warmup, iters=iters, weight_bytes=weight_bytes,
                             file_bytes=file_bytes)
        finally:
            torch.set_num_threads(previous)
    inputs = fresh_inputs(tuple(inputs))
    batch = int(inputs[0].shape[0]) if inputs and hasattr(inputs[0], "shape") and inputs[0].dim() else 1
    modes = [(m, m.training) for m in fn.modules()] if isinstance(fn, torch.nn.Module) else []
    try:
        for m, _ in modes:
            m.training = False
        times, tracked, cuda = _measure(fn, inputs, warmup, iters)
    finally:
        for m, mode in modes:
            m.training = mode
    median = statistics.median(times) * 1e3
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))] * 1e3
    hwm = _rss_kb("VmHWM") if tracked else None
    return BenchResult(
        name=name, batch=batch, median_ms=median, p90_ms=p90, throughput=batch / (median / 1e3),
        peak_rss_mb=hwm * 1024 / MIB if hwm else None,
        peak_cuda_mb=torch.cuda.max_memory_allocated() / MIB if cuda else None,
        weight_bytes=weight_bytes if weight_bytes is not None else weight_size(fn),
        file_bytes=file_bytes if file_bytes is not None else file_size(fn), iters=iters)


def _measure(fn: Callable[..., Any], inputs: tuple[Any, ...], warmup: int, iters: int
             ) -> tuple[list[float], bool, bool]:
    """Sorted per-call seconds, whether peak RSS was reset before timing, whether CUDA was synced."""
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        tracked = _reset_peak_rss()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(*inputs)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times, tracked, cuda


def interleaved(fns: Mapping[str, Callable[..., Any]], inputs: Sequence[Any], *, iters: int = 50, rounds: int = 7,
                warmup: int = 5) -> dict[str, float]:
    """Per-call milliseconds of several variants measured in turns: every round times each variant
    for ``iters`` calls, and each keeps its best round mean. Load on a shared machine then hits all
    variants alike, so ratios between them hold even when absolute numbers drift."""
    _check_counts("interleaved", iters=(iters, 1), rounds=(rounds, 1), warmup=(warmup, 0))
    inputs = fresh_inputs(tuple(inputs))
    best = {name: float("inf") for name in fns}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(warmup):
                    fn(*inputs)
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn(*inputs)
                best[name] = min(best[name], (time.perf_counter() - t0) / iters * 1e3)
    return best


def ratios(result: BenchResult, baseline: BenchResult) -> dict[str, float | None]:
    """``result`` relative to ``baseline`` (latency < 1 and speedup > 1 mean faster); ``weights`` and
    ``file`` compare like with like, ``None`` when either side lacks that size."""

    def share(a: int | None, b: int | None) -> float | None:
        return a / b if a and b else None

    return {"latency": result.median_ms / baseline.median_ms, "speedup": baseline.median_ms / result.median_ms,
            "weights": share(result.weight_bytes, baseline.weight_bytes),
            "file": share(result.file_bytes, baseline.file_bytes)}


#: the benchmark table's columns (``weights`` and ``file`` as in the module docstring)
COLUMNS = ("model", "batch", "median ms", "p90 ms", "samples/s", "process peak RSS MiB", "weights", "file",
           "vs baseline")


def table(results: Sequence[BenchResult], baseline: BenchResult | None = None, title: str = "benchmark") -> Any:
    """A rich ``Table`` of ``results``; ``vs baseline`` gives speed and the weights ratio."""
    from rich.table import Table



    t = Table(title=title)
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        rel = "-"
        if baseline is not None and r is not baseline:
            q = ratios(r, baseline)
            rel = f"{q['speedup']:.2f}x faster" if q["speedup"] >= 1 else f"{1 / q['speedup']:.2f}x slower"
            if q["weights"] is not None:
                rel += f", {q['weights']:.2f}x weights"
        t.add_row(r.name, str(r.batch), f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.throughput:.1f}",
                  f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-",
                  format_bytes(r.weight_bytes) if r.weight_bytes else "-",
                  format_bytes(r.file_bytes) if r.file_bytes else "-", rel)
    return t


def to_json(results: Sequence[BenchResult], baseline: BenchResult | None = None) -> str:
    rows = []
    for r in results:
        row = r.to_dict()
        if baseline is not None and r is not baseline:
            row["vs_baseline"] = ratios(r, baseline)
        rows.append(row)
    return json.dumps({"results": rows}, indent=2)
