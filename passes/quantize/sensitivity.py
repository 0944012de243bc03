"""``QuantSensitivity``: which layers hurt most when quantized to INT8 (an analysis pass).

Calibrates once, then quantizes one Conv/Linear/matmul at a time (its input, weight and the
tensors its scheme quantizes with it) and measures the output error against the float graph on
calibration batches. The graph is returned unchanged; ``stats["layers"]`` is the ranked table and
``stats["skip"]`` the ``k`` worst layers, which a later ``quantize-int8`` keeps in floating point
(mixed precision) with the reason "sensitivity".
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule

from fxcompress.errors import PipelineError
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import Pass, PassContext, PassResult, copy_graph_module

from ..data import claim_data, explain_failure, input_specs, iter_inputs, model_inputs
from .calibrate import require_calibration
from .observers import ObserverName
from .patterns import module_path
from .placement import Scheme, build_plan
from .ptq import SENSITIVITY_KEY, QuantizeInt8, ensure_shapes, weight_quant
from .rewrite import apply_plan


def _flat(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().float().flatten()
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))])


@dataclass(frozen=True)
class QuantSensitivity(Pass):
    """Rank layers by the output error their INT8 quantization alone causes; ``k`` worst -> ``skip``."""

    name: ClassVar[str] = "quant-sensitivity"
    shares_weights: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("calibration-data",)

    k: int = 0
    observer: ObserverName = "mse"
    percentile: float = 99.99
    per_channel: bool = True
    scheme: Scheme = "auto"
    reduce_range: bool = True
    calibration_batches: int = 8
    eval_batches: int = 4
    weight_bits: int = 8

    def __post_init__(self) -> None:
        if self.k < 0 or self.eval_batches < 1 or not 2 <= self.weight_bits <= 8:
            raise PipelineError(f"{self.name}: needs k >= 0, eval_batches >= 1 and weight_bits 2..8; got k={self.k}, "
                                f"eval_batches={self.eval_batches}, weight_bits={self.weight_bits}")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        config = QuantizeInt8(observer=self.observer, percentile=self.percentile, per_channel=self.per_channel,
                              scheme=self.scheme, reduce_range=self.reduce_range,
                              calibration_batches=self.calibration_batches, weight_bits=self.weight_bits)
        require_calibration(ctx, self.name)
        scheme, spec, wmax = config.resolve(ctx.target)
        ensure_shapes(gm, ctx)
        full = build_plan(gm, scheme)
        given = ctx.calibration
        if isinstance(given, Iterator):  # a generator: this pass reads it twice (calibrate, evaluate)
            claim_data(given, argument="calibration", pass_name=self.name)
            ctx.calibration = list(itertools.islice(given, max(self.calibration_batches, self.eval_batches))
                                   if self.calibration_batches else given)
        try:
            act = config.calibrate(gm, ctx, full, spec)
            batches = list(iter_inputs(ctx.calibration, gm, argument="calibration", pass_name=self.name,
                                       limit=self.eval_batches))
        finally:
            ctx.calibration = given
        specs = input_specs(gm)
        reference = []
        with torch.no_grad():
            for i, b in enumerate(batches):
                with explain_failure(b, specs, argument="calibration", pass_name=self.name, index=i):
                    reference.append(_flat(gm(*model_inputs(b, gm))))
        names = [layer.node.name for layer in full.layers]
        rows: list[dict[str, Any]] = []
        with ctx.progress(f"{self.name}: layers", total=len(names)) as bar:
            for layer in full.layers:
                rows.append(self._measure(gm, layer.node.name, names, scheme, spec, wmax, act, batches, reference,
                                          module_path(layer.node), layer.info.kind))
                bar.advance(1)
        rows.sort(key=lambda r: -r["rel_mse"])
        for rank, row in enumerate(rows, 1):
            row["rank"] = rank
        skip = [r["node"] for r in rows[: self.k]]
        found = {"skip": skip, "layers": rows}
        ctx.facts[SENSITIVITY_KEY] = found
        result = PassResult(graph=gm, stats={"layers": rows, "skip": skip, "scheme": scheme},
                            preserved=tuple(ctx.cached_analyses),
                            layers=[_ranked(r, r["node"] in skip) for r in rows])
        if rows:
            worst = rows[0]
            result.info(f"most sensitive layer: {worst['node']} (relative MSE {worst['rel_mse']:.3g})",
                        node=worst["node"])
        return result

    def _measure(self, gm: GraphModule, name: str, all_layers: list[str], scheme: str, spec: Any, wmax: int,
                 act: dict[str, tuple[float, int]], batches: list[tuple[Any, ...]], reference: list[torch.Tensor],
                 module: str, kind: str) -> dict[str, Any]:
        trial = copy_graph_module(gm)
        others = tuple(n for n in all_layers if n != name)
        plan = build_plan(trial, scheme, skip=others)
        weights = {layer.node.name: weight_quant(layer.weight, layer.axis, wmax, self.per_channel, "minmax")
                   for layer in plan.layers if layer.weight.numel()}
        missing = [s.node.name for s in plan.slots.values() if s.tie is None and s.node.name not in act]
        local = dict(act)
        if missing:  # a tensor only this single-layer placement quantizes: calibrate it too
            local.update(QuantizeInt8(observer=self.observer, percentile=self.percentile,
                                      calibration_batches=self.calibration_batches).calibrate(
                trial, _Ctx(batches), plan, spec))
        apply_plan(trial, plan, local, weights, spec)
        trial.recompile()  # this pass runs the quantized trial itself, right below
        mse, cos = 0.0, 0.0
        with torch.no_grad():
            for b, ref in zip(batches, reference):
                out = _flat(trial(*model_inputs(b, trial)))
                mse += float(((out - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=1e-30))
                cos += float(torch.nn.functional.cosine_similarity(out, ref, dim=0))
        n = len(batches)
        return {"node": name, "module": module, "kind": kind, "rel_mse": mse / n, "cosine": cos / n}


def _ranked(row: dict[str, Any], skipped: bool) -> PassLayerRow:
    """A ranking row as typed: its error and the precision it asks ``quantize-int8`` for."""
    return PassLayerRow(row["node"], kind=row["kind"], precision="float" if skipped else "int8",
                    metrics={"rel_mse": row["rel_mse"], "cosine": row["cosine"]}, key_metric="rel_mse",
                    worse="higher", note="among the k most sensitive" if skipped else "")


class _Ctx(PassContext):
    """A context whose calibration data is the already-split evaluation batches."""

    def __init__(self, batches: list[tuple[Any, ...]]) -> None:
        super().__init__(batches[0], calibration=[tuple(b) for b in batches])
