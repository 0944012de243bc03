"""Quantization accuracy on digits: plain min-max INT8 against the repairs (``equalize-cross-layer``,
``correct-bias``, ``smooth-quant``), on the models the tests train (``tests/conftest.py``:
DigitsMobileNet 8 epochs, DigitsResNet width 16 6 epochs, DigitsTransformer 12 epochs, seed 0).

Per pipeline: top-1 on the 360 test images, its drop against FP32, the logits' signal-to-noise ratio
against the FP32 model (10 log10(E[ref^2] / E[(q - ref)^2]), higher is closer) and the share of test
images whose top-1 class equals the FP32 model's. Evaluated on the FX graph (fake-quant, what the ONNX
graph computes up to the integer kernels' rounding) unless ``--target onnxruntime``.

    python bench/quant_accuracy.py [--models mobilenet resnet transformer] [--target fx|onnxruntime]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.digits import (
    DigitsMobileNet,
    DigitsResNet,
    DigitsTransformer,
    digits_loaders,
    train_classifier,
)

#: per-tensor symmetric INT8 activations and weights, min-max ranges: the TensorRT scheme
TRT_PER_TENSOR = "quantize-int8{scheme=tensorrt,per-channel=false,observer=minmax}"
#: ONNX Runtime's defaults (UINT8 activations, MSE ranges, 7-bit reduce-range weights) with per-tensor weights
ORT_PER_TENSOR = "quantize-int8{per-channel=false}"
#: TensorRT scheme calibrated on one batch of 64 images instead of 256
TRT_ONE_BATCH = "quantize-int8{scheme=tensorrt,per-channel=false,observer=minmax,calibration-batches=1}"
#: static INT8 activations per tensor (Linears and activation matmuls), per-channel weights
TRT_TRANSFORMER = "quantize-int8{scheme=tensorrt,observer=minmax}"

CNN_SETTINGS = {
    "TensorRT scheme, per-tensor weights": TRT_PER_TENSOR,
    "ORT scheme, per-tensor 7-bit weights": ORT_PER_TENSOR,
    "TensorRT scheme, per-tensor, 64 calibration images": TRT_ONE_BATCH,
}
TRANSFORMER_SETTINGS = {
    "TensorRT scheme, per-channel weights": TRT_TRANSFORMER,
    "TensorRT scheme, per-tensor weights": TRT_PER_TENSOR,
}


def cnn_pipelines(quant: str) -> dict[str, str]:
    return {
        "plain": f"fold-batchnorm,{quant}",
        "+ equalize": f"fold-batchnorm,equalize-cross-layer,{quant}",
        "+ correct-bias": f"fold-batchnorm,{quant},correct-bias",
        "+ equalize + correct-bias": f"fold-batchnorm,equalize-cross-layer,{quant},correct-bias",
    }


def transformer_pipelines(quant: str) -> dict[str, str]:
    return {"plain": quant, "+ smooth-quant": f"smooth-quant,{quant}",
            "+ smooth-quant{alpha=0.75}": f"smooth-quant{{alpha=0.75}},{quant}"}


def trained(name: str, data: Any) -> nn.Module:
    """The model the session fixture of ``tests/conftest.py`` trains (same seed, epochs, widths)."""
    cls, epochs, kw = {"mobilenet": (DigitsMobileNet, 8, {}), "resnet": (DigitsResNet, 6, {"width": 16}),
                       "transformer": (DigitsTransformer, 12, {})}[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(**kw)
    return train_classifier(model, data.train, epochs=epochs, seed=0)


def logits(fn: Callable[[torch.Tensor], Any], loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            outs.append(torch.as_tensor(fn(x)).float())
            labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def measure(fn: Callable[[torch.Tensor], Any], loader: Any, ref: torch.Tensor) -> dict[str, float]:
    """top-1 (%), logit SQNR (dB) against ``ref`` and top-1 agreement with ``ref`` (%)."""
    out, y = logits(fn, loader)
    noise = ((out - ref) ** 2).mean().clamp(min=1e-30)
    return {"top1": float((out.argmax(-1) == y).float().mean()) * 100,
            "sqnr": float(10 * torch.log10((ref ** 2).mean() / noise)),
            "agree": float((out.argmax(-1) == ref.argmax(-1)).float().mean()) * 100}


def compiled(model: nn.Module, data: Any, pipeline: str, target: str) -> tuple[Callable[..., Any], Any]:
    x = next(iter(data.test))[0][:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = fxc.compile(model, (x,), pipeline, calibration=data.calibration, target=target, progress=False)
    return (c.graph_module if target == "fx" else c), c


def rows_for(name: str, model: nn.Module, data: Any, target: str) -> list[dict[str, Any]]:
    ref, _ = logits(model, data.test)
    fp32 = measure(model, data.test, ref)
    rows = [{"model": name, "setting": "FP32", "variant": "-", "pipeline": "-", **fp32, "drop": 0.0}]
    settings, pipes = (TRANSFORMER_SETTINGS, transformer_pipelines) if name == "transformer" else \
        (CNN_SETTINGS, cnn_pipelines)
    for setting, quant in settings.items():
        for variant, pipeline in pipes(quant).items():
            fn, _ = compiled(model, data, pipeline, target)
            m = measure(fn, data.test, ref)
            rows.append({"model": name, "setting": setting, "variant": variant, "pipeline": pipeline, **m,
                         "drop": fp32["top1"] - m["top1"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet", "resnet", "transformer"],
                    choices=["mobilenet", "resnet", "transformer"])
    ap.add_argument("--target", default="fx", choices=["fx", "onnxruntime"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = digits_loaders(batch_size=64, seed=0)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, evaluated on {args.target}")
    print("| model | setting | variant | top-1 % | drop (pt) | logit SQNR (dB) | top-1 = FP32's (%) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        t0 = time.time()
        model = trained(name, data)
        for r in rows_for(name, model, data, args.target):
            fp32 = r["setting"] == "FP32"
            print(f"| {r['model']} | {r['setting']} | {r['variant']} | {r['top1']:.2f} | "
                  f"{'-' if fp32 else format(r['drop'], '+.2f')} | {'-' if fp32 else format(r['sqnr'], '.1f')} | "
                  f"{r['agree']:.1f} |", flush=True)
        print(f"<!-- {name}: {time.time() - t0:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
