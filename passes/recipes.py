"""Named pipelines (``fxcompress compile --recipe NAME``): each is just a pipeline string.

Every recipe starts with the same exact clean-up (eval-mode dropout and identities out, BatchNorm
folded into the preceding conv/linear) so quantization sees fused layers, and works on any
traceable model: passes with nothing to do are reported ``unchanged``.

- ``int8``: static INT8 (Q/DQ placed for the compile target); needs ``calibration=``.
- ``fp16``: float16 weights and activations, normalization/softmax/reductions kept in float32.
- ``prune50-int8``: half of the channels removed (kept counts rounded up to multiples of 8, the
  tile size of INT8/FP16 kernels), recovered by supervised fine-tuning, then INT8; needs
  ``train_data=`` with labels (or float targets) and ``calibration=``.
- ``distill-prune-int8``: as ``prune50-int8``, recovered by distillation from the original model.
- ``sparse24-int8``: 2:4 semi-structured sparsity, fine-tuned, then the 2:4 pattern re-applied
  (training moves the zeroed weights) before INT8, so the result really is 2:4 sparse.
"""

from __future__ import annotations

CLEANUP = "remove-dropout,remove-identity,fold-batchnorm"

RECIPES: dict[str, str] = {
    "int8": f"{CLEANUP},quantize-int8",
    "fp16": f"{CLEANUP},convert-fp16",
    "prune50-int8": f"{CLEANUP},prune-channels{{ratio=0.5,round-to=8}},fine-tune{{epochs=2}},quantize-int8",
    "distill-prune-int8": f"{CLEANUP},prune-channels{{ratio=0.5,round-to=8}},distill{{epochs=3}},quantize-int8",
    "sparse24-int8": f"{CLEANUP},prune-nm{{n=2,m=4}},fine-tune{{epochs=1}},prune-nm{{n=2,m=4}},quantize-int8",
}

__all__ = ["CLEANUP", "RECIPES"]
