"""Compile overhead as graphs grow: ``fxc.compile(model, x, "fold-batchnorm,eliminate-dead-code",
target="onnx")`` with and without verification, against one ``torch.fx.symbolic_trace`` plus the
project's ONNX export of the same model, on a stack of N conv-BN-ReLU residual blocks (4 FX nodes
per block). Prints seconds and the ratios per N; the target is <= 1.5x everywhere, linear in N.

One run, one machine; read ratios within a run, not absolute numbers across runs.

Measured 2026-12-03 on this project's 2-core x86_64 machine (shared, load average ~12), torch
2.13.0 CPU, ``python bench/compile.py --repeat 2``; compile / (trace + export), verified and
``verify=False``:

    blocks  nodes   main (c75a611)   this change
        50    202    1.37 / 1.09     1.50 / 1.63   (0.17 s apart: noise-dominated)
       150    602    1.81 / 1.65     1.28 / 1.35
       500   2002    1.35 / 1.41     1.20 / 1.29
      1500   6002    1.80 / 1.62     1.36 / 1.43

The baseline itself (``torch.onnx`` export) grows faster than N (7 to 15 ms per block); what
compile adds is copies of the graph module per pass, shape propagation per pass and one deep copy
of the model as the teacher.

    python bench/compile.py [--blocks 50 150 500 1500] [--repeat 1] [--profile N] [--top 25]

Times are CPU seconds of this process (one torch thread), so load from other processes on a
shared machine does not count. ``--profile N`` runs cProfile over one verified compile of N blocks and prints the top functions
by cumulative time (where the overhead goes).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import platform
import pstats
import time
from typing import Any, Callable

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.backends.onnx_export import export_onnx

PIPELINE = "fold-batchnorm,eliminate-dead-code"
WIDTH = 8


class Block(nn.Module):
    """``x + relu(bn(conv(x)))``: a residual conv-BN-ReLU block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.relu(self.bn(self.conv(x)))


def stack(blocks: int, channels: int = WIDTH) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """N residual blocks with trained-looking BN statistics, and one small input."""
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(channels) for _ in range(blocks))).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.05, 0.2, generator=gen)   # keeps a deep residual stack's outputs bounded
    return model, (torch.randn(1, channels, 8, 8, generator=gen),)


def baseline(model: nn.Module, x: tuple[torch.Tensor]) -> Any:
    """What any export costs: one symbolic trace and the project's ONNX export."""
    gm = torch.fx.symbolic_trace(model)
    return export_onnx(gm, x)


def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """Fewest CPU seconds of this process over ``repeat`` runs (garbage collected before each). CPU
    time, not wall time: on a shared machine other processes' load does not count."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def measure(blocks: int, repeat: int) -> dict[str, float]:
    model, x = stack(blocks)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    row = {"blocks": blocks, "nodes": nodes}
    row["baseline"] = best_of(lambda: baseline(model, x), repeat)
    row["compile"] = best_of(lambda: fxc.compile(model, x, PIPELINE, target="onnx", progress=False), repeat)
    row["compile_noverify"] = best_of(
        lambda: fxc.compile(model, x, PIPELINE, target="onnx", progress=False, verify=False), repeat)
    return row


def warm_up() -> None:
    """One small compile and export first: lazy imports and first-call caches are not overhead."""
    small, x = stack(2)
    baseline(small, x)
    fxc.compile(small, x, PIPELINE, target="onnx", progress=False)


def profile(blocks: int, top: int) -> str:
    warm_up()
    model, x = stack(blocks)
    prof = cProfile.Profile(time.process_time)   # CPU time: load from other processes does not count
    prof.enable()
    fxc.compile(model, x, PIPELINE, target="onnx", progress=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[50, 150, 500, 1500])
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest counts")
    parser.add_argument("--profile", type=int, default=0, help="cProfile one verified compile of N blocks")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.profile:
        print(profile(args.profile, args.top))
        return
    warm_up()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"pipeline {PIPELINE!r}, target onnx, best of {args.repeat}")
    print(f"{'blocks':>6} {'nodes':>6} {'trace+export s':>15} {'compile s':>10} {'ratio':>6} "
          f"{'no-verify s':>12} {'ratio':>6} {'compile ms/block':>17}   (CPU seconds)")
    for n in args.blocks:
        r = measure(n, args.repeat)
        print(f"{r['blocks']:>6} {r['nodes']:>6} {r['baseline']:>15.3f} {r['compile']:>10.3f} "
              f"{r['compile'] / r['baseline']:>6.2f} {r['compile_noverify']:>12.3f} "
              f"{r['compile_noverify'] / r['baseline']:>6.2f} {1000 * r['compile'] / n:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
