"""INT8 for TensorRT: explicit quantization (Q/DQ) placed the way TensorRT wants it, checked and
built into a real engine on a CPU-only machine.

1. Train ``DigitsResNet`` on scikit-learn's digits (shipped with scikit-learn, no download).
2. ``QuantizeInt8(scheme="tensorrt")``: symmetric INT8 Q/DQ on the inputs and per-channel weights of
   every conv/linear and on both inputs of residual adds, nothing between a conv and its ReLU.
3. ``CheckTensorRT``: the static rules and the real TensorRT-RTX ONNX parser look for anything
   TensorRT would reject (none expected).
4. Build real engines with TensorRT for RTX (``target="tensorrt-rtx"``, module ``tensorrt_rtx``),
   which builds ahead of time on a CPU: an FP32 engine and the INT8 one, and compare their sizes.
5. Run the same Q/DQ ONNX graph in ONNX Runtime for its accuracy. Running the ENGINE needs an NVIDIA
   GPU: without one ``BackendUnavailable`` is raised, caught and explained; nothing here claims an
   engine ran when it did not.
6. Save the artifact (model.onnx, model.engine, manifest.json) and print what a GPU user runs for
   ``target="tensorrt", precision="int8"``.

    python examples/tensorrt_int8.py                      # a wider model (width 96): about 30 s
    python examples/tensorrt_int8.py --quick              # what CI runs: seconds
    python examples/tensorrt_int8.py --target tensorrt    # on a machine with TensorRT and a GPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import fxcompress as fxc
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.backends.tensorrt import gpu_available, import_trt
from fxcompress.digits import DigitsResNet, accuracy, digits_loaders, train_classifier
from fxcompress.units import format_bytes
from passes import CheckTensorRT, FoldBatchNorm, QuantizeInt8, RemoveDropout, RemoveIdentity

GPU_COMMANDS = """\
On a machine with an NVIDIA GPU, a CUDA driver and TensorRT 10 (pip install "fxcompress[tensorrt]"):

    python examples/tensorrt_int8.py --target tensorrt

or, for your own model, in Python:

    import fxcompress as fxc
    from passes import CheckTensorRT, FoldBatchNorm, QuantizeInt8
    compiled = fxc.compile(model, (x,), [FoldBatchNorm(), QuantizeInt8(scheme="tensorrt"), CheckTensorRT()],
                           target="tensorrt", precision="int8", calibration=calib_loader)
    y = compiled(x.cuda())          # runs the engine on the GPU
    compiled.save("out_trt/")       # model.onnx + model.engine + manifest.json

or from the shell (calib.npy: an N x C x H x W array of calibration samples):

    fxcompress compile mypackage.models:make_model --input-shape 1x3x224x224 \\
        --passes "fold-batchnorm,quantize-int8{scheme=tensorrt},check-tensorrt" \\
        --calibration calib.npy --target tensorrt --precision int8 --out out_trt

TensorRT builds the INT8 layers from the Q/DQ nodes (explicit quantization, no calibrator): the scales
are the ones calibrated here, so expect the engine's accuracy close to the ONNX Runtime run of the same
graph (kernels and rounding differ slightly); measure it on the GPU."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="tensorrt-rtx", choices=("tensorrt-rtx", "tensorrt"),
                        help="tensorrt-rtx builds on a CPU; tensorrt needs the tensorrt module and a GPU")
    parser.add_argument("--out", type=Path, default=Path("tensorrt_int8_out"), help="artifact directory")
    parser.add_argument("--quick", action="store_true", help="smaller model, two epochs (seconds)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import_trt(args.target)
    except fxc.BackendUnavailable as exc:
        print(f"cannot build for target={args.target!r}: {exc}")
        print(GPU_COMMANDS)
        return 1
    # width 64 is about the smallest at which INT8 weights outweigh the engine's fixed INT8 overhead
    width, epochs = (64, 2) if args.quick else (96, 6)
    data = digits_loaders(batch_size=64, seed=0)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = train_classifier(DigitsResNet(width=width), data.train, epochs=epochs, seed=0)
    fp32_accuracy = accuracy(model, data.test)
    print(f"trained DigitsResNet(width={width}) in {time.perf_counter() - t0:.1f} s: "
          f"accuracy {fp32_accuracy:.2%} (eager PyTorch, FP32)")
    x = next(iter(data.test))[0][:1]
    cleanup = [RemoveDropout(), RemoveIdentity(), FoldBatchNorm()]

    try:
        fp32 = fxc.compile(model, (x,), cleanup, target=args.target, precision="fp32", progress=False)
        int8 = fxc.compile(model, (x,), [*cleanup, QuantizeInt8(scheme="tensorrt"), CheckTensorRT()],
                           target=args.target, precision="int8", calibration=data.calibration, progress=False)
    except fxc.BackendUnavailable as exc:
        print(f"no {args.target} engine was built: {exc}")
        print(GPU_COMMANDS)
        return 1

    check = int8.report.find("check-tensorrt")[0].stats
    print(f"CheckTensorRT: {len(check['findings'])} findings ({check['parser']} parser, operator matrix "
          f"{check['operator_matrix']})")
    for finding in check["findings"]:
        print(f"  - [{finding['severity']}] {finding['node']}: {finding['problem']} Fix: {finding['fix']}")

    ops = [n.op_type for n in int8.onnx_model.graph.node]
    print(f"INT8 ONNX graph: {ops.count('QuantizeLinear')} QuantizeLinear, "
          f"{ops.count('DequantizeLinear')} DequantizeLinear, {ops.count('Conv')} Conv, {ops.count('Gemm')} Gemm")
    for name, c in (("FP32", fp32), ("INT8", int8)):
        info = c.engine_info
        print(f"{name} engine: {len(c.engine)} bytes ({format_bytes(len(c.engine))}), built by {info['module']} "
              f"{info['version']} in {info['build_seconds']:.2f} s, {info['num_layers']} network layers")
    print(f"INT8 engine / FP32 engine: {len(int8.engine) / len(fp32.engine):.2f}x the size "
          f"(weights: {format_bytes(int8.report[-1].bytes)} INT8 graph vs {format_bytes(fp32.report[-1].bytes)} FP32)")

    ort = OrtRunner(int8.onnx_model, threads=1)
    print(f"INT8 Q/DQ graph on ONNX Runtime (the graph inside the engine): accuracy {accuracy(ort, data.test):.2%} "
          f"(FP32 {fp32_accuracy:.2%})")

    try:
        engine_accuracy = accuracy(int8, data.test)
    except fxc.BackendUnavailable as exc:
        print(f"engine not run: {exc}")
    else:
        print(f"INT8 engine ran on the GPU: accuracy {engine_accuracy:.2%}")
    if not gpu_available():
        print("(this machine has no GPU: the engines above were built, not run)")

    out = int8.save(args.out)
    print(f"saved to {out}/ ({', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))})")
    print()
    print(GPU_COMMANDS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
