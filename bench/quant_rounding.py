"""Quantization accuracy on digits: round-to-nearest vs AdaRound at 4-bit weights, and
``quantize-auto`` vs ``quant-sensitivity{k}`` for the same budget.

Models (trained here, seed 0, as in ``tests/conftest.py``): DigitsResNet(width 16), DigitsMobileNet,
DigitsTransformer; 256 calibration images, accuracy on the 360 held-out test images, in ONNX
Runtime. Variants: ``fold-batchnorm,quantize-int8{weight-bits=4,rounding=...}`` (4-bit weight grid on
the INT8 kernels, UINT8 activations) and ``quantize-weight-only{bits=4,rounding=...}`` (blockwise
INT4 weights, float activations, MatMulNBits; Linear/matmul only, so the CNNs' convs stay float).
Then ``quantize-auto{max-drop=0.5,weight-bits=4}`` against the smallest ``k`` with which
``quant-sensitivity{k,weight-bits=4},quantize-int8{weight-bits=4}`` stays within 0.5 points.

    python bench/quant_rounding.py [--iters 1000] [--models resnet mobilenet transformer]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import fxcompress as fxc
from fxcompress.digits import DigitsMobileNet, DigitsResNet, DigitsTransformer, accuracy, digits_loaders, train_classifier
from passes import FoldBatchNorm, QuantizeAuto

MODELS = {"resnet": (lambda: DigitsResNet(width=16), 6), "mobilenet": (DigitsMobileNet, 8),
          "transformer": (DigitsTransformer, 12)}


def trained(name: str, data: object) -> torch.nn.Module:
    make, epochs = MODELS[name]
    torch.manual_seed(0)
    model = make()
    return train_classifier(model, data.train, epochs=epochs, seed=0)  # type: ignore[attr-defined]


def compiled_accuracy(model: torch.nn.Module, passes: object, data: object, target: str = "onnxruntime") -> float:
    ex = (next(iter(data.test))[0][:1],)  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = fxc.compile(model, ex, passes, calibration=data.calibration, target=target, progress=False)  # type: ignore[attr-defined]
    return 100 * accuracy(c if target != "fx" else c.graph_module, data.test)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=1000, help="AdaRound steps per layer (the passes' default)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--max-drop", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = digits_loaders(batch_size=64, seed=0)
    print(f"digits, {platform.machine()}, 1 thread, torch {torch.__version__}, AdaRound {args.iters} steps/layer")
    print(f"\n{'model':12s} {'FP32':>6s} {'int8 w4 RTN':>12s} {'int8 w4 Ada':>12s} {'WO int4 RTN':>12s} "
          f"{'WO int4 Ada':>12s}")
    for name in args.models:
        model = trained(name, data)
        row = [100 * accuracy(model, data.test)]
        for family in ("fold-batchnorm,quantize-int8{{weight-bits=4,rounding={r},adaround-iters={n}}}",
                       "quantize-weight-only{{bits=4,rounding={r},adaround-iters={n}}}"):
            for rounding in ("nearest", "adaround"):
                t0 = time.perf_counter()
                row.append(compiled_accuracy(model, family.format(r=rounding, n=args.iters), data))
                print(f"  ({name} {family.split('{')[0].split(',')[-1]} {rounding}: {time.perf_counter() - t0:.0f} s)")
        print(f"{name:12s} " + " ".join(f"{v:12.2f}" if i else f"{v:6.2f}" for i, v in enumerate(row)))

    print(f"\nquantize-auto{{max-drop={args.max_drop},weight-bits=4}} vs quant-sensitivity{{k}} (FX graph accuracy):")
    for name in args.models:
        model = trained(name, data)
        fp32 = 100 * accuracy(model, data.test)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = fxc.compile(model, (next(iter(data.test))[0][:1],),
                            [FoldBatchNorm(), QuantizeAuto(max_drop=args.max_drop, weight_bits=4, eval_data=data.test)],
                            calibration=data.calibration, target="fx", progress=False)
        st = next(r for r in c.report.rows if r.name.startswith("quantize-auto")).stats
        k, drops = 0, []
        while True:
            acc = compiled_accuracy(model, f"fold-batchnorm,quant-sensitivity{{k={k},weight-bits=4}},"
                                           f"quantize-int8{{weight-bits=4}}", data, target="fx")
            drops.append(f"k={k}: {fp32 - acc:.2f}")
            if fp32 - acc <= args.max_drop or k >= len(st["precision"]):
                break
            k += 1
        floats = [r["node"] for r in st["precision"] if r["precision"] == "float"]
        print(f"  {name}: all INT8 drop {st['all_int8_drop']:.2f}; quantize-auto {len(floats)} float layer(s) "
              f"{floats}, drop {st['drop']:.2f} ({st['evaluations']} evaluations, bisection k {st['bisection_k']}); "
              f"quant-sensitivity needs k={k} ({', '.join(drops)})")


if __name__ == "__main__":
    main()
