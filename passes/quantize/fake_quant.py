"""The FX form of quantization and how it lowers to ONNX.

Activations: ``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)`` with
python-float scales; the TorchScript ONNX exporter turns it into QuantizeLinear/DequantizeLinear
(INT8 zero point for ``[-128, 127]``, UINT8 for ``[0, 255]``).

Weights are stored quantized: an INT8 buffer and a float scale buffer feed
``torch.ops.fxcompress_quant.dequantize(w_q, scale, axis)``, which lowers to one
DequantizeLinear on an INT8 initializer (per-channel ``axis``, or per-tensor when ``axis`` is -1
and the scale is a scalar), so the ONNX file holds 1 byte per weight.

``dynamic_linear`` is dynamic INT8 for a Linear/matmul weight: lowers to DynamicQuantizeLinear
+ MatMulInteger + rescale, which ONNX Runtime fuses into its dynamic-quantized matmul kernel.

QAT uses the modules ``LearnedFakeQuant`` (per-tensor activations) and ``LearnedWeightFakeQuant``
(per-channel weights): straight-through rounding, LSQ-style learnable scales (or frozen). Outside
training they compute what ``qat.freeze_qat`` would write, and exported to ONNX they lower to
QuantizeLinear/DequantizeLinear with the current scales as constants (weights stay FP32 behind a
per-channel QuantizeLinear, which ONNX Runtime or ``fold-weight-quantize`` folds to INT8), so a QAT
graph that reaches export unfrozen still runs INT8 kernels.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

_NS = "fxcompress_quant"
_lib = torch.library.Library(_NS, "DEF")
_lib.define("dequantize(Tensor w_q, Tensor scale, int axis) -> Tensor")
_lib.define("dynamic_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int act_qmax) -> Tensor")
_lib.define("fake_quantize_weight(Tensor w, Tensor scale, int axis, int qmin, int qmax, bool clip) -> Tensor")


def _channel_view(scale: torch.Tensor, dim: int, axis: int) -> torch.Tensor:
    if axis < 0 or scale.dim() == 0:
        return scale
    shape = [1] * dim
    shape[axis] = -1
    return scale.view(shape)


@torch.library.impl(_lib, "dequantize", "CompositeExplicitAutograd")
def _dequantize(w_q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return w_q.to(scale.dtype) * _channel_view(scale, w_q.dim(), axis)


@torch.library.register_fake(f"{_NS}::dequantize")
def _dequantize_fake(w_q: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.empty(w_q.shape, dtype=scale.dtype, device=w_q.device)


def dynamic_act_qparams(x: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and UINT8 zero point of ONNX DynamicQuantizeLinear for ``x`` (range widened to 0)."""
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    return scale, zp


@torch.library.impl(_lib, "dynamic_linear", "CompositeExplicitAutograd")
def _dynamic_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    act_qmax: int) -> torch.Tensor:
    scale, zp = dynamic_act_qparams(x, act_qmax)
    xq = torch.clamp(torch.round(x / scale) + zp, 0, act_qmax)
    acc = torch.matmul(xq - zp, w_q.to(x.dtype))
    y = acc * (scale * w_scale)
    return y + bias if bias is not None else y


@torch.library.register_fake(f"{_NS}::dynamic_linear")
def _dynamic_linear_fake(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                         act_qmax: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w_q.shape[-1]))


@torch.library.impl(_lib, "fake_quantize_weight", "CompositeExplicitAutograd")
def _fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, axis: int, qmin: int, qmax: int,
                          clip: bool) -> torch.Tensor:
    return _dequantize(quantize_weight(w, scale, axis, qmin, qmax), scale.to(w.dtype), axis)


@torch.library.register_fake(f"{_NS}::fake_quantize_weight")
def _fake_quantize_weight_fake(w: torch.Tensor, scale: torch.Tensor, axis: int, qmin: int, qmax: int,
                               clip: bool) -> torch.Tensor:
    return torch.empty_like(w)


dequantize = torch.ops.fxcompress_quant.dequantize.default
dynamic_linear = torch.ops.fxcompress_quant.dynamic_linear.default
fake_quantize_weight = torch.ops.fxcompress_quant.fake_quantize_weight.default


def _register_onnx_symbolics() -> None:
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import _get_const, _is_none

    def dequantize_symbolic(g, w_q, scale, axis):  # type: ignore[no-untyped-def]
        ax = _get_const(axis, "i", "axis")
        if ax < 0:
            zp = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
            return g.op("DequantizeLinear", w_q, scale, zp)
        sizes = scale.type().sizes()
        zp = g.op("Constant", value_t=torch.zeros(int(sizes[0]), dtype=torch.int8))
        return g.op("DequantizeLinear", w_q, scale, zp, axis_i=ax)

    def dynamic_linear_symbolic(g, x, w_q, w_scale, bias, act_qmax):  # type: ignore[no-untyped-def]
        xq, x_scale, x_zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        sizes = w_scale.type().sizes()
        w_zp = g.op("Constant", value_t=torch.zeros(int(sizes[0]) if sizes else 1, dtype=torch.int8))
        acc = g.op("MatMulInteger", xq, w_q, x_zp, w_zp)
        accf = g.op("Cast", acc, to_i=1)
        y = g.op("Mul", accf, g.op("Mul", x_scale, w_scale))
        if not _is_none(bias):
            y = g.op("Add", y, bias)
        return y

    def fake_quantize_weight_symbolic(g, w, scale, axis, qmin, qmax, clip):  # type: ignore[no-untyped-def]
        ax = _get_const(axis, "i", "axis")
        sizes = scale.type().sizes()
        per_axis = ax >= 0 and bool(sizes)
        zp = g.op("Constant", value_t=torch.zeros(int(sizes[0]) if per_axis else (), dtype=torch.int8))
        attrs = {"axis_i": ax} if per_axis else {}
        q = g.op("QuantizeLinear", w, scale, zp, **attrs)
        if _get_const(clip, "b", "clip"):  # QuantizeLinear saturates to [-128, 127] only
            lo, hi = _get_const(qmin, "i", "qmin"), _get_const(qmax, "i", "qmax")
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(lo, dtype=torch.int8)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=torch.int8)))
        return g.op("DequantizeLinear", q, scale, zp, **attrs)

    for opset in range(13, 22):
        register_custom_op_symbolic(f"{_NS}::fake_quantize_weight", fake_quantize_weight_symbolic, opset)
        register_custom_op_symbolic(f"{_NS}::dequantize", dequantize_symbolic, opset)
        register_custom_op_symbolic(f"{_NS}::dynamic_linear", dynamic_linear_symbolic, opset)


_register_onnx_symbolics()


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """``round(w / scale)`` clamped to ``[qmin, qmax]``, as INT8 (``scale`` per channel on ``axis``)."""
    s = _channel_view(scale.to(w.dtype), w.dim(), axis)
    return torch.clamp(torch.round(w.detach() / s), qmin, qmax).to(torch.int8)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x - x * factor).detach() + x * factor


def _lsq(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int, learn: bool) -> torch.Tensor:
    """Fake quantization with a straight-through estimator for rounding; the scale gets the LSQ
    gradient (scaled by ``1 / sqrt(numel * qmax)``) when ``learn``."""
    if learn:
        per = max(1, x.numel() // max(1, scale.numel()))
        scale = _grad_scale(scale, 1.0 / math.sqrt(per * max(1, qmax)))
    else:
        scale = scale.detach()
    scale = scale.abs().clamp(min=1e-12)
    q = torch.clamp(_round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


class LearnedFakeQuant(nn.Module):
    """Per-tensor activation fake quantization for QAT (scale learnable unless ``learn`` is False)."""

    _writes_inputs = False

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, learn: bool = True) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn)
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax, self.learn = qmin, qmax, learn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not torch.onnx.is_in_onnx_export():
            return _lsq(x, self.scale, self.zero_point, self.qmin, self.qmax, self.learn)
        scale = self.scale.data.abs().clamp(min=1e-12).float()  # .data: a constant in the ONNX trace
        return torch.fake_quantize_per_tensor_affine(x, scale, self.zero_point.data.to(torch.int32), self.qmin,
                                                     self.qmax)

    def frozen(self) -> tuple[float, int]:
        return float(self.scale.detach().abs().clamp(min=1e-12).to(torch.float32)), int(self.zero_point)

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}, learn={self.learn}"


class LearnedWeightFakeQuant(nn.Module):
    """Per-channel symmetric weight fake quantization for QAT; ``forward(w)`` returns ``w`` fake-quantized."""

    _writes_inputs = False

    def __init__(self, scale: torch.Tensor, axis: int, qmin: int, qmax: int, learn: bool = True) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone().float(), requires_grad=learn)
        self.axis, self.qmin, self.qmax, self.learn = axis, qmin, qmax, learn

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._export(w)
        s = _channel_view(self.scale, w.dim(), self.axis)
        return _lsq(w, s, torch.zeros((), dtype=w.dtype), self.qmin, self.qmax, self.learn and self.training)

    def frozen(self) -> torch.Tensor:
        return self.scale.detach().abs().clamp(min=1e-12).float().clone()

    def _export(self, w: torch.Tensor) -> torch.Tensor:
        """QuantizeLinear -> DequantizeLinear on the FP32 weight with the current scales as constants
        (``.data`` keeps them out of the trace); a Clip on the integers only where QuantizeLinear's
        own saturation at [-128, 127] would differ from ``[qmin, qmax]``. ONNX Runtime and the
        ``fold-weight-quantize`` ONNX pass fold it into an INT8 initializer."""
        scale = self.scale.data.abs().clamp(min=1e-12).float()
        if self.axis < 0 or scale.dim() == 0:
            scale = scale.reshape(())
        q = torch.round(w.data.float() / _channel_view(scale, w.dim(), self.axis))
        with warnings.catch_warnings():  # the Clip is decided on today's weights, by design
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            clip = bool((self.qmin > -128 and (q < self.qmin).any()) or (self.qmax < 127 and (q > self.qmax).any()))
        return fake_quantize_weight(w, scale, self.axis if scale.dim() else -1, self.qmin, self.qmax, clip)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, qmin={self.qmin}, qmax={self.qmax}, learn={self.learn}"
