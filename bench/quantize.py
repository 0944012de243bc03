"""INT8 benchmark: eager FP32, ORT FP32, ORT INT8 from ``quantize-int8``, and ORT INT8 from
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel), on digits CNNs trained here.

One run, one machine; read ratios within a run, not absolute numbers across runs.

    python bench/quantize.py [--widths 16 32] [--epochs 8] [--threads 1] [--iters 50] [--rounds 7]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch

import fxcompress as fxc
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.bench import interleaved
from fxcompress.digits import DigitsResNet, accuracy, digits_loaders, train_classifier


def compiled_onnx(model: torch.nn.Module, x: torch.Tensor, calibration: Any, passes: list[Any]) -> onnx.ModelProto:
    """The ONNX model ``fxcompress.compile`` produces for ``passes`` (what a user ships)."""
    return fxc.compile(model, (x,), passes=passes, calibration=calibration, target="onnxruntime",
                       progress=False).onnx_model


class _Reader:
    def __init__(self, name: str, loader: Any) -> None:
        self.batches = iter([{name: xb.numpy()} for xb, _ in loader])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ort_static(fp32: onnx.ModelProto, calibration: Any, *, reduce_range: bool) -> onnx.ModelProto:
    """ORT's own static QDQ quantization: U8 activations, S8 per-channel weights, MinMax calibration."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32, src)
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), _Reader(fp32.graph.input[0].name, calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(dst)


def _ort_fn(model: onnx.ModelProto, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return OrtRunner(model, threads=threads)


def _int_kernels(model: onnx.ModelProto) -> str:
    """Integer vs float compute kernels in the graph ORT actually runs."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "opt.onnx"
        OrtRunner(model, threads=1, optimized_model_path=path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
    qlin = sum(op.startswith("QLinear") or op in ("QGemm", "MatMulInteger", "ConvInteger") for op in ops)
    flt = sum(op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm") for op in ops)
    return f"{qlin} / {flt}"


def main() -> None:
    from passes import FoldBatchNorm, QuantizeInt8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    data = digits_loaders()
    table = Table(title=f"INT8 on digits ({platform.machine()}, {args.threads} thread(s), best of {args.rounds} "
                        f"rounds x {args.iters} calls)")
    for col in ("model", "variant", "top-1 %", "ONNX KB", "ORT kernels (int/float)",
                *[f"b={b} ms" for b in args.batches], "speed vs ORT FP32"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for width in args.widths:
        t0 = time.time()
        model = train_classifier(DigitsResNet(width=width), data.train, epochs=args.epochs)
        print(f"trained width {width} in {time.time() - t0:.0f}s")
        x1 = next(iter(data.test))[0][:1]
        fp32 = compiled_onnx(model, x1, None, [FoldBatchNorm()])
        protos: dict[str, onnx.ModelProto | None] = {
            "eager FP32": None,
            "ORT FP32": fp32,
            "ORT INT8 quantize-int8 (mse, default)": compiled_onnx(model, x1, data.calibration,
                                                                   [FoldBatchNorm(), QuantizeInt8()]),
            "ORT INT8 quantize-int8 (percentile)": compiled_onnx(
                model, x1, data.calibration, [FoldBatchNorm(), QuantizeInt8(observer="percentile")]),
            "ORT INT8 quantize-int8 (entropy)": compiled_onnx(model, x1, data.calibration,
                                                              [FoldBatchNorm(), QuantizeInt8(observer="entropy")]),
            "ORT INT8 quantize_static": ort_static(fp32, data.calibration, reduce_range=False),
            "ORT INT8 quantize_static reduce_range": ort_static(fp32, data.calibration, reduce_range=True),
        }
        fns = {name: (model if proto is None else _ort_fn(proto, args.threads)) for name, proto in protos.items()}
        times = {b: interleaved(fns, (next(iter(data.test))[0][:b],), iters=args.iters, rounds=args.rounds) for b in args.batches}
        for name, proto in protos.items():
            acc = accuracy(fns[name], data.test) * 100
            size = proto.ByteSize() if proto is not None else None
            rel = " ".join(f"{times[b]['ORT FP32'] / times[b][name]:.2f}x" for b in args.batches)
            table.add_row(f"DigitsResNet w={width}", name, f"{acc:.2f}", f"{size / 1024:.1f}" if size else "-",
                          _int_kernels(proto) if proto is not None else "-",
                          *[f"{times[b][name]:.3f}" for b in args.batches], rel)
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
