"""INT8 benchmark: eager FP32, ORT FP32, ORT INT8 from ``quantize-int8``, and ORT INT8 from
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel), on digits CNNs trained here.

One run, one machine; read ratios within a run, not absolute numbers across runs.

    python bench/quantize.py [--widths 16 32] [--epochs 6] [--threads 1] [--iters 200]
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
from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.bench import benchmark
from fxcompress.digits import DigitsResNet, accuracy, digits_loaders, train_classifier
from fxcompress.trace import trace


def _fold(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    from passes.fuse import FoldBatchNorm

    gm = trace(model, (x,))
    return FoldBatchNorm().run(gm, fxc.PassContext((x,))).graph


def ours(model: torch.nn.Module, x: torch.Tensor, calibration: Any, **options: Any) -> onnx.ModelProto:
    """``fold-batchnorm,quantize-int8`` lowered to ONNX."""
    from passes.quantize.ptq import QuantizeInt8

    gm = _fold(model, x)
    ctx = fxc.PassContext((x,), calibration=calibration, target="onnxruntime")
    q = QuantizeInt8(**options).run(gm, ctx).graph
    return export_onnx(q, (x,))


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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "opt.onnx"
        OrtRunner(model, threads=1, optimized_model_path=path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
    qlin = sum(op.startswith("QLinear") or op in ("QGemm", "MatMulInteger", "ConvInteger") for op in ops)
    flt = sum(op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm") for op in ops)
    return f"{qlin} int / {flt} float"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    data = digits_loaders()
    table = Table(title=f"INT8 on digits ({platform.processor() or platform.machine()}, "
                        f"ORT threads={args.threads}, median of {args.iters})")
    for col in ("model", "variant", "top-1 %", "size KB", "ORT kernels", *[f"b={b} ms" for b in args.batches],
                "vs ORT FP32"):
        table.add_column(col, justify="left" if col in ("model", "variant") else "right")
    for width in args.widths:
        t0 = time.time()
        model = train_classifier(DigitsResNet(width=width), data.train, epochs=args.epochs)
        print(f"trained width {width} in {time.time() - t0:.0f}s")
        x1 = next(iter(data.test))[0][:1]
        fp32 = export_onnx(_fold(model, x1), (x1,))
        variants: list[tuple[str, Any, onnx.ModelProto | None]] = [("eager FP32", model, None),
                                                                     ("ORT FP32", None, fp32)]
        for name, opts in (("ORT INT8 quantize-int8", {}),
                           ("ORT INT8 quantize-int8 entropy", {"observer": "entropy"})):
            variants.append((name, None, ours(model, x1, data.calibration, **opts)))
        variants.append(("ORT INT8 quantize_static", None, ort_static(fp32, data.calibration, reduce_range=False)))
        variants.append(("ORT INT8 quantize_static reduce_range", None,
                         ort_static(fp32, data.calibration, reduce_range=True)))
        base: dict[int, float] = {}
        for name, module, proto in variants:
            fn = module if proto is None else _ort_fn(proto, args.threads)
            acc = accuracy(fn, data.test) * 100
            size = (proto.ByteSize() if proto is not None else
                    sum(t.numel() * t.element_size() for t in model.state_dict().values()))
            times = []
            for b in args.batches:
                xb = next(iter(data.test))[0][:b]
                if proto is None:
                    torch.set_num_threads(args.threads)
                r = benchmark(fn, (xb,), name=name, iters=args.iters, warmup=20)
                times.append(r.median_ms)
                if name == "ORT FP32":
                    base[b] = r.median_ms
            rel = ("-" if not base else
                   " ".join(f"{base[b] / t:.2f}x" for b, t in zip(args.batches, times)))
            table.add_row(f"DigitsResNet w={width}", name, f"{acc:.2f}", f"{size / 1024:.1f}",
                          _int_kernels(proto) if proto is not None else "-", *[f"{t:.3f}" for t in times], rel)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
