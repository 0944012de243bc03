"""``QuantizeInt8``: post-training INT8 quantization (or QAT preparation) with calibration.

Calibrates activation ranges with a streaming observer over ``ctx.calibration``, then writes
fake-quant on the tensors the backend scheme wants (see ``placement``) and INT8 per-channel
weights. Exported to ONNX this is QuantizeLinear/DequantizeLinear with INT8 weight initializers.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal

import torch
from torch.fx import GraphModule

from fxcompress.errors import PassError, PipelineError
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import Pass, PassContext, PassResult, copy_graph_module

from ..data import claim_data
from ..distributed import all_reduce_observers, shard, world_size
from .adaround import AdaRoundConfig, RoundingTask, adaround_layers, adaround_metrics, calibration_batches
from .calibrate import observe, require_calibration
from .fake_quant import _channel_view
from .observers import (
    INT8,
    UINT8,
    ObserverName,
    QSpec,
    make_observer,
    per_channel_absmax,
    per_channel_mse_absmax,
)
from .patterns import module_path
from .placement import Plan, Scheme, build_plan, float_rows, scheme_for_target, unmatched_skip
from .rewrite import WeightQuant, apply_plan

#: the ctx analysis key under which ``QuantSensitivity`` leaves its skip list
SENSITIVITY_KEY = "quant-sensitivity"
#: the ctx analysis key under which ``QuantizeInt8`` leaves the float weights of the layers it
#: quantized (node name -> tensor), the float reference ``correct-bias`` needs right after it
FLOAT_WEIGHTS_KEY = "quantize-int8:float-weights"


def ensure_shapes(gm: GraphModule, ctx: PassContext) -> None:
    """Shape-propagate when some node lacks ``meta['tensor_meta']`` (placement reads dtypes)."""
    if any("tensor_meta" not in n.meta for n in gm.graph.nodes if n.op not in ("output", "get_attr")):
        if ctx.example_inputs:
            from fxcompress.verify import propagate_shapes

            propagate_shapes(gm, ctx.example_inputs)


def calibration_share(data: Any, batches: int, seed: int = 0) -> tuple[Iterable[Any], int]:
    """This rank's share of the calibration data and its batch limit (``data`` and ``batches`` in
    one process). Under torchrun each rank observes every ``world_size``-th batch (its
    ``DistributedSampler`` share for a DataLoader) of the first ``batches``, so together the ranks
    see the data once before the observers are all-reduced. Data with fewer batches than ranks
    (or one tensor) is observed whole on every rank."""
    n = world_size()
    if n == 1 or data is None or isinstance(data, (torch.Tensor, dict)):
        return data, batches
    try:
        if len(data) < n:
            return data, batches
    except TypeError:
        pass
    return shard(data, seed=seed), -(-batches // n) if batches else 0


def weight_quant(weight: torch.Tensor, axis: int, qmax: int, per_channel: bool, observer: str) -> WeightQuant:
    """Symmetric weight grid ``[-qmax, qmax]``: per channel on ``axis`` or one scale for the tensor."""
    w = weight.detach().float()
    if per_channel:
        amax = per_channel_mse_absmax(w, axis, qmax) if observer == "mse" else per_channel_absmax(w, axis)
        return WeightQuant((amax / qmax).clamp(min=1e-12), axis, -qmax, qmax)
    amax = per_channel_mse_absmax(w.reshape(1, -1), 0, qmax)[0] if observer == "mse" else w.abs().max()
    return WeightQuant((amax / qmax).clamp(min=1e-12).reshape(()), -1, -qmax, qmax)


@dataclass(frozen=True)
class QuantizeInt8(Pass):
    """INT8 quantization: calibrated activations, per-channel INT8 weights, Q/DQ placed for the backend.

    ``observer`` (default ``mse``: on the digits CNNs of ``bench/quantize.py`` it matched or beat
    minmax, percentile and entropy in every run) picks activation ranges; see ``observers``.

    ``scheme`` ``auto`` follows the compile target (TensorRT targets -> ``tensorrt``, else
    ``onnxruntime``). ``activations`` ``auto`` is symmetric INT8 for TensorRT and asymmetric UINT8
    for ONNX Runtime (so ReLU folds into the quantization). ``reduce_range`` (ONNX Runtime only)
    keeps weights in 7 bits (``[-64, 64]``) so x86 CPUs without VNNI do not saturate their u8*s8
    16-bit accumulations. ``skip`` takes fnmatch patterns of node names, module paths or module
    types (``"fc"``, ``"layer4.*"``, ``"Linear"``). With ``qat`` the fake-quant is learnable and a
    following ``fine-tune`` pass trains it, then freezes it into this PTQ form.

    ``weight_bits`` (2..8) narrows the symmetric weight grid to ``[-(2^(b-1)-1), 2^(b-1)-1]``
    (still stored and run as INT8: fewer levels, not fewer bytes; ``quantize-weight-only`` packs
    4-bit weights). ``rounding`` ``adaround`` learns each weight's rounding layer by layer on the
    calibration batches (``adaround``, ``adaround_iters`` Adam steps per layer) instead of
    rounding to nearest; a layer keeps nearest where AdaRound does not lower its reconstruction
    error on those batches. ``stats["adaround"]`` has the per-layer errors.
    """

    name: ClassVar[str] = "quantize-int8"
    shares_weights: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("calibration-data",)
    provides: ClassVar[tuple[str, ...]] = ("int8",)
    #: an instance with ``qat`` trains (its learnable fake-quant); set in ``__post_init__``
    trains: ClassVar[bool] = False

    observer: ObserverName = "mse"
    percentile: float = 99.99
    per_channel: bool = True
    scheme: Scheme = "auto"
    activations: Literal["auto", "int8", "uint8"] = "auto"
    reduce_range: bool = True
    weight_observer: Literal["minmax", "mse"] = "minmax"
    calibration_batches: int = 32
    skip: tuple[str, ...] = ()
    keep_first_last_fp: bool = False
    qat: bool = False
    learn_scales: bool = True
    weight_bits: int = 8
    rounding: Literal["nearest", "adaround"] = "nearest"
    adaround_iters: int = 1000

    def __post_init__(self) -> None:
        if not 2 <= self.weight_bits <= 8:
            raise PipelineError(f"{self.name}: weight_bits must be 2..8; got {self.weight_bits}")
        if self.rounding == "adaround" and (self.qat or self.adaround_iters < 1):
            raise PipelineError(f"{self.name}: rounding='adaround' needs adaround_iters >= 1 and qat=false (QAT "
                                f"learns its weights in training instead); got adaround_iters="
                                f"{self.adaround_iters}, qat={self.qat}")
        if self.calibration_batches < 0:
            raise PipelineError(f"{self.name}: calibration_batches must be >= 0 (0 = all); got "
                                f"{self.calibration_batches}")
        object.__setattr__(self, "trains", bool(self.qat))

    def resolve(self, target: str) -> tuple[str, QSpec, int]:
        """(scheme, activation grid, weight qmax) for a compile target."""
        scheme = scheme_for_target(self.scheme, target)
        acts = self.activations if self.activations != "auto" else ("int8" if scheme == "tensorrt" else "uint8")
        if scheme == "tensorrt" and acts == "uint8":
            raise PipelineError(f"{self.name}: TensorRT takes symmetric INT8 only; activations='uint8' needs "
                                f"scheme='onnxruntime'")
        wmax = 2 ** (self.weight_bits - 1) - 1
        if scheme == "onnxruntime" and self.reduce_range and self.weight_bits == 8:
            wmax = 64
        return scheme, (INT8 if acts == "int8" else UINT8), wmax

    def plan(self, gm: GraphModule, ctx: PassContext, scheme: str) -> Plan:
        reasons: dict[str, str] = {}
        found = ctx.facts.get(SENSITIVITY_KEY)
        if found:
            for name in found.get("skip", ()):
                reasons[name] = (f"sensitivity: among the {len(found['skip'])} layers whose quantization "
                                 f"hurts the output most (quant-sensitivity)")
        return build_plan(gm, scheme, skip=tuple(self.skip), skip_reasons=reasons,
                          keep_first_last_fp=self.keep_first_last_fp)

    def calibrate(self, gm: GraphModule, ctx: PassContext, plan: Plan, spec: QSpec) -> dict[str, tuple[float, int]]:
        """(scale, zero point) of every observed slot."""
        observed = [s.node for s in plan.slots.values() if s.tie is None]
        data, batches = calibration_share(ctx.calibration, self.calibration_batches, ctx.seed)
        observers = observe(gm, observed, lambda n: make_observer(self.observer, percentile=self.percentile,
                                                                  spec=spec),
                            data, ctx, batches=batches, pass_name=self.name)
        all_reduce_observers(observers)  # under torchrun: every rank gets the scales of all ranks' data
        out: dict[str, tuple[float, int]] = {}
        for name, obs in observers.items():
            if not obs.seen:
                raise PassError(f"{self.name}: tensor '{name}' was never computed on the calibration data",
                                pass_name=self.name, node=name)
            out[name] = obs.qparams(spec)
        return out

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        require_calibration(ctx, self.name)
        scheme, spec, wmax = self.resolve(ctx.target)
        ensure_shapes(gm, ctx)
        plan = self.plan(gm, ctx, scheme)
        unmatched = unmatched_skip(self.skip, gm)
        given = ctx.calibration
        if self.rounding == "adaround" and isinstance(given, Iterator):  # read twice: calibrate, then AdaRound
            claim_data(given, argument="calibration", pass_name=self.name)
            ctx.calibration = list(itertools.islice(given, self.calibration_batches) if self.calibration_batches
                                   else given)
        try:
            act = self.calibrate(gm, ctx, plan, spec)
            weights = {layer.node.name: weight_quant(layer.weight, layer.axis, wmax, self.per_channel,
                                                     self.weight_observer)
                       for layer in plan.layers if layer.weight.numel()}
            errors: dict[str, dict[str, float]] = {}
            if self.rounding == "adaround":
                weights, errors = self.adaround(gm, ctx, scheme, spec, act, weights)
        finally:
            ctx.calibration = given
        int8_layers = [layer.node.name for layer in plan.layers]
        float_weights = [(layer, layer.weight.detach()) for layer in plan.layers if layer.weight.numel()]
        summary = apply_plan(gm, plan, act, weights, spec, qat=self.qat, learn=self.learn_scales)
        by_name = {layer.node.name: w for layer, w in float_weights}  # names after the rewrite
        ctx.invalidate(keep=[k for k in ctx.cached_analyses if k != FLOAT_WEIGHTS_KEY])
        if not self.qat:
            ctx.analysis(FLOAT_WEIGHTS_KEY, lambda: by_name)
        result = PassResult(graph=gm, preserved=(FLOAT_WEIGHTS_KEY,))
        if unmatched:
            result.warn(unmatched)
        modules = {n.name: module_path(n) for n in gm.graph.nodes if n.name in plan.float_layers}
        for node, reason in plan.float_layers.items():
            where = f" (module '{modules[node]}')" if modules.get(node) else ""
            result.info(f"stays in floating point{where}: {reason}", node=node)
        if not int8_layers:
            result.warn("no Conv/Linear/matmul was quantized; see stats['float_layers']")
        result.stats = self._stats(scheme, spec, wmax, plan, act, int8_layers, summary)
        result.stats["float_layer_modules"] = modules
        precision = "int8" if self.weight_bits == 8 else f"int{self.weight_bits} weights"
        result.layers = [PassLayerRow(layer.node.name, kind=layer.info.kind, precision=precision,
                                  **adaround_metrics(errors, layer.node.name)) for layer in plan.layers]
        result.layers += float_rows(plan.float_layers)
        if self.rounding == "adaround":
            result.stats["adaround"] = errors
            kept = [name for name, e in errors.items() if e["kept_nearest"]]
            if kept:
                result.info(f"AdaRound did not lower the reconstruction error of {len(kept)} layer(s) "
                            f"({', '.join(kept)}): they keep round-to-nearest")
        return result

    def adaround(self, gm: GraphModule, ctx: PassContext, scheme: str, spec: QSpec, act: dict[str, tuple[float, int]],
                 weights: dict[str, WeightQuant]) -> tuple[dict[str, WeightQuant], dict[str, dict[str, float]]]:
        """``weights`` with AdaRound's integers, learned on a copy of ``gm`` whose activations are
        quantized as ``act`` says; and the per-layer reconstruction errors."""
        work = copy_graph_module(gm)
        work_plan = self.plan(work, ctx, scheme)
        apply_plan(work, work_plan, act, {}, spec)
        for p in work.parameters():
            p.requires_grad_(False)
        tasks = []
        for layer in work_plan.layers:
            wq = weights.get(layer.node.name)
            if wq is None:
                continue
            channel_dim = 1 if layer.info.kind in ("conv", "conv_transpose") else -1
            tasks.append(RoundingTask(layer.node.name, layer.weight, _channel_view(wq.scale, layer.weight.dim(),
                                                                                   wq.axis), wq.qmin, wq.qmax,
                                      channel_dim))
        batches = calibration_batches(gm, ctx, self.calibration_batches, self.name)
        rounded, errors = adaround_layers(gm, work, tasks, batches, AdaRoundConfig(iters=self.adaround_iters), ctx,
                                          self.name)
        return {name: dataclasses.replace(wq, values=rounded[name]) if name in rounded else wq
                for name, wq in weights.items()}, errors

    def _stats(self, scheme: str, spec: QSpec, wmax: int, plan: Plan, act: dict[str, tuple[float, int]],
               int8_layers: list[str], summary: dict[str, Any]) -> dict[str, Any]:
        return {
            "scheme": scheme,
            "weight_bits": self.weight_bits,
            "rounding": self.rounding,
            "observer": self.observer,
            "activations": spec.dtype,
            "weight_range": [-wmax, wmax],
            "per_channel": self.per_channel,
            "qat": self.qat,
            "int8_layers": int8_layers,
            "float_layers": dict(plan.float_layers),
            "activation_quantizers": summary["activation_quantizers"],
            "activation_qparams": {k: [v[0], v[1]] for k, v in sorted(act.items())},
        }
