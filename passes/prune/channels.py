"""Structured channel pruning: physically remove output channels (and everything that depends
on them) so the model gets smaller and faster with ordinary dense kernels.

The channel-dependency graph (``depgraph`` / ``analysis``) says which channels must go together;
each group of coupled layers loses ``ratio`` of its channel units, the least important first
(``importance``); ``rewrite`` rebuilds the modules and shape arguments. Whatever the analysis
cannot prove safe stays as it is and is listed in ``stats["unpruned"]`` with the reason.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from torch.fx import GraphModule

from fxcompress.errors import PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult, prefer_before

from .._fx_utils import unmatched_patterns
from ._common import check_runs, graph_totals, layer_totals, need_shapes, pruned_layers, totals
from .depgraph import DependencyGraph, dependency_graph
from .importance import Criterion, class_importance
from .rewrite import apply_removal
from .sections import SectionGuard

__all__ = ["PruneChannels"]


@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove ``ratio`` of the output channels of every prunable group of layers.

    ``ratios``: per-layer overrides, ``(("layer3.*", 0.6), ...)`` or a dict; a group takes the
    first pattern matching one of its layers. ``round_to``: kept channel counts are multiples of
    it (rounded up). ``min_channels``: never keep fewer channels in a layer. ``exclude``: layer
    patterns whose output channels are kept (the classifier head always is: it feeds the output).
    ``importance``: ``l2`` (default), ``l1``, ``bn-scale`` or ``taylor`` (needs train_data or
    calibration data; ``batches`` of them are used). ``norm_stats``: channels that a LayerNorm or
    a one-group GroupNorm normalizes over are kept (``"block"``, listed in ``stats["unpruned"]``),
    since removing any of them, even an all-zero one, changes the statistics; ``"prune"`` prunes
    them anyway (an approximation, like Torch-Pruning does). Each piece of a channel
    ``split``/``chunk``/``tensor_split`` and each channel slice keeps at least ``1 - ratio`` of its
    units, and one (ShuffleNetV2's halves stay balanced); a group that would have to cut deeper
    removes fewer units and says so (``kept_for_sections`` in ``stats["groups"]``). With
    ``ratio=0`` and no non-zero ``ratios`` nothing is removed and the instance is ``exact`` (the
    pipeline checks it).
    """

    name: ClassVar[str] = "prune-channels"
    shares_weights: ClassVar[bool] = True
    #: the class is not exact; an instance with ratio 0 everywhere is (set in ``__post_init__``),
    #: so the pipeline verifies its outputs numerically
    exact: ClassVar[bool] = False
    order_preferences: ClassVar[tuple] = (
        prefer_before("quantize-int8", reason="quantization calibrates scales for the channels it sees, and "
                                              "channel importance would then rank quantized weights; prune "
                                              "channels first, then quantize"),
        prefer_before("prune-nm", "prune-magnitude",
                      reason="after unstructured pruning, channel importance sees the zeros it left rather "
                             "than the trained weights; remove channels first"),
    )

    ratio: float = 0.5
    ratios: tuple[tuple[str, float], ...] | dict[str, float] = ()
    round_to: int = 1
    min_channels: int = 1
    exclude: tuple[str, ...] = ()
    importance: Criterion = "l2"
    batches: int = 8
    norm_stats: Literal["block", "prune"] = "block"

    def __post_init__(self) -> None:
        ratios = self.ratios
        if isinstance(ratios, dict):
            ratios = tuple(ratios.items())
        try:
            ratios = tuple((str(p), float(r)) for p, r in ratios)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"prune-channels: ratios must be (pattern, ratio) pairs, got {self.ratios!r}") from exc
        object.__setattr__(self, "ratios", ratios)
        object.__setattr__(self, "exact", self.ratio == 0.0 and all(r == 0.0 for _, r in ratios))
        for what, r in (("ratio", self.ratio), *((f"ratios[{p!r}]", r) for p, r in ratios)):
            if not 0.0 <= r < 1.0:
                raise PipelineError(f"prune-channels: {what}={r} must be in [0, 1)")
        if self.round_to < 1 or self.min_channels < 1 or self.batches < 1:
            raise PipelineError("prune-channels: round_to, min_channels and batches must be >= 1")

    # ------------------------------------------------------------------ selection

    def ratio_for(self, layers: list[str]) -> float:
        for pattern, r in self.ratios:
            if any(fnmatch.fnmatchcase(layer, pattern) for layer in layers):
                return r
        return self.ratio

    def _n_keep(self, n: int, ratio: float, block: int, min_block: int) -> int:
        keep = n - int(math.floor(ratio * n + 1e-9))
        step = self.round_to // math.gcd(self.round_to, block)
        keep = min(n, -(-keep // step) * step)
        return min(n, max(keep, 1, -(-self.min_channels // max(min_block, 1))))

    def select(self, dg: DependencyGraph, scores: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Boolean mask of removed classes and one record per group."""
        removed = np.zeros(len(dg.classes), dtype=bool)
        guard = SectionGuard(dg)
        records = []
        for g in dg.groups:
            if not g.layers:
                continue
            ratio = self.ratio_for(g.layers)
            n = len(g.classes)
            n_remove = min(n - self._n_keep(n, ratio, g.block, g.min_block), len(g.prunable))
            order = sorted(g.prunable, key=lambda c: (scores[c], c))
            spared_before = dict(guard.spared)
            chosen = guard.choose(order, max(n_remove, 0), 1.0 - ratio)
            removed[chosen] = True
            record = {"layers": g.layers, "ratio": ratio, "units_before": n,
                      "units_after": n - len(chosen), "unit_size": g.block,
                      "prunable_units": len(g.prunable)}
            if len(chosen) < max(n_remove, 0):  # kept so no split piece or slice falls below 1 - ratio
                record["kept_for_sections"] = max(n_remove, 0) - len(chosen)
                record["sections"] = sorted(node for node, k in guard.spared.items()
                                            if k > spared_before.get(node, 0))
            records.append(record)
        return removed, records

    # ------------------------------------------------------------------ run

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        need_shapes(gm, ctx.example_inputs, self.name)
        before = graph_totals(gm)
        dg = dependency_graph(gm, exclude=self.exclude, norm_stats=self.norm_stats)
        data, argument = (ctx.train_data, "train_data") if ctx.train_data is not None else \
            (ctx.calibration, "calibration")
        scores, notes = class_importance(gm, dg, self.importance, data=data, argument=argument,
                                         batches=self.batches, pass_name=self.name)
        removed, groups = self.select(dg, scores)
        result = PassResult(graph=gm)
        paths = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
        unmatched = unmatched_patterns("exclude", self.exclude, paths + [n.name for n in gm.graph.nodes],
                                       layers=list(dict.fromkeys(paths)),
                                       consequence="they keep no layer from being pruned")
        if unmatched:
            result.warn(unmatched)
        for note in notes:
            result.info(note)
        unpruned = dg.unpruned()
        layers = apply_removal(gm, dg, removed)
        if removed.any():
            check_runs(gm, ctx.example_inputs, self.name)
        after = graph_totals(gm)
        numbers = layer_totals(before, after, layers)
        for layer, reason in unpruned.items():
            result.info(f"not pruned: {reason}", node=layer)
        result.stats = {**totals(before, after),
                        "layers": {path: {**row, **numbers[path]} for path, row in layers.items()},
                        "groups": groups, "unpruned": unpruned, "importance": self.importance}
        result.layers = pruned_layers(result.stats["layers"], "channels", "channels_before", "channels_after")
        return result

