"""GPT-2 compression: a DistilGPT-2-shaped ``GPT2LMHeadModel`` (6 layers, width 768, 12 heads; vocab
8000 to keep the run short; random weights, ``use_cache=False``, seq 128) through ``fxcompress.compile``
to ONNX Runtime with the default front end.

Variants: FP32, ``quantize-dynamic``, ``prune-heads{ratio=0.5}`` and both. Per variant: how many layers
are INT8, params and MACs (from the report), ``model.onnx`` bytes against FP32, the logits' cosine
against eager PyTorch, and the compile time. GPT-2's projections are Hugging Face ``Conv1D`` layers
(``addmm`` over an ``[in, out]`` weight), captured as ``nn.Linear``; its attention uses one fused q/k/v
projection cut by ``split``.

    python bench/gpt2.py [--layers 6] [--vocab 8000] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

# bench/transformers.py would shadow the `transformers` package for a script run from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import transformers  # noqa: E402

import fxcompress as fxc  # noqa: E402

VARIANTS = ("", "quantize-dynamic", "prune-heads{ratio=0.5}", "prune-heads{ratio=0.5},quantize-dynamic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_embd=768, n_layer=args.layers, n_head=12,
                                  n_positions=max(256, args.seq), bos_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"GPT-2 {args.layers} layers x 768, vocab {args.vocab}, seq {args.seq}")
    print("| variant | INT8 layers | params | MACs | model.onnx x FP32 | logits cosine | compile s |")
    print("|---|---|---|---|---|---|---|")
    fp32_bytes = None
    for pipeline in VARIANTS:
        t0 = time.perf_counter()
        compiled = fxc.compile(model, (ids,), pipeline, progress=False)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            compiled.save(Path(tmp) / "out")
            size = os.path.getsize(Path(tmp) / "out" / "model.onnx")
        fp32_bytes = fp32_bytes or size
        out = compiled(ids)
        out = out[0] if isinstance(out, tuple) else out
        cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
        last = [r for r in compiled.report if r.stage == "fx"][-1]
        int8 = sum(len(r.stats.get("int8_layers", [])) for r in compiled.report)
        print(f"| {pipeline or 'FP32'} | {int8} | {last.params / 1e6:.1f}M | {last.macs / 1e6:.0f}M | "
              f"{size / fp32_bytes:.3f} | {float(cosine):.5f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
