"""Recovery after channel pruning on scikit-learn's digits: accuracy of the demo's DigitsResNet
(width 32, trained 10 epochs, seed 0) pruned 70% and retrained by ``distill`` or ``fine-tune``
with their default options, in the order that folds BatchNorm first and in the good order.

Every number is repeatable: the model, the data split, the shuffling and the training are
seeded (``--seeds`` are the ``compile(seed=...)`` values), and torch runs on one thread.

    python bench/recovery.py [--width 32] [--train-epochs 10] [--seeds 0 1 2] [--ratio 0.7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import fxcompress as fxc
from fxcompress.digits import DigitsData, DigitsResNet, accuracy, digits_loaders, train_classifier


def pipelines(ratio: float) -> list[str]:
    """Recovery folding BatchNorm first, then both training passes in the good order (BatchNorm
    folded after training) at 1, 2, 3 epochs and at their defaults, then pruning alone."""
    prune = f"prune-channels{{ratio={ratio}}}"
    rows = [f"fold-batchnorm,{prune},distill{{epochs=2}}",
            f"{prune},distill{{epochs=2}},fold-batchnorm",
            f"{prune},fine-tune{{epochs=2}},fold-batchnorm"]
    for epochs in (1, 2, 3):
        rows += [f"{prune},{p}{{epochs={epochs}}},fold-batchnorm" for p in ("distill", "fine-tune")]
    rows += [f"{prune},distill,fold-batchnorm", f"{prune},fine-tune,fold-batchnorm", prune]
    return list(dict.fromkeys(rows))


def trained_model(width: int, epochs: int, data: DigitsData) -> torch.nn.Module:
    """A DigitsResNet trained as ``fxcompress demo`` trains it (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsResNet(width=width)
    return train_classifier(model, data.train, epochs=epochs, seed=0)


def recovered_accuracy(model: torch.nn.Module, data: DigitsData, pipeline: str, seed: int) -> float:
    """Test accuracy of ``model`` compiled (to FX) with ``pipeline`` on the digits train split."""
    x = next(iter(data.test))[0][:1]
    compiled = fxc.compile(model, (x,), pipeline, target="fx", train_data=data.train, seed=seed)
    return accuracy(compiled.graph_module, data.test)


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--train-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ratio", type=float, default=0.7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = digits_loaders(batch_size=64, seed=0)
    model = trained_model(args.width, args.train_epochs, data)
    machine = cpu_name()
    print(f"{time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, one thread; "
          f"DigitsResNet(width={args.width}) trained {args.train_epochs} epochs: "
          f"{accuracy(model, data.test):.2%} on the 360 test images")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"\n| pipeline | {seeds} |{' mean |' if len(args.seeds) > 1 else ''} time |")
    print(f"|---|{'---|' * len(args.seeds)}{'---|' if len(args.seeds) > 1 else ''}---|")
    for pipeline in pipelines(args.ratio):
        start = time.perf_counter()
        accs = [recovered_accuracy(model, data, pipeline, seed) for seed in args.seeds]
        cells = " | ".join(f"{a:.1%}" for a in accs)
        mean = f" {statistics.mean(accs):.1%} |" if len(accs) > 1 else ""
        print(f"| `{pipeline}` | {cells} |{mean} {time.perf_counter() - start:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
