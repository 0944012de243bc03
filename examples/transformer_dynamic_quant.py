"""Dynamic INT8 quantization of a transformer MLP block, run in ONNX Runtime on the CPU.

Transformer MLP weights are large and their activations vary a lot from input to input, so static
activation scales fit badly. ``QuantizeDynamic`` stores the Linear weights in INT8 (per output
column) and quantizes activations per call from their own range; in ONNX it is
DynamicQuantizeLinear + MatMulInteger, which ONNX Runtime runs with integer kernels. No calibration
data is needed.

The script builds a pre-norm MLP block (LayerNorm -> Linear(d, 4d) -> GELU -> Linear(4d, d) + residual),
compiles it twice to ONNX Runtime (FP32, and ``quantize-dynamic``), and in the same run measures
the latency of both sessions (median of many calls, same thread count), the model sizes, and the
output error of INT8 against the FP32 model.

    python examples/transformer_dynamic_quant.py            # d=512, 8 x 128 tokens: about a minute
    python examples/transformer_dynamic_quant.py --quick    # d=128, 2 x 32 tokens (what CI runs)
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import fxcompress as fxc
from fxcompress.bench import benchmark
from fxcompress.units import format_bytes
from fxcompress.verify import error_metrics


class MlpBlock(nn.Module):
    """The feed-forward half of a pre-norm transformer layer."""

    def __init__(self, dim: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small block, few timing iterations")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for both sessions")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dim, batch, tokens, iters = (128, 2, 32, 50) if args.quick else (512, 8, 128, 200)
    torch.manual_seed(0)
    model = MlpBlock(dim).eval()
    x = torch.randn(batch, tokens, dim)
    print(f"MLP block: d={dim}, hidden={4 * dim}, input {batch} x {tokens} x {dim}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    fp32 = fxc.compile(model, (x,), "", target="onnxruntime", threads=args.threads, progress=False)
    int8 = fxc.compile(model, (x,), "quantize-dynamic", target="onnxruntime", threads=args.threads,
                       progress=False)
    print(int8.report)
    ops = sorted({n.op_type for n in int8.onnx_model.graph.node})
    print(f"INT8 ONNX operators: {', '.join(ops)}")

    with torch.no_grad():
        reference = model(x)
    for name, c in (("FP32", fp32), ("INT8", int8)):
        m = error_metrics(reference, c(x))
        rel = m.max_abs / float(reference.abs().max())
        print(f"{name} vs eager: max abs error {m.max_abs:.3e} ({rel:.2%} of max |y|), cosine {m.cosine:.6f}")

    # FP32 is timed before and after INT8 (best of the two) so a load spike on a shared machine
    # does not flatter INT8
    t_fp32 = benchmark(fp32, (x,), name="fp32", warmup=10, iters=iters)
    t_int8 = benchmark(int8, (x,), name="int8", warmup=10, iters=iters)
    t_fp32_again = benchmark(fp32, (x,), name="fp32", warmup=5, iters=iters)
    fp32_ms = min(t_fp32.median_ms, t_fp32_again.median_ms)
    print(f"latency FP32 ONNX Runtime: {fp32_ms:.3f} ms (median of {iters}, {args.threads} thread(s))")
    print(f"latency INT8 ONNX Runtime: {t_int8.median_ms:.3f} ms -> {fp32_ms / t_int8.median_ms:.2f}x "
          f"the speed of FP32")
    size_fp32, size_int8 = fp32.onnx_model.ByteSize(), int8.onnx_model.ByteSize()
    print(f"size: FP32 ONNX {format_bytes(size_fp32)}, INT8 ONNX {format_bytes(size_int8)} "
          f"({size_fp32 / size_int8:.1f}x smaller)")
    print("numbers are from one run on this machine; compare the ratios, not the absolute times")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
