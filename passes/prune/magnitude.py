"""Unstructured magnitude pruning: zero the smallest weights, per layer or with one global threshold.

Zeros are written into the weights (new Parameters, no masks or hooks left behind): the graph
stays a plain GraphModule and the sparsity survives export. Biases are never pruned.

``amount`` follows ``torch.nn.utils.prune``: it is the fraction of the weights still unpruned
(non-zero) that this run removes, so ``repeat{n=2}(prune-magnitude{amount=0.2})`` leaves
``1 - 0.8**2 = 36%`` zeros, as two ``l1_unstructured(amount=0.2)`` calls do, and iterative
prune -> fine-tune schedules prune again each round like ``prune-channels{ratio=...}``. Without
masks, a weight that is exactly zero counts as already pruned. On a dense model the result is
``amount`` sparsity of the selected weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.errors import PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult

from ._common import WEIGHT_TYPES, prune_weights

__all__ = ["PruneMagnitude", "smallest"]


def smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` smallest ``|values|`` (ties broken by position: deterministic)."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.argsort(values.detach().abs().flatten(), stable=True)[:k]


def _count(amount: float, n: int) -> int:
    return min(n, int(amount * n + 0.5))


def _picks(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Flat indices of the zeros after pruning ``amount`` of ``weight``'s non-zeros: the existing
    zeros sort first (``|0|`` is smallest), then the smallest survivors."""
    zeros = int((weight == 0).sum())
    return smallest(weight, zeros + _count(amount, weight.numel() - zeros))


@dataclass(frozen=True)
class PruneMagnitude(Pass):
    """Zero ``amount`` of the remaining (non-zero) weights, those of smallest magnitude (L1, unstructured).

    ``amount`` is relative to what is left, as in ``torch.nn.utils.prune`` (see the module doc):
    ``scope="layer"``: every selected layer loses ``round(amount * nonzero)`` more weights;
    ``scope="global"``: one threshold across all selected layers (``round(amount * nonzero)``
    more zeros in all). Layers are selected by module type (``types``) and path patterns (``include`` /
    ``exclude``); the classifier head is left dense unless ``exclude_head=False``.
    """

    name: ClassVar[str] = "prune-magnitude"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    amount: float = 0.5
    scope: Literal["layer", "global"] = "layer"
    types: tuple[str, ...] = WEIGHT_TYPES
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    exclude_head: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.amount <= 1.0:
            raise PipelineError(f"prune-magnitude: amount={self.amount} must be in [0, 1]")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        already = 0

        def rule(layers: list[tuple[str, nn.Module]], skipped: dict[str, str], result: PassResult
                 ) -> dict[str, torch.Tensor]:
            nonlocal already
            if not layers:
                result.warn(f"no layer selected (types {', '.join(self.types)}, include {self.include})")
            weights = [mod.weight for _, mod in layers]
            already = sum(int((w == 0).sum()) for w in weights)
            new = {}
            for (path, _), w, idx in zip(layers, weights, self._picks(weights)):
                new[path] = w.detach().clone()
                new[path].view(-1)[idx] = 0
            return new

        result, stats, zeros = prune_weights(gm, ctx, self, rule)
        pruned = sum(z for z, _ in zeros.values())
        total = sum(n for _, n in zeros.values())
        result.stats = {**stats, "scope": self.scope, "amount": self.amount,
                        "selected_sparsity": pruned / total if total else 0.0,
                        "already_zero": already, "newly_pruned": pruned - already}
        if zeros and pruned == already:
            result.info(f"nothing pruned: amount={self.amount} of the {total - already} remaining non-zero weights "
                        f"rounds to 0 (selected sparsity stays {pruned / total if total else 0.0:.3f})")
        return result

    def _picks(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per weight, the flat indices that are zero after this run (``scope``: per layer or global)."""
        if self.scope == "layer":
            return [_picks(w, self.amount) for w in weights]
        flat = torch.cat([w.detach().flatten() for w in weights]) if weights else torch.empty(0)
        chosen = _picks(flat, self.amount)
        bounds = torch.tensor([0] + [w.numel() for w in weights]).cumsum(0)
        return [chosen[(chosen >= lo) & (chosen < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
