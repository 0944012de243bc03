"""``EqualizeCrossLayer``: cross-layer weight equalization (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction"), exact in float32.

Two layers A -> f -> B, where A is a Conv1d/2d/3d or Linear whose output channel ``i`` reaches B's
input channel ``i`` only through ops ``f`` that commute with a positive per-channel scale
(``f(x / s) = f(x) / s``): ReLU, LeakyReLU, identity, eval dropout, max and average pooling,
``flatten(1)`` into a Linear. Dividing A's output channel ``i`` (weights and bias) by ``s_i`` and
multiplying B's input channel ``i`` by ``s_i`` leaves the function unchanged; with
``s_i = sqrt(r1_i / r2_i)`` (``r`` the largest |weight| of the channel) both channels end with the
same range ``sqrt(r1_i r2_i)``, so per-tensor weight quantization wastes fewer levels on small
channels. Depthwise and grouped convolutions take part as either layer, and a layer in two pairs
(conv -> depthwise -> conv, the MobileNet case) is equalized by iterating over the pairs until the
scales settle.

ReLU6 (and ``Hardtanh(0, b)``, ``clamp(0, b)``) is not positively homogeneous: ``min(y, 6)`` of a
scaled channel clips at a different point. With ``clip=rescale`` (default) the bound is rescaled
with its channel, ``min(relu(y / s), 6 / s) * s == min(relu(y), 6)``, so the op becomes
``torch.minimum(torch.relu(x), bound)`` with a per-channel bound tensor (exact for every input;
lowered to ONNX ``Relu`` + ``Min``). With ``clip=skip`` such pairs are left alone.

High-bias absorption (``absorb_high_bias``): when the pre-activation of A's channel ``i`` is
provably at least ``c_i > 0`` for every input (interval arithmetic from the bounds of A's own
input: a ReLU output is >= 0, a clipped one also <= its bound; Nagel et al. estimate it from
BatchNorm statistics instead, which is not exact), ``c_i`` moves from A's bias into B's bias
(``relu(y) == relu(y - c) + c`` when ``y >= c``). Only where B does not zero-pad (a Linear, a
convolution with padding 0) and the ops between commute with the shift, so it stays exact.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.errors import PipelineError
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import Pass, PassContext, PassResult, prefer_after, prefer_before

from .. import _fx_utils as fxu
from .patterns import module_of

__all__ = ["EqualizeCrossLayer"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LAYERS = (*_CONVS, nn.Linear)
_MAXPOOL_M = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)
_ADAPTIVE_AVG_M = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_AVGPOOL_M = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_DROPOUT_M = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_MAXPOOL_F = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
              F.adaptive_max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d}
_ADAPTIVE_AVG_F = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                   torch.adaptive_avg_pool1d}
_RELU_F = {F.relu, torch.relu}
_LEAKY_F = {F.leaky_relu}


@dataclass
class _Op:
    """A node between A and B: ``kind`` relu | clip | cmin | pool | id | flatten."""

    node: Node
    kind: str
    layout: str                        # "dim1" (N, C, ...) or "last" (..., C*repeat)
    repeat: int = 1                    # features per channel in this op's output
    bound: torch.Tensor | None = None  # clip/cmin: per-feature upper bound (float64), current
    original: float | None = None      # clip: the scalar bound it had
    shift_ok: bool = True              # commutes with a per-channel constant shift


@dataclass
class _Pair:
    a: Node
    b: Node
    ops: list[_Op]
    channels: int
    repeat: int                        # B's input features per channel of A
    scale: torch.Tensor = field(default_factory=lambda: torch.ones(0, dtype=torch.float64))
    absorbed: torch.Tensor | None = None


@dataclass
class _Weights:
    """Working float64 copy of a layer's weight and bias."""

    module: nn.Module
    w: torch.Tensor
    b: torch.Tensor | None
    touched: bool = False


class _Stop(Exception):
    """Why the walk from A did not reach a B."""


def _layer(gm: GraphModule, node: Node) -> nn.Module | None:
    mod = module_of(gm, node)
    if isinstance(mod, _LAYERS) and not isinstance(mod, nn.modules.conv._ConvTransposeNd) \
            and mod.weight.is_floating_point() and getattr(mod, "padding_mode", "zeros") == "zeros":
        return mod
    return None


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    return fxu.call_arg(node, index, name, default)


def _only_input(node: Node, src: Node) -> bool:
    """``src`` is the first argument of ``node`` and appears nowhere else in its arguments."""
    first = node.args[0] if node.args else node.kwargs.get("input")
    if first is not src:
        return False
    rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "input"]
    found: list[Node] = []
    torch.fx.node.map_arg(rest, lambda n: found.append(n) or n)
    return src not in found


def _scalar(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _classify(gm: GraphModule, node: Node, layout: str, rank: int) -> tuple[str, dict[str, Any]]:
    """The chain kind of ``node`` (relu, clip, cmin, pool, id, flatten) or raise ``_Stop``."""
    what = f"{node.op} {node.target if node.op != 'call_module' else type(module_of(gm, node)).__name__}"
    if node.op == "call_module":
        mod = module_of(gm, node)
        if isinstance(mod, (nn.ReLU, nn.LeakyReLU)):
            return "relu", {}
        if isinstance(mod, nn.ReLU6):
            return "clip", {"bound": 6.0}
        if isinstance(mod, nn.Hardtanh) and mod.min_val == 0.0 and mod.max_val > 0:
            return "clip", {"bound": float(mod.max_val)}
        if isinstance(mod, _DROPOUT_M):
            if mod.training and not isinstance(mod, nn.Identity):
                raise _Stop(f"'{node.name}' is dropout in training mode")
            return "id", {}
        if isinstance(mod, (*_MAXPOOL_M, *_ADAPTIVE_AVG_M)) and layout == "dim1":
            return "pool", {}
        if isinstance(mod, _AVGPOOL_M) and layout == "dim1":
            pad = mod.padding if isinstance(mod.padding, (tuple, list)) else (mod.padding,)
            return "pool", {"shift_ok": not (any(pad) and mod.count_include_pad)}
        if isinstance(mod, nn.Flatten):
            return "flatten", {"start": mod.start_dim, "end": mod.end_dim}
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            raise _Stop(f"'{node.name}' is a BatchNorm that is not folded (run fold-batchnorm first)")
        raise _Stop(f"'{node.name}' ({what}) is not positively homogeneous per channel")
    if node.op == "call_function":
        t = node.target
        if t in _RELU_F or t in _LEAKY_F:
            return "relu", {}
        if t is F.relu6:
            return "clip", {"bound": 6.0}
        if t is F.hardtanh:
            lo, hi = _scalar(_arg(node, 1, "min_val", -1.0)), _scalar(_arg(node, 2, "max_val", 1.0))
            if lo == 0.0 and hi is not None and hi > 0:
                return "clip", {"bound": hi}
        if t in (torch.clamp, torch.clip):
            lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
            if _scalar(lo) == 0.0 and hi is None:
                return "relu", {}
            if _scalar(lo) == 0.0 and _scalar(hi) is not None and _scalar(hi) > 0:
                return "clip", {"bound": _scalar(hi)}
        if t is torch.minimum and len(node.args) == 2 and isinstance(node.args[1], Node) \
                and node.args[1].op == "get_attr":
            return "cmin", {"attr": node.args[1]}
        if t is F.dropout and _arg(node, 2, "training", True) is False:
            return "id", {}
        if (t in _MAXPOOL_F or t in _ADAPTIVE_AVG_F) and layout == "dim1":
            return "pool", {}
        if t is torch.flatten:
            return "flatten", {"start": _arg(node, 1, "start_dim", 0), "end": _arg(node, 2, "end_dim", -1)}
    if node.op == "call_method":
        name = str(node.target)
        if name in ("relu", "relu_"):
            return "relu", {}
        if name == "contiguous":
            return "id", {}
        if name == "flatten":
            return "flatten", {"start": _arg(node, 1, "start_dim", 0), "end": _arg(node, 2, "end_dim", -1)}
    raise _Stop(f"'{node.name}' ({what}) is not positively homogeneous per channel")


def _walk(gm: GraphModule, a: Node, mod_a: nn.Module, clip: str) -> _Pair:
    """The pair starting at layer ``a``, or ``_Stop`` with the reason."""
    shape = fxu.meta_shape(a)
    if shape is None:
        raise _Stop("no shape information")
    channels = mod_a.out_features if isinstance(mod_a, nn.Linear) else mod_a.out_channels
    layout = "last" if isinstance(mod_a, nn.Linear) else "dim1"
    rank, repeat = len(shape), 1
    if layout == "dim1" and (rank < 3 or shape[1] != channels):
        raise _Stop(f"output shape {list(shape)} does not have its {channels} channels on dim 1")
    ops: list[_Op] = []
    node = a
    while True:
        users = list(node.users)
        if len(users) == 1 and users[0].op == "output":
            raise _Stop(f"'{node.name}' is a graph output")
        if len(users) != 1:
            names = ", ".join(sorted(u.name for u in users)) or "nothing"
            raise _Stop(f"'{node.name}' feeds {len(users)} nodes ({names}); scaling would change the others"
                        if users else f"'{node.name}' has no user")
        user = users[0]
        mod_b = _layer(gm, user)
        if mod_b is not None and _only_input(user, node):
            if isinstance(mod_b, nn.Linear):
                if layout != "last" or mod_b.in_features != channels * repeat:
                    raise _Stop(f"Linear '{user.name}' does not consume the channel dim")
            elif layout != "dim1" or repeat != 1 or mod_b.in_channels != channels:
                raise _Stop(f"'{user.name}' does not consume the {channels} channels")
            return _Pair(a, user, ops, channels, repeat, torch.ones(channels, dtype=torch.float64))
        kind, info = _classify(gm, user, layout, rank)
        if not _only_input(user, node):
            raise _Stop(f"'{user.name}' uses the output other than as its one data input")
        op = _Op(user, kind, layout, repeat, shift_ok=info.get("shift_ok", True))
        if kind == "flatten":
            start, end = info["start"], info["end"]
            out = fxu.meta_shape(user)
            if layout != "dim1" or start != 1 or end not in (-1, rank - 1) or out is None:
                raise _Stop(f"'{user.name}' flattens other dims than (channels, spatial...) into one")
            repeat = int(math.prod(fxu.meta_shape(node)[2:]))  # type: ignore[index]
            layout = op.layout = "last"
            op.repeat = repeat
        elif kind == "clip":
            if clip == "skip":
                raise _Stop(f"'{user.name}' clips at {info['bound']} (ReLU6-like) and clip=skip")
            op.original = info["bound"]
            op.bound = torch.full((channels * repeat,), info["bound"], dtype=torch.float64)
        elif kind == "cmin":
            if clip == "skip":
                raise _Stop(f"'{user.name}' clips per channel and clip=skip")
            value = fxu.get_attr_value(gm, str(info["attr"].target))
            feats = channels * repeat
            want = (1, feats, *([1] * (rank - 2))) if layout == "dim1" else (feats,)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
                raise _Stop(f"'{user.name}' is a minimum with a bound that is not per channel")
            op.bound = value.detach().double().reshape(-1).clone()
        elif kind == "pool":
            rank = len(fxu.meta_shape(user) or shape)
        ops.append(op)
        node = user


def _is_relu(gm: GraphModule, node: Node) -> bool:
    mod = module_of(gm, node)
    return isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in _RELU_F) or \
        (node.op == "call_method" and node.target in ("relu", "relu_"))


# --------------------------------------------------------------------------- weight algebra

def _out_ranges(w: torch.Tensor) -> torch.Tensor:
    return w.abs().reshape(w.shape[0], -1).amax(dim=1)


def _groups(mod: nn.Module) -> int:
    return int(getattr(mod, "groups", 1))


def _in_ranges(w: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """Largest |weight| per input feature (channel) of a Linear or (grouped) convolution."""
    if w.dim() == 2:
        return w.abs().amax(dim=0)
    g = _groups(mod)
    per = w.abs().reshape(w.shape[0], w.shape[1], -1).amax(dim=2)           # (Cout, Cin/g)
    return per.reshape(g, w.shape[0] // g, w.shape[1]).amax(dim=1).reshape(-1)


def _in_factor(w: torch.Tensor, mod: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``w`` that multiplies input feature ``j`` by ``feat[j]``."""
    if w.dim() == 2:
        return feat.reshape(1, -1).expand_as(w)
    g = _groups(mod)
    per = feat.reshape(g, 1, w.shape[1]).expand(g, w.shape[0] // g, w.shape[1]).reshape(w.shape[0], w.shape[1])
    return per.reshape(*per.shape, *([1] * (w.dim() - 2))).expand_as(w)


def _in_sum(w: torch.Tensor, mod: nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """Per output channel, the sum over weights of ``w * feat[input feature]`` (a constant input)."""
    prod = w * _in_factor(w, mod, feat)
    return prod.reshape(w.shape[0], -1).sum(dim=1)


def _out_view(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (w.dim() - 1)))


def _spread(r: torch.Tensor) -> dict[str, float]:
    """How far apart per-channel ranges are: max/min ratio (live channels) and Nagel's mean
    per-channel precision ``mean(r_i / max r)`` (1 = every channel uses the whole grid)."""
    live = r[r > 0]
    if live.numel() == 0:
        return {"max_over_min": 1.0, "precision": 1.0}
    return {"max_over_min": float(live.max() / live.min()), "precision": float((r / r.max()).mean())}


def _pair_row(row: dict[str, Any]) -> PassLayerRow:
    """A pair's stats row as typed: A's output-channel weight range spread before and after, and
    its per-channel precision (1 = every channel uses the whole grid), lower being worse."""
    old, new = row["a_out_before"], row["a_out_after"]
    return PassLayerRow(f"{row['a']} -> {row['b']}", kind="pair", unit="A out range max/min",
                    before=old["max_over_min"], after=new["max_over_min"],
                    metrics={"a_precision_before": old["precision"], "a_precision_after": new["precision"],
                             "imbalance_after": row["imbalance_after"]},
                    key_metric="a_precision_after", worse="lower")


def _imbalance(r1: torch.Tensor, r2: torch.Tensor) -> float:
    """Largest |log(r1_i / r2_i)| over channels live in both (0 once a pair is equalized)."""
    live = (r1 > 0) & (r2 > 0)
    return float((r1[live] / r2[live]).log().abs().max()) if bool(live.any()) else 0.0


@dataclass(frozen=True)
class EqualizeCrossLayer(Pass):
    """Cross-layer weight equalization of conv/linear pairs through ReLU/ReLU6/identity (depthwise
    included), with exact high-bias absorption; exact in float32. Run after fold-batchnorm and
    before quantize-int8.

    ``clip``: ``rescale`` (ReLU6-like clips get a per-channel bound, exact) or ``skip`` (pairs
    through a clip are left alone). ``iterations``: sweeps over the pairs (chains of pairs share
    layers, so the scales are refined until they change less than ``tolerance``).
    ``stats["pairs"]`` has, per pair, the layers, the ops between, and the per-channel weight range
    spread (max/min ratio and mean precision) of A's output and B's input channels before and after;
    ``stats["not_equalized"]`` says why each other conv/linear starts no pair.
    """

    name: ClassVar[str] = "equalize-cross-layer"
    exact: ClassVar[bool] = True
    order_preferences: ClassVar[tuple] = (
        prefer_after("fold-batchnorm", reason="a BatchNorm between two layers blocks equalization (it is not "
                                              "scaled with them); fold it into the conv first"),
        prefer_before("quantize-int8", "quantize-dynamic",
                      reason="equalization rescales float weights; quantized layers are no longer float"),
    )

    clip: Literal["rescale", "skip"] = "rescale"
    absorb_high_bias: bool = True
    iterations: int = 20
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.iterations < 1 or not self.tolerance > 0:
            raise PipelineError(f"{self.name}: needs iterations >= 1 and tolerance > 0")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        from .ptq import ensure_shapes

        ensure_shapes(gm, ctx)
        result = PassResult(graph=gm)
        pairs: list[_Pair] = []
        reasons: dict[str, str] = {}
        for node in gm.graph.nodes:
            mod = _layer(gm, node)
            if mod is None:
                continue
            try:
                pairs.append(_walk(gm, node, mod, self.clip))
            except _Stop as why:
                reasons[node.name] = str(why)
        if not pairs:
            layers = len(reasons)
            why = "; ".join(f"{k}: {v}" for k, v in reasons.items()) or "the graph has no Conv/Linear module"
            result.warn(f"no conv/linear pair qualifies for equalization ({layers} layers looked at): {why}")
            result.stats = {"pairs": [], "not_equalized": reasons}
            return result
        weights: dict[Node, _Weights] = {}
        for p in pairs:
            for n in (p.a, p.b):
                if n not in weights:
                    mod = module_of(gm, n)
                    assert mod is not None
                    weights[n] = _Weights(mod, mod.weight.detach().double().clone(),
                                          None if mod.bias is None else mod.bias.detach().double().clone())
        before = {id(p): (_out_ranges(weights[p.a].w), self._b_ranges(p, weights)) for p in pairs}
        sweeps = self._equalize(pairs, weights)
        if self.absorb_high_bias:
            self._absorb(gm, pairs, weights)
        self._write(gm, pairs, weights)
        rows = []
        for p in pairs:
            a0, b0 = before[id(p)]
            a1, b1 = _out_ranges(weights[p.a].w), self._b_ranges(p, weights)
            row = {"a": p.a.name, "b": p.b.name, "via": [f"{op.node.name} ({op.kind})" for op in p.ops],
                   "channels": p.channels,
                   "a_out_before": _spread(a0), "a_out_after": _spread(a1),
                   "b_in_before": _spread(b0), "b_in_after": _spread(b1),
                   "imbalance_after": _imbalance(a1, b1),
                   "scale_min": float(p.scale.min()), "scale_max": float(p.scale.max()),
                   "absorbed_channels": int((p.absorbed > 0).sum()) if p.absorbed is not None else 0}
            rows.append(row)
            result.info(f"equalized {p.a.name} -> {p.b.name} ({p.channels} channels): weight range max/min "
                        f"{row['a_out_before']['max_over_min']:.3g} -> {row['a_out_after']['max_over_min']:.3g} "
                        f"(A out), {row['b_in_before']['max_over_min']:.3g} -> "
                        f"{row['b_in_after']['max_over_min']:.3g} (B in)", node=p.a.name)
        result.stats = {"pairs": rows, "sweeps": sweeps, "not_equalized": reasons}
        result.layers = [_pair_row(row) for row in rows]
        return result

    # -- steps ------------------------------------------------------------------------------
    def _b_ranges(self, p: _Pair, weights: dict[Node, _Weights]) -> torch.Tensor:
        r = _in_ranges(weights[p.b].w, weights[p.b].module)
        return r.reshape(p.channels, p.repeat).amax(dim=1)

    def _equalize(self, pairs: list[_Pair], weights: dict[Node, _Weights]) -> int:
        for sweep in range(1, self.iterations + 1):
            worst = 0.0
            for p in pairs:
                wa, wb = weights[p.a], weights[p.b]
                r1, r2 = _out_ranges(wa.w), self._b_ranges(p, weights)
                ok = (r1 > 0) & (r2 > 0) & torch.isfinite(r1) & torch.isfinite(r2)
                s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
                worst = max(worst, float((s - 1).abs().max()))
                wa.w = wa.w / _out_view(s, wa.w)
                if wa.b is not None:
                    wa.b = wa.b / s
                feat = s.repeat_interleave(p.repeat)
                wb.w = wb.w * _in_factor(wb.w, wb.module, feat)
                for op in p.ops:
                    if op.bound is not None:
                        op.bound = op.bound / s.repeat_interleave(op.repeat)
                p.scale = p.scale * s
                wa.touched = wb.touched = True
            if worst < self.tolerance:
                return sweep
        return self.iterations

    def _input_bounds(self, gm: GraphModule, a: Node, by_node: dict[Node, _Op], features: int
                      ) -> torch.Tensor | None:
        """Upper bounds of A's input per input feature when it is provably >= 0 (a ReLU or
        clip output, through pools and identities); None when unknown."""
        node = a.args[0] if a.args else None
        while isinstance(node, Node):
            op = by_node.get(node)
            if op is not None and op.bound is not None:
                return op.bound if op.bound.numel() == features else None
            try:
                kind, info = _classify(gm, node, "dim1", 4)
            except _Stop:
                return None
            if kind == "relu" and _is_relu(gm, node):
                return torch.full((features,), math.inf, dtype=torch.float64)
            if kind == "clip":
                return torch.full((features,), float(info["bound"]), dtype=torch.float64)
            if kind == "cmin":
                value = fxu.get_attr_value(gm, str(info["attr"].target))
                src = node.args[0]
                if isinstance(value, torch.Tensor) and value.numel() == features and isinstance(src, Node) \
                        and _is_relu(gm, src):
                    return value.detach().double().reshape(-1)
                return None
            if kind not in ("pool", "id"):
                return None
            node = node.args[0] if node.args else None
        return None

    def _absorb(self, gm: GraphModule, pairs: list[_Pair], weights: dict[Node, _Weights]) -> None:
        by_node = {op.node: op for p in pairs for op in p.ops}
        for p in pairs:
            wa, wb = weights[p.a], weights[p.b]
            mod_b = wb.module
            pad = getattr(mod_b, "padding", 0)
            padded = pad if isinstance(pad, str) else any(pad) if isinstance(pad, (tuple, list)) else pad
            if padded not in (0, "valid") or not all(op.shift_ok for op in p.ops):
                continue
            fin = wa.w.shape[1] * (_groups(wa.module) if wa.w.dim() > 2 else 1)
            hi = self._input_bounds(gm, p.a, by_node, fin)
            if hi is None:
                continue
            neg = wa.w.clamp(max=0)
            prod = torch.where(neg == 0, torch.zeros_like(neg), neg * _in_factor(neg, wa.module, hi))
            low = prod.reshape(neg.shape[0], -1).sum(dim=1)
            if wa.b is not None:
                low = low + wa.b
            c = torch.nan_to_num(low, nan=0.0, neginf=0.0).clamp(min=0)
            for op in p.ops:
                if op.bound is not None:
                    c = torch.minimum(c, op.bound.reshape(p.channels, -1).amin(dim=1))
            if not bool((c > 0).any()):
                continue
            wa.b = (wa.b if wa.b is not None else torch.zeros_like(c)) - c
            for op in p.ops:
                if op.bound is not None:
                    op.bound = op.bound - c.repeat_interleave(op.repeat)
            shift = _in_sum(wb.w, mod_b, c.repeat_interleave(p.repeat))
            wb.b = (wb.b if wb.b is not None else torch.zeros_like(shift)) + shift
            wa.touched = wb.touched = True
            p.absorbed = c

    def _write(self, gm: GraphModule, pairs: list[_Pair], weights: dict[Node, _Weights]) -> None:
        for node, wt in weights.items():
            if not wt.touched:
                continue
            mod = wt.module
            new = copy.deepcopy(mod)
            dtype = mod.weight.dtype
            new.weight = nn.Parameter(wt.w.to(dtype), requires_grad=mod.weight.requires_grad)
            if wt.b is not None:
                new.bias = nn.Parameter(wt.b.to(dtype), requires_grad=mod.weight.requires_grad)
            fxu.replace_call_module(gm, node, new)
        graph = gm.graph
        stale: list[str] = []
        for p in pairs:
            for op in p.ops:
                if op.bound is None:
                    continue
                if op.kind == "clip" and bool((op.bound == op.original).all()):
                    continue
                shape = fxu.meta_shape(op.node)
                bound = op.bound.to(torch.float32)
                if op.layout == "dim1" and shape is not None:
                    bound = bound.reshape(1, -1, *([1] * (len(shape) - 2)))
                name = fxu.register_tensor(gm, f"{op.node.name}_bound", bound)
                with graph.inserting_before(op.node):
                    attr = graph.get_attr(name)
                if op.kind == "cmin":
                    old = op.node.args[1]
                    op.node.args = (op.node.args[0], attr)
                    if isinstance(old, Node) and not old.users:
                        stale.append(str(old.target))
                        graph.erase_node(old)
                    continue
                src = op.node.args[0] if op.node.args else op.node.kwargs["input"]
                with graph.inserting_before(op.node):
                    relu = graph.call_function(torch.relu, (src,))
                relu.meta = dict(op.node.meta)
                # the clip node itself becomes the minimum: it keeps its name (reports, goldens)
                if op.node.op == "call_module":
                    stale.append(str(op.node.target))
                op.node.op, op.node.target = "call_function", torch.minimum
                op.node.args, op.node.kwargs = (relu, attr), {}
        fxu.delete_submodules_if_unused(gm, [t for t in stale if isinstance(_safe_get(gm, t), nn.Module)])
        fxu.delete_unused_attributes(gm, only=[t for t in stale if not isinstance(_safe_get(gm, t), nn.Module)])


def _safe_get(gm: GraphModule, target: str) -> Any:
    try:
        return fxu.get_attr_value(gm, target)
    except Exception:  # noqa: BLE001 - already gone
        return None

