"""Channel-pruning benchmark: eager PyTorch vs ONNX Runtime, unpruned and ``prune-channels`` at
ratios 0.3 / 0.5 / 0.7, on zoo models: latency ratio next to MACs ratio, one run, variants timed in turns.

One run, one machine; read ratios within a run, not absolute numbers across runs.

    python bench/prune.py [--models resnet_basic inverted_residual] [--batch 32] [--threads 1] [--iters 50] [--rounds 7]
                          [--round-to 1]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fxcompress.backends.onnx_export import export_onnx  # noqa: E402
from fxcompress.backends.onnxruntime import OrtRunner  # noqa: E402
from fxcompress.bench import interleaved  # noqa: E402
from fxcompress.pass_base import PassContext  # noqa: E402
from fxcompress.stats import graph_stats  # noqa: E402
from fxcompress.trace import trace  # noqa: E402
from passes import PruneChannels  # noqa: E402
from zoo import ZOO  # noqa: E402


def rows_for(name: str, batch: int, ratios: list[float], threads: int, iters: int, rounds: int,
             round_to: int = 1) -> list[dict]:
    """Eager and every pruning ratio of one zoo model, timed in turns (``interleaved``)."""
    model, inputs = ZOO[name]()
    gen = torch.Generator().manual_seed(0)
    x = tuple(torch.randn((batch, *t.shape[1:]), generator=gen) for t in inputs)
    fns, rows = {"eager": model.eval()}, [{"model": name, "variant": "eager",
                                           "params": sum(p.numel() for p in model.parameters()), "macs": None}]
    for ratio in [0.0, *ratios]:
        gm = trace(model, x)
        result = PruneChannels(ratio=ratio, round_to=round_to).run(gm, PassContext(x))
        runner = OrtRunner(export_onnx(result.graph, x), threads=threads)
        torch.testing.assert_close(runner(*x), result.graph(*x), rtol=1e-3, atol=1e-3)
        stats = graph_stats(result.graph)
        variant = f"ORT ratio {ratio:.1f}"
        fns[variant] = runner
        rows.append({"model": name, "variant": variant, "params": stats.params, "macs": stats.macs})
    ms = interleaved(fns, x, iters=iters, rounds=rounds)
    base = rows[1]
    for row in rows:
        row["ms"] = ms[row["variant"]]
        if row["macs"] is not None:
            row.update(macs_ratio=row["macs"] / base["macs"], latency_ratio=row["ms"] / ms[base["variant"]],
                       vs_eager=row["ms"] / ms["eager"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet_basic", "inverted_residual"], choices=sorted(ZOO))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=50, help="calls per variant in each round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each variant keeps its best")
    parser.add_argument("--round-to", type=int, default=1, help="prune-channels round_to (kept channel multiple)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"ORT threads {args.threads}, batch {args.batch}, best of {args.rounds} rounds x {args.iters} calls, "
          f"round_to {args.round_to}, "
          f"torch {torch.__version__}")
    header = f"{'model':<20} {'variant':<14} {'params':>8} {'MACs':>11} {'ms/call':>10} " \
             f"{'MACs ratio':>10} {'latency ratio':>13} {'vs eager':>9}"
    print(header)
    print("-" * len(header))
    for name in args.models:
        for r in rows_for(name, args.batch, args.ratios, args.threads, args.iters, args.rounds, args.round_to):
            fmt = lambda k, spec: format(r[k], spec) if r.get(k) is not None else "-"  # noqa: E731
            print(f"{r['model']:<20} {r['variant']:<14} {r['params']:>8} {fmt('macs', ','):>11} "
                  f"{r['ms']:>10.3f} {fmt('macs_ratio', '.3f'):>10} {fmt('latency_ratio', '.3f'):>13} "
                  f"{fmt('vs_eager', '.3f'):>9}")


if __name__ == "__main__":
    main()
