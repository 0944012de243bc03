"""N:M semi-structured sparsity (default 2:4): in every group of M consecutive input channels of
a Conv/Linear weight (for each output channel and kernel position) at most N weights are non-zero.

That is the layout of the sparse tensor-core kernels TensorRT uses for ``SPARSE_WEIGHTS``
(weights ``K x C x R x S``, groups of M along ``C``). Layers whose input-channel count (per
group) is not a multiple of M are skipped, with the reason.

Unlike ``prune-magnitude{amount=...}`` (relative to the remaining weights), N:M is a target
layout, not an amount: a weight already N:M sparse is left as it is, so running the pass again
(``repeat{n=2}(prune-nm)``) changes nothing, and the pipeline reports the repeat as
``unchanged``, with an info diagnostic per layer already in the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.errors import PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult

from ._common import prune_weights

__all__ = ["PruneNM", "check_nm", "nm_groups"]

NM_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


def nm_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``weight`` (``out x in x *kernel``) as rows of M consecutive input channels: ``(-1, m)``."""
    if weight.dim() < 2:
        raise ValueError(f"N:M sparsity needs a weight with an input-channel dim 1, got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise ValueError(f"input channels {weight.shape[1]} are not a multiple of m={m}")
    w = weight.movedim(1, -1)  # out x *kernel x in
    return w.reshape(-1, m)


def _from_groups(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return groups.reshape(like.movedim(1, -1).shape).movedim(-1, 1)


def check_nm(tensor: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` consecutive input channels (dim 1) has at most ``n`` non-zeros."""
    if tensor.dim() < 2 or tensor.shape[1] % m:
        return False
    return bool(((nm_groups(tensor.detach(), m) != 0).sum(1) <= n).all())


@dataclass(frozen=True)
class PruneNM(Pass):
    """Keep the ``n`` largest-magnitude weights of every ``m`` along the input channels (2:4 by default).

    Idempotent: a layer already N:M sparse keeps its weights (see the module doc)."""

    name: ClassVar[str] = "prune-nm"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    n: int = 2
    m: int = 4
    types: tuple[str, ...] = NM_TYPES
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    exclude_head: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.n < self.m):
            raise PipelineError(f"prune-nm: need 0 <= n < m, got n={self.n}, m={self.m}")
        bad = [t for t in self.types if t not in NM_TYPES]
        if bad:
            raise PipelineError(f"prune-nm: types {bad} have no N:M layout; choose from {', '.join(NM_TYPES)}")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result, stats, _ = prune_weights(gm, ctx, self, self._prune)
        result.stats = {**stats, "n": self.n, "m": self.m}
        return result

    def _prune(self, layers: list[tuple[str, nn.Module]], skipped: dict[str, str], result: PassResult
               ) -> dict[str, torch.Tensor]:
        new: dict[str, torch.Tensor] = {}
        for path, mod in layers:
            w = mod.weight.detach()
            if w.shape[1] % self.m:
                skipped[path] = f"{w.shape[1]} input channels per group are not a multiple of m={self.m}"
                result.info(f"skipped: {skipped[path]}", node=path)
                continue
            if check_nm(w, self.n, self.m):
                result.info(f"already {self.n}:{self.m} sparse; left as it is", node=path)
            groups = nm_groups(w, self.m).clone()
            order = torch.argsort(groups.abs(), dim=1, descending=True, stable=True)
            groups.scatter_(1, order[:, self.n:], 0.0)
            new[path] = _from_groups(groups, w).contiguous()
        return new
