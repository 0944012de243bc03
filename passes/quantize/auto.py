"""``QuantizeAuto``: as much INT8 as fits an accuracy budget.

Quantizes every layer (static INT8, as ``quantize-int8``), measures the result on held-out data,
and when it loses more than ``max_drop`` returns layers to floating point: ranked by
``quant-sensitivity`` (each layer's output error when quantized alone), the smallest ``k`` most
sensitive layers that bring the result within budget are found by bisection, then each of those
``k`` is tried back in INT8 (least sensitive first) and stays there when the budget still holds.

``metric`` ``accuracy``: top-1 accuracy on ``eval_data`` (its batches carry labels), the drop in
percentage points. ``cosine``: the quantized output's cosine similarity to the float graph's, per
sample, averaged; the drop is ``100 * (1 - cosine)``. ``auto`` picks accuracy when the eval batches
carry labels. Without ``eval_data`` the calibration data is used (then the figure is not
held-out, and the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch.fx import GraphModule

from fxcompress.errors import PassError, PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult, copy_graph_module, not_in_pipeline_string

from ..data import iter_batches
from .calibrate import require_calibration
from .observers import ObserverName
from .placement import Scheme
from .ptq import QuantizeInt8
from .sensitivity import QuantSensitivity


@dataclass
class _Eval:
    """Held-out batches, their labels (None: no labels), and the float graph's outputs."""

    inputs: list[tuple[Any, ...]]
    labels: list[torch.Tensor] | None
    reference: list[torch.Tensor]


def _logits(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else _logits(out[0] if isinstance(out, (tuple, list)) else
                                                             next(iter(out.values())))


@dataclass(frozen=True)
class QuantizeAuto(Pass):
    """INT8 everywhere except the fewest layers (sensitivity order, bisection, then a re-check of
    each) that keep the measured drop within ``max_drop``."""

    name: ClassVar[str] = "quantize-auto"
    requires: ClassVar[tuple[str, ...]] = ("calibration-data",)
    provides: ClassVar[tuple[str, ...]] = ("int8",)

    max_drop: float = 0.5
    metric: Literal["auto", "accuracy", "cosine"] = "auto"
    weight_bits: int = 8
    per_channel: bool = True
    observer: ObserverName = "mse"
    scheme: Scheme = "auto"
    calibration_batches: int = 8
    eval_batches: int = 0
    eval_data: Any = not_in_pipeline_string()

    def __post_init__(self) -> None:
        if self.max_drop < 0 or self.eval_batches < 0:
            raise PipelineError(f"{self.name}: needs max_drop >= 0 and eval_batches >= 0 (0 = all); got "
                                f"max_drop={self.max_drop}, eval_batches={self.eval_batches}")
        self.quantizer(())  # the quantization options are checked now, not after calibration

    def quantizer(self, skip: tuple[str, ...]) -> QuantizeInt8:
        return QuantizeInt8(observer=self.observer, per_channel=self.per_channel, scheme=self.scheme,
                            weight_bits=self.weight_bits, calibration_batches=self.calibration_batches, skip=skip)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        require_calibration(ctx, self.name)
        held_out = self.eval_data is not None
        ev = self._eval_set(gm, self.eval_data if held_out else ctx.calibration)
        metric = self.metric if self.metric != "auto" else ("accuracy" if ev.labels is not None else "cosine")
        if metric == "accuracy" and ev.labels is None:
            raise PassError(f"{self.name}: metric='accuracy' needs labels in eval_data batches ((x, y) with y the "
                            f"class indices); use metric='cosine' for unlabeled data", pass_name=self.name)
        base = self._score(gm, ev, metric)
        evaluations: dict[tuple[str, ...], float] = {}

        def drop(skip: tuple[str, ...]) -> float:
            if skip not in evaluations:
                trial = self.quantizer(skip).run(copy_graph_module(gm), ctx).graph
                trial.recompile()  # a nested pass's graph this pass scores itself; the manager never sees it
                evaluations[skip] = base - self._score(trial, ev, metric)
            return evaluations[skip]

        ranked = QuantSensitivity(observer=self.observer, per_channel=self.per_channel, scheme=self.scheme,
                                  weight_bits=self.weight_bits, calibration_batches=self.calibration_batches
                                  ).run(copy_graph_module(gm), ctx).stats["layers"] if drop(()) > self.max_drop else []
        order = [r["node"] for r in ranked]
        lo, hi = 0, len(order)  # the k most sensitive in float: hi always fits (nothing quantized)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if drop(tuple(order[:mid])) <= self.max_drop else (mid, hi)
        floats = list(order[:hi])
        for name in reversed(order[:hi]):  # least sensitive first: back to INT8 where the budget holds
            rest = tuple(n for n in floats if n != name)
            if drop(rest) <= self.max_drop:
                floats.remove(name)
        result = self.quantizer(tuple(floats)).run(gm, ctx)
        final = drop(tuple(floats))
        rows = [{"node": r["node"], "module": r["module"], "kind": r["kind"], "sensitivity_rank": r["rank"],
                 "rel_mse": r["rel_mse"], "precision": "float" if r["node"] in floats else "int8"} for r in ranked]
        if not ranked:  # all INT8 fits: no ranking was needed
            rows = [{"node": n, "precision": "int8"} for n in result.stats["int8_layers"]]
        chosen = {row.layer: row for row in result.layers}  # most sensitive first, then the unranked
        result.layers = [replace(chosen.pop(r["node"]), metrics={"rel_mse": r["rel_mse"]},
                                 key_metric="rel_mse", worse="higher") for r in ranked if r["node"] in chosen]
        result.layers += chosen.values()
        result.stats.update({
            "metric": metric, "held_out": held_out, "max_drop": self.max_drop, "float_score": base,
            "score": base - final, "drop": final, "all_int8_drop": drop(()), "float_count": len(floats),
            "bisection_k": hi, "precision": rows, "evaluations": len(evaluations),
        })
        unit = "points of accuracy" if metric == "accuracy" else "x 100 (1 - cosine)"
        result.info(f"{len(floats)} of {len(rows)} layers kept in floating point ({', '.join(floats) or 'none'}); "
                    f"measured drop {final:.3g} {unit} (all INT8: {drop(()):.3g}; budget {self.max_drop})")
        if not held_out:
            result.warn(f"{self.name}: no eval_data given; the drop was measured on the calibration data, "
                        f"not held-out data (pass QuantizeAuto(eval_data=loader))")
        if final > self.max_drop:
            result.warn(f"{self.name}: the budget is not met even with every layer in floating point: "
                        f"the remaining drop ({final:.3g}) comes from ops other than Conv/Linear/matmul")
        return result

    def _eval_set(self, gm: GraphModule, data: Any) -> _Eval:
        inputs: list[tuple[Any, ...]] = []
        labels: list[torch.Tensor] | None = []
        for x, y in iter_batches(data, gm, argument="eval_data", pass_name=self.name, limit=self.eval_batches):
            inputs.append(x)
            if labels is not None and isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dim() == 1:
                labels.append(y)
            else:
                labels = None
        with torch.no_grad():
            reference = [_logits(gm(*x)).detach().float() for x in inputs]
        return _Eval(inputs, labels, reference)

    @staticmethod
    def _score(gm: GraphModule, ev: _Eval, metric: str) -> float:
        """Accuracy in percent, or 100 x the mean per-sample cosine to the float outputs."""
        hits = total = 0.0
        with torch.no_grad():
            for i, x in enumerate(ev.inputs):
                out = _logits(gm(*x)).detach().float()
                if metric == "accuracy":
                    assert ev.labels is not None
                    hits += float((out.argmax(dim=-1) == ev.labels[i]).sum())
                    total += ev.labels[i].numel()
                else:
                    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ev.reference[i].flatten(1), dim=1)
                    hits += float(cos.sum())
                    total += cos.numel()
        return 100.0 * hits / total


__all__ = ["QuantizeAuto"]
