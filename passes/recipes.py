"""Named pipelines (``fxcompress compile --recipe NAME``): each is just a pipeline string."""

from __future__ import annotations

RECIPES: dict[str, str] = {
    "int8": "fold-batchnorm,eliminate-dead-code,quantize-int8",
    "fp16": "fold-batchnorm,eliminate-dead-code,convert-fp16",
    "prune50-int8": "fold-batchnorm,prune-channels{ratio=0.5,round-to=8},fine-tune{epochs=2},quantize-int8",
    "distill-prune-int8": "fold-batchnorm,prune-channels{ratio=0.5,round-to=8},distill{epochs=3},quantize-int8",
    "sparse24-int8": "fold-batchnorm,prune-nm{n=2,m=4},fine-tune{epochs=1},quantize-int8",
}
