"""Named pipelines (``fxcompress compile --recipe NAME``): each is just a pipeline string.

Every recipe starts with the same exact clean-up (eval-mode dropout and identities out) and works
on any traceable model: passes with nothing to do are reported ``unchanged``. BatchNorm is folded
into the preceding conv/linear right before quantization (so the quantized layers are fused), but
AFTER any training step: a pruned network recovers far better while it still has its BatchNorms
(measured on digits, DigitsResNet(width=32), 50% channels pruned, 2 epochs of fine-tuning: 99.2%
when BN is folded after training, 71.9% when folded before). Recovery uses lr 5e-3 (cosine decay):
on the narrower DigitsResNet(width=16) it reached 97.5% against 77.5% with lr 1e-3. The 2:4 recipe
fine-tunes gently (lr 1e-3) because the pattern is re-applied afterwards (95.6% vs 92.2%).

- ``int8``: static INT8 (Q/DQ placed for the compile target); needs ``calibration=``.
- ``fp16``: float16 weights and activations, normalization/softmax/reductions kept in float32.
- ``prune50-int8``: half of the channels removed (kept counts rounded up to multiples of 8, the
  tile size of INT8/FP16 kernels), recovered by supervised fine-tuning, then INT8; needs
  ``train_data=`` with labels (or float targets) and ``calibration=``.
- ``distill-prune-int8``: as ``prune50-int8``, recovered by distillation from the original model.
- ``int8-accurate``: static INT8 with the repairs that keep accuracy without training, each a no-op
  where it finds nothing to do: cross-layer equalization of conv/linear pairs (after BatchNorm is
  folded), SmoothQuant for LayerNorm -> Linear groups, then INT8 and empirical bias correction
  (``bench/quant_accuracy.py``: +2.5 to +6 dB logit SNR over plain per-tensor INT8 on the digits CNNs);
  needs ``calibration=``.
- ``sparse24-int8``: 2:4 semi-structured sparsity, fine-tuned, then the 2:4 pattern re-applied
  (training moves the zeroed weights) before INT8, so the result really is 2:4 sparse.
"""

from __future__ import annotations

CLEANUP = "remove-dropout,remove-identity"
QUANTIZE = "fold-batchnorm,quantize-int8"
PRUNE50 = "prune-channels{ratio=0.5,round-to=8}"
SPARSE24 = "prune-nm{n=2,m=4}"

RECIPES: dict[str, str] = {
    "int8": f"{CLEANUP},{QUANTIZE}",
    "fp16": f"{CLEANUP},fold-batchnorm,convert-fp16",
    "prune50-int8": f"{CLEANUP},{PRUNE50},fine-tune{{epochs=2,lr=0.005}},{QUANTIZE}",
    "distill-prune-int8": f"{CLEANUP},{PRUNE50},distill{{epochs=3,lr=0.005}},{QUANTIZE}",
    "sparse24-int8": f"{CLEANUP},{SPARSE24},fine-tune{{epochs=1,lr=0.001}},{SPARSE24},{QUANTIZE}",
    "int8-accurate": f"{CLEANUP},fold-batchnorm,equalize-cross-layer,smooth-quant,quantize-int8,correct-bias",
}

__all__ = ["CLEANUP", "PRUNE50", "QUANTIZE", "RECIPES", "SPARSE24"]
