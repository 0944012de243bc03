"""Quickstart: train a small CNN on real data, compress it with a named recipe, run it in ONNX Runtime.

The data is scikit-learn's digits (8x8 images, shipped with scikit-learn, no download). The script
trains ``DigitsResNet``, compiles it with a recipe (default ``prune50-int8``: clean-up, BatchNorm
folding, 50% channel pruning, fine-tuning, INT8) to ONNX Runtime, prints the per-pass report, the
test accuracy before and after and the model size, then saves the artifact and loads it back
without the source model.

    python examples/quickstart.py                     # about 12 s on 2 CPU cores
    python examples/quickstart.py --recipe int8       # any name from `fxcompress compile --list-recipes`
    python examples/quickstart.py --quick             # 3 training epochs, not 10: about 8 s (what CI runs)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import fxcompress as fxc
from fxcompress.digits import DigitsResNet, accuracy, digits_loaders, train_classifier
from fxcompress.registry import recipes
from fxcompress.units import format_bytes, format_count


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="prune50-int8", help="named pipeline (default: prune50-int8)")
    parser.add_argument("--out", type=Path, default=Path("quickstart_out"), help="artifact directory to write")
    parser.add_argument("--quick", action="store_true", help="3 training epochs instead of 10 (about 8 s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table = recipes()
    if args.recipe not in table:
        print(f"unknown recipe {args.recipe!r}; known: {', '.join(table)}", file=sys.stderr)
        return 2
    width, epochs = (32, 3) if args.quick else (32, 10)

    # 1. data and a trained model
    data = digits_loaders(batch_size=64, seed=0)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = train_classifier(DigitsResNet(width=width), data.train, epochs=epochs, seed=0)
    before = accuracy(model, data.test)
    print(f"trained DigitsResNet(width={width}) for {epochs} epochs in {time.perf_counter() - t0:.1f} s")
    print(f"accuracy before: {before:.2%} (eager PyTorch, {len(data.test.dataset)} test images)")

    # 2. compile with the recipe: calibration for INT8, train_data for pruning recovery
    pipeline = table[args.recipe]
    print(f"recipe {args.recipe}: {pipeline}")
    example = next(iter(data.test))[0][:1]
    t0 = time.perf_counter()
    compiled = fxc.compile(model, (example,), pipeline, target="onnxruntime",
                           calibration=data.calibration, train_data=data.train)
    print(f"compiled in {time.perf_counter() - t0:.1f} s")
    print(compiled.report)

    # 3. accuracy and size after
    after = accuracy(compiled, data.test)
    first, last = compiled.report[0], compiled.report[-1]
    print(f"accuracy after: {after:.2%} ({compiled.backend}; change {100 * (after - before):+.2f} points)")
    print(f"size: {format_bytes(first.bytes)} -> {format_bytes(last.bytes)} of weights "
          f"({first.bytes / max(last.bytes, 1):.1f}x smaller); params {format_count(first.params)} -> "
          f"{format_count(last.params)}; MACs {format_count(first.macs)} -> {format_count(last.macs)}")

    # 4. save, and load back without the source model
    out = compiled.save(args.out)
    loaded = fxc.load(out)
    x = next(iter(data.test))[0]
    diff = float((loaded(x) - compiled(x)).abs().max())
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    fp32_file = fxc.compile(model, (example,), "", target="onnx", progress=False).onnx_model.ByteSize()
    print(f"saved to {out}/ ({', '.join(files)}); model.onnx is {format_bytes((out / 'model.onnx').stat().st_size)}, "
          f"the FP32 model exported as it is would be {format_bytes(fp32_file)}")
    print(f"loaded: backend {loaded.backend}, accuracy {accuracy(loaded, data.test):.2%}, "
          f"max |loaded - compiled| = {diff:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
