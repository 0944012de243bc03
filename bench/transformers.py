"""Transformer benchmark: a MiniLM-shaped BERT (hidden 384, 6 layers, 12 heads, intermediate 1536,
random weights, seq 128) through fxcompress vs ONNX Runtime's own quantizers on the same FP32 export.

Variants: FP32 export (``fxcompress.compile`` with no passes), ``quantize-dynamic``,
``onnxruntime.quantization.quantize_dynamic`` on the FP32 export, ``quantize-int8`` (static, 8
calibration batches), ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, the same
batches), ``prune-heads{ratio=0.5},quantize-dynamic`` and the same with ``prune-channels{ratio=0.5}`` on
the MLPs, and ``quantize-weight-only{bits=4}`` (blockwise
INT4 Linear and embedding weights, float activations: MatMulNBits / GatherBlockQuantized) beside
``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` (4 bits, symmetric, block 32,
MatMul weights: its defaults leave the embedding tables in FP32). Latencies are timed in turns at batch 1
and 8 (one thread), so load on a shared machine hits all variants alike: read ratios within a
run, not absolute numbers across runs. Every figure is printed with the issue's target and
whether it is met.

    python bench/transformers.py [--quick] [--threads 1] [--iters 20] [--rounds 5] [--only weight-only|prune]

``--only weight-only`` builds and times only FP32 and the two weight-only variants, ``--only prune``
FP32, both dynamic quantizers and the pruned variants (the full bench is long).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import fxcompress as fxc
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.bench import interleaved

# this file's name shadows the `transformers` package when run as a script: drop its own directory
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

FULL = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536, "seq": 128,
        "vocab": 30522}
QUICK = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256, "seq": 32,
         "vocab": 1000}
#: the issue's targets: (figure, bound, "<=" or ">=")
TARGETS = {
    "quantize-dynamic file / FP32": 0.3,
    "quantize-dynamic latency / quantize_dynamic": 1.0,
    "quantize-int8 latency / quantize_static": 1.0,
    "prune-heads 0.5 + INT8 latency / quantize_dynamic": 0.6,
    "quantize-weight-only file / FP32": 0.2,
    "quantize-weight-only latency / FP32": 1.0,
}
WEIGHT_ONLY = "ours quantize-weight-only{bits=4}"
QD, ORT_QD = "ours quantize-dynamic", "ORT quantize_dynamic"
STATIC, ORT_STATIC = "ours quantize-int8", "ORT quantize_static"
#: pruned variants: name -> pipeline (heads alone leave the MLP, two thirds of the Linear MACs, as it is)
PRUNED = {
    "ours prune-heads 0.5 + quantize-dynamic": "prune-heads{ratio=0.5},quantize-dynamic",
    "ours prune-heads+prune-channels 0.5 + qd": "prune-heads{ratio=0.5},prune-channels{ratio=0.5},quantize-dynamic",
}
ORT_NBITS = "ORT MatMulNBitsQuantizer (4 bits)"
MIN_COSINE = 0.99


def make_model(shape: dict[str, int]) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
                     num_attention_heads=shape["num_attention_heads"], intermediate_size=shape["intermediate_size"],
                     max_position_embeddings=512)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def batch(size: int, shape: dict[str, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = shape["seq"]
    return torch.randint(1, shape["vocab"], (size, seq), generator=g), torch.ones(size, seq, dtype=torch.long)


class _Reader:
    """ORT calibration reader over (input_ids, attention_mask) batches."""

    def __init__(self, names: list[str], batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.feeds = iter([{n: t.numpy() for n, t in zip(names, b)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def ort_quantize(fp32: onnx.ModelProto, calibration: list[tuple[torch.Tensor, ...]] | None) -> onnx.ModelProto:
    """``onnxruntime.quantization.quantize_dynamic`` (calibration None) or ``quantize_static`` (QDQ,
    U8 activations, S8 per-channel weights, MinMax) on ``fp32``, after ORT's pre-processing."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32, src)
        quant_pre_process(str(src), str(pre))
        if calibration is None:
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
        else:
            names = [i.name for i in fp32.graph.input]
            quantize_static(str(pre), str(dst), _Reader(names, calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(str(dst))


def ort_matmul_nbits(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's own weight-only quantizer on ``fp32``: 4 bits, symmetric, block 32."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(onnx.ModelProto.FromString(fp32.SerializeToString()), bits=4, block_size=32,
                                     is_symmetric=True)
    quantizer.process()
    return quantizer.model.model


def ours(model: torch.nn.Module, x: tuple[torch.Tensor, ...], passes: str, calibration: Any = None,
         frontend: str = "auto") -> tuple[onnx.ModelProto, float]:
    """The ONNX model ``fxcompress.compile`` ships for ``passes``, and the compile time in seconds."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = fxc.compile(model, x, passes, calibration=calibration, target="onnx", frontend=frontend,
                               progress=False)
    return compiled.onnx_model, time.perf_counter() - t0


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _verdict(value: float, bound: float, op: str = "<=") -> str:
    met = value <= bound if op == "<=" else value >= bound
    return f"{value:.3f} (target {op} {bound}: {'met' if met else 'NOT met'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small BERT (hidden 64, 2 layers, vocab 1000, seq 32): a smoke run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calibration-batches", type=int, default=8)
    ap.add_argument("--only", choices=["weight-only", "prune"], help="only FP32 and this family of variants "
                    "(prune: quantize-dynamic, ORT quantize_dynamic and the pruned variants)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    model = make_model(shape)
    x1, x8 = batch(1, shape, 0), batch(8, shape, 1)
    calib = [batch(8, shape, 100 + i) for i in range(args.calibration_batches)]
    print(f"BERT {shape} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}")

    times: dict[str, float] = {}
    ours(model, x1, "", frontend="export")  # warm-up: first-call imports and caches are no front end's cost
    fp32, times["FP32 export (export)"] = ours(model, x1, "", frontend="export")
    _, times["FP32 export (auto)"] = ours(model, x1, "", frontend="auto")
    protos: dict[str, onnx.ModelProto] = {"FP32": fp32}
    if args.only != "prune":
        protos[WEIGHT_ONLY], times["quantize-weight-only"] = ours(model, x1, "quantize-weight-only{bits=4}")
        protos[ORT_NBITS] = ort_matmul_nbits(fp32)
    if args.only == "weight-only":
        report(protos, model, x1, x8, args, times)
        return
    protos[QD], times["quantize-dynamic"] = ours(model, x1, "quantize-dynamic")
    protos[ORT_QD] = ort_quantize(fp32, None)
    if args.only != "prune":
        protos[STATIC], times["quantize-int8"] = ours(model, x1, "quantize-int8", calibration=calib)
        protos[ORT_STATIC] = ort_quantize(fp32, calib)
    for name, passes in PRUNED.items():
        protos[name], times[passes] = ours(model, x1, passes, calibration=calib)

    lat, size, cos = report(protos, model, x1, x8, args, times)
    print("\ntargets:")
    print(f"  quantize-dynamic file / FP32: {_verdict(size[QD] / size['FP32'], TARGETS['quantize-dynamic file / FP32'])}")
    for b in (1, 8):
        print(f"  b={b} quantize-dynamic latency / quantize_dynamic: "
              f"{_verdict(lat[b][QD] / lat[b][ORT_QD], TARGETS['quantize-dynamic latency / quantize_dynamic'])}")
        if STATIC in protos:
            print(f"  b={b} quantize-int8 latency / quantize_static: "
                  f"{_verdict(lat[b][STATIC] / lat[b][ORT_STATIC], TARGETS['quantize-int8 latency / quantize_static'])}")
        for name in PRUNED:
            print(f"  b={b} {name} latency / quantize_dynamic: "
                  f"{_verdict(lat[b][name] / lat[b][ORT_QD], TARGETS['prune-heads 0.5 + INT8 latency / quantize_dynamic'])}")
    for name in (QD, ORT_QD, STATIC, ORT_STATIC):
        if name in protos:
            print(f"  cosine vs FP32 eager, {name}: {_verdict(cos[name], MIN_COSINE, '>=')}")

def report(protos: dict[str, onnx.ModelProto], model: torch.nn.Module, x1: tuple[torch.Tensor, ...],
           x8: tuple[torch.Tensor, ...], args: argparse.Namespace,
           times: dict[str, float]) -> tuple[dict[int, dict[str, float]], dict[str, int], dict[str, float]]:
    """Time ``protos`` in turns at batch 1 and 8, print the table and the weight-only targets;
    returns (latencies by batch, file sizes, cosines vs FP32 eager)."""
    runners = {name: OrtRunner(p, threads=args.threads) for name, p in protos.items()}
    with torch.no_grad():
        reference = model(*x8).last_hidden_state
    lat = {b: interleaved(runners, x, iters=args.iters, rounds=args.rounds) for b, x in ((1, x1), (8, x8))}
    size = {name: p.ByteSize() for name, p in protos.items()}
    cos = {name: cosine(r(*x8)[0], reference) for name, r in runners.items()}
    base = "ORT quantize_dynamic" if "ORT quantize_dynamic" in protos else "FP32"
    tag = "qd" if base != "FP32" else "fp32"
    print(f"\n{'variant':42s} {'MB':>7s} {'x FP32':>7s} {'b=1 ms':>8s} {'b=8 ms':>8s} "
          f"{'b=1 x ' + tag:>9s} {'b=8 x ' + tag:>9s} {'cosine':>8s}")
    for name in protos:
        print(f"{name:42s} {size[name] / 2**20:7.2f} {size[name] / size['FP32']:7.3f} {lat[1][name]:8.3f} "
              f"{lat[8][name]:8.3f} {lat[1][name] / lat[1][base]:9.3f} {lat[8][name] / lat[8][base]:9.3f} "
              f"{cos[name]:8.5f}")
    print("\ncompile time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    if WEIGHT_ONLY not in protos:
        return lat, size, cos
    print("\nweight-only targets:")
    for name in (WEIGHT_ONLY, ORT_NBITS):
        print(f"  {name} file / FP32: {_verdict(size[name] / size['FP32'], TARGETS['quantize-weight-only file / FP32'])}")
        for b in (1, 8):
            print(f"  b={b} {name} latency / FP32: "
                  f"{_verdict(lat[b][name] / lat[b]['FP32'], TARGETS['quantize-weight-only latency / FP32'])}")
        print(f"  cosine vs FP32 eager, {name}: {_verdict(cos[name], MIN_COSINE, '>=')}")
    return lat, size, cos


if __name__ == "__main__":
    main()
