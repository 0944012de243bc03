"""``SmoothQuant``: migrate activation outliers into the weights (Xiao et al. 2023, "SmoothQuant:
Accurate and Efficient Post-Training Quantization for Large Language Models"), exact in float32.

Per-tensor INT8 activations lose the many small channels of a Linear's input to the few with large
magnitudes. For input channel ``j`` of a group of Linears that read the same tensor ``X`` (Q, K and V
after one LayerNorm share one), ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``max|X_j|`` over
the calibration data, ``max|W_j|`` over the group's weight columns). ``X`` is divided by ``s``
where it is made, in the producing LayerNorm's weight and bias or the producing Linear's output
rows (weight and bias), and every Linear of the group gets its weight columns multiplied by
``s``: ``(X / s) (W s)^T == X W^T``. The graph computes the same function; ``quantize-int8`` after
it then sees flatter activations and slightly wider weight columns.

A group qualifies only when every user of ``X`` is such a Linear taking ``X`` as its input; an
activation matmul (``q @ k^T``) or a residual add reading ``X`` would see the scaled value.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.errors import PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult, prefer_before

from .. import _fx_utils as fxu
from .calibrate import observe, require_calibration
from .patterns import module_of
from .ptq import ensure_shapes

__all__ = ["SmoothQuant"]


class _AbsMax:
    """Per-channel (last dim) max |x| over everything observed."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.seen = False

    def observe(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).double()
        self.value = m if self.value is None else torch.maximum(self.value, m)
        self.seen = True


def _linear_input(gm: GraphModule, user: Node, src: Node) -> bool:
    mod = module_of(gm, user)
    return (isinstance(mod, nn.Linear) and mod.weight.is_floating_point() and len(user.args) == 1
            and user.args[0] is src and not user.kwargs)


@dataclass
class _Group:
    producer: Node
    kind: str            # "layernorm" | "linear"
    linears: list[Node]
    channels: int


def _groups(gm: GraphModule) -> tuple[list[_Group], dict[str, str]]:
    groups: list[_Group] = []
    reasons: dict[str, str] = {}
    for node in gm.graph.nodes:
        mod = module_of(gm, node)
        if isinstance(mod, nn.LayerNorm):
            kind = "layernorm"
            if len(mod.normalized_shape) != 1:
                reasons[node.name] = f"LayerNorm over {len(mod.normalized_shape)} dims (needs the last dim only)"
                continue
            channels = int(mod.normalized_shape[0])
        elif isinstance(mod, nn.Linear):
            kind, channels = "linear", mod.out_features
        else:
            continue
        users = list(node.users)
        linears = [u for u in users if _linear_input(gm, u, node)]
        if not linears:
            if kind == "layernorm":
                reasons[node.name] = "no Linear reads its output"
            continue
        if len(linears) != len(users):
            others = ", ".join(sorted(u.name for u in users if u not in linears))
            reasons[node.name] = f"its output also feeds {others}, which would see the scaled value"
            continue
        if kind == "linear" and any(u.op == "output" for u in users):
            continue
        groups.append(_Group(node, kind, linears, channels))
    return groups, reasons


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """SmoothQuant: per-input-channel scales ``max|X|^alpha / max|W|^(1-alpha)`` from calibration
    activations, folded into the preceding LayerNorm (or Linear) and the Linears that read it; exact.

    ``alpha`` (0..1) is how much of the activation range moves into the weights (0.5 in the paper;
    more for models with stronger outliers). ``stats["groups"]`` has, per group (a producer and the
    Linears sharing its output), the largest |activation| and |weight| before and after, and the
    ratio of the largest to the median per-channel activation max (how outlier-heavy it is).
    """

    name: ClassVar[str] = "smooth-quant"
    exact: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("calibration-data",)
    order_preferences: ClassVar[tuple] = (
        prefer_before("quantize-int8", "quantize-dynamic",
                      reason="it reshapes float activations and weights for the quantizer"),
    )

    alpha: float = 0.5
    calibration_batches: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise PipelineError(f"{self.name}: alpha must be in [0, 1]; got {self.alpha}")
        if self.calibration_batches < 0:
            raise PipelineError(f"{self.name}: calibration_batches must be >= 0 (0 = all)")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        require_calibration(ctx, self.name)
        ensure_shapes(gm, ctx)
        result = PassResult(graph=gm)
        groups, reasons = _groups(gm)
        if not groups:
            result.warn(f"no LayerNorm/Linear feeds only Linears, nothing to smooth: "
                        f"{'; '.join(f'{k}: {v}' for k, v in reasons.items()) or 'no LayerNorm or Linear chain'}")
            result.stats = {"groups": [], "not_smoothed": reasons}
            return result
        # every rank (under torchrun) reads the same batches, so all end with the same scales
        observers = observe(gm, [g.producer for g in groups], lambda n: _AbsMax(), ctx.calibration,  # type: ignore[arg-type,return-value]
                            ctx, batches=self.calibration_batches, pass_name=self.name)
        rows = []
        for g in groups:
            amax = observers[g.producer.name].value
            if amax is None:
                reasons[g.producer.name] = "never computed on the calibration data"
                continue
            rows.append(self._smooth(gm, g, amax))
        for row in rows:
            result.info(f"smoothed {row['producer']} -> {', '.join(row['linears'])}: activation max "
                        f"{row['act_max_before']:.3g} -> {row['act_max_after']:.3g}, weight max "
                        f"{row['weight_max_before']:.3g} -> {row['weight_max_after']:.3g}", node=row["producer"])
        result.stats = {"groups": rows, "alpha": self.alpha, "not_smoothed": reasons}
        return result

    def _smooth(self, gm: GraphModule, g: _Group, amax: torch.Tensor) -> dict[str, Any]:
        mods = [module_of(gm, n) for n in g.linears]
        wmax = torch.stack([m.weight.detach().abs().amax(dim=0).double() for m in mods]).amax(dim=0)  # type: ignore[union-attr]
        ok = (amax > 0) & (wmax > 0)
        s = torch.where(ok, amax.clamp(min=1e-12) ** self.alpha / wmax.clamp(min=1e-12) ** (1 - self.alpha),
                        torch.ones_like(amax)).clamp(min=1e-5, max=1e5)
        producer = module_of(gm, g.producer)
        assert producer is not None
        new = copy.deepcopy(producer)
        if g.kind == "layernorm":
            dtype = producer.weight.dtype if producer.weight is not None else torch.float32
            w = producer.weight.detach().double() if producer.weight is not None else torch.ones_like(s)
            b = producer.bias.detach().double() if producer.bias is not None else torch.zeros_like(s)
            new.weight = nn.Parameter((w / s).to(dtype))
            new.bias = nn.Parameter((b / s).to(dtype))
            new.elementwise_affine = True
        else:
            dtype = producer.weight.dtype
            new.weight = nn.Parameter((producer.weight.detach().double() / s.reshape(-1, 1)).to(dtype))
            if producer.bias is not None:
                new.bias = nn.Parameter((producer.bias.detach().double() / s).to(dtype))
        fxu.replace_call_module(gm, g.producer, new)
        for node, mod in zip(g.linears, mods):
            lin = copy.deepcopy(mod)
            lin.weight = nn.Parameter((mod.weight.detach().double() * s.reshape(1, -1)).to(mod.weight.dtype))
            fxu.replace_call_module(gm, node, lin)
        after = amax / s
        wafter = wmax * s
        return {"producer": g.producer.name, "kind": g.kind, "linears": [n.name for n in g.linears],
                "channels": g.channels,
                "act_max_before": float(amax.max()), "act_max_after": float(after.max()),
                "act_outlier_ratio_before": float(amax.max() / amax.median().clamp(min=1e-12)),
                "act_outlier_ratio_after": float(after.max() / after.median().clamp(min=1e-12)),
                "weight_max_before": float(wmax.max()), "weight_max_after": float(wafter.max()),
                "scale_min": float(s.min()), "scale_max": float(s.max())}
