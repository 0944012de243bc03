"""fxcompress.stats: params, non-zeros, bytes and MACs; expected numbers are worked out by hand."""

from __future__ import annotations

import io
import json
import math
import operator
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.fx import symbolic_trace

from fxcompress.errors import InputError
from fxcompress.stats import GraphStats, compare, format_bytes, format_count, graph_stats, onnx_stats
from fxcompress.verify import propagate_shapes


def stats_of(model: nn.Module, *inputs: torch.Tensor) -> GraphStats:
    gm = symbolic_trace(model.eval())
    propagate_shapes(gm, inputs)
    return graph_stats(gm)


def check_totals(stats: GraphStats) -> None:
    assert stats.params == sum(l.params for l in stats.layers)
    assert stats.nonzero == sum(l.nonzero for l in stats.layers)
    assert stats.macs == sum(l.macs for l in stats.layers)
    assert stats.bytes == sum(l.bytes for l in stats.layers) == sum(stats.bytes_by_dtype.values())
    for layer in stats.layers:
        assert sum(layer.bytes_by_dtype.values()) == layer.bytes, layer
    dtypes = {d for layer in stats.layers for d in layer.bytes_by_dtype}
    assert {d: sum(l.bytes_by_dtype.get(d, 0) for l in stats.layers) for d in dtypes} == \
        {d: n for d, n in stats.bytes_by_dtype.items() if n}


# --------------------------------------------------------------------------- conv / linear

CONV_CASES = {
    # out 1x8x5x5 = 200 outputs, each 3 in-ch * 3*3 taps; params 8*3*9 + 8
    "stride_padding": (nn.Conv2d(3, 8, 3, stride=2, padding=1), (1, 3, 9, 9), 200 * 27, 224),
    # out 1x16x6x6 = 576 outputs, each 8/4 = 2 in-ch * 9 taps; params 16*2*9 + 16
    "groups": (nn.Conv2d(8, 16, 3, padding=1, groups=4), (1, 8, 6, 6), 576 * 18, 304),
    # depthwise: 576 outputs * 1 * 9; params 16*9 (no bias)
    "depthwise": (nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), (1, 16, 6, 6), 576 * 9, 144),
    # L_out = (20 - 5) // 2 + 1 = 8, out 1x6x8 = 48 outputs * 4 * 5; params 6*4*5 + 6
    "conv1d": (nn.Conv1d(4, 6, 5, stride=2), (1, 4, 20), 48 * 20, 126),
    # dilation 2: 3x3 kernel spans 5, out 1x2x4x4 = 32 * 3 * 9; batch 2 doubles: 64 * 27
    "dilation_batch": (nn.Conv2d(3, 2, 3, dilation=2), (2, 3, 8, 8), 64 * 27, 56),
    # transposed: every input element (1*4*5*5 = 100) meets out_ch 2 * 9 taps; params 4*2*9 + 2
    "transpose": (nn.ConvTranspose2d(4, 2, 3, stride=2), (1, 4, 5, 5), 100 * 18, 74),
    # 3-D: out 1x2x3x3x3 = 54 * 1 in-ch * 8 taps; params 2*8 + 2
    "conv3d": (nn.Conv3d(1, 2, 2), (1, 1, 4, 4, 4), 54 * 8, 18),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_macs_and_params(case: str) -> None:
    conv, shape, macs, params = CONV_CASES[case]
    stats = stats_of(nn.Sequential(conv), torch.randn(shape))
    assert (stats.macs, stats.params, stats.nonzero) == (macs, params, params)
    assert [(l.name, l.kind) for l in stats.layers] == [("0", type(conv).__name__)]
    assert stats.bytes_by_dtype == {"float32": 4 * params}
    check_totals(stats)


class FunctionalConvLinear(nn.Module):
    """Weights used through F.conv2d / F.linear: get_attr + call_function nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3))  # depthwise over 4 channels
        self.fc_w = nn.Parameter(torch.randn(5, 4 * 2 * 2))
        self.fc_b = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, stride=2, groups=4)
        return F.linear(torch.flatten(y, 1), self.fc_w, self.fc_b)


def test_functional_conv_and_linear_attribute_weights_to_their_node() -> None:
    stats = stats_of(FunctionalConvLinear(), torch.randn(3, 4, 5, 5))
    conv, linear = stats.layer("conv2d"), stats.layer("linear")
    # out 3x4x2x2 = 48 outputs * 1 * 9; linear out 3x5 = 15 * 16
    assert (conv.kind, conv.macs, conv.params, conv.shape) == ("conv2d", 48 * 9, 36, "3x4x2x2")
    assert (linear.macs, linear.params) == (15 * 16, 85)
    assert [l.name for l in stats.layers] == ["conv2d", "linear"]
    check_totals(stats)


def test_linear_on_3d_input() -> None:
    stats = stats_of(nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.LayerNorm(7)), torch.randn(2, 5, 10))
    # 2*5*7 = 70 outputs * 10; LayerNorm: 14 params, 0 MACs
    assert stats.layer("0").macs == 700
    assert (stats.layer("2").kind, stats.layer("2").macs, stats.layer("2").params) == ("LayerNorm", 0, 14)
    assert stats.params == 77 + 14 and stats.macs == 700
    assert [l.name for l in stats.layers] == ["0", "2"]


def test_batchnorm_buffers_are_bytes_not_params() -> None:
    stats = stats_of(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)), torch.randn(1, 2, 4, 4))
    bn = stats.layer("1")
    assert (bn.params, bn.macs) == (6, 0)
    # weight, bias (params) + running_mean, running_var: 12 floats; num_batches_tracked: one int64
    assert bn.bytes == 12 * 4 + 8
    assert bn.bytes_by_dtype == {"float32": 12 * 4, "int64": 8}
    assert stats.layer("0").bytes_by_dtype == {"float32": 9 * 4}
    assert stats.params == 9 + 6
    assert stats.bytes_by_dtype == {"float32": (9 + 12) * 4, "int64": 8}
    check_totals(stats)


# --------------------------------------------------------------------------- attention, matmuls


class AttentionBlock(nn.Module):
    """Multi-head self-attention written with matmuls (B=2, T=5, E=8, 2 heads of 4)."""

    def __init__(self, e: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(e, e) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        split = lambda y: y.reshape(b, t, self.heads, e // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, e)
        return self.proj(y)


def test_attention_block_matmuls() -> None:
    stats = stats_of(AttentionBlock(), torch.randn(2, 5, 8))
    # each Linear: 2*5*8 outputs * 8 = 640; scores (2,2,5,5) = 100 * d 4; att@v (2,2,5,4) = 80 * T 5
    assert [stats.layer(n).macs for n in ("q", "k", "v", "proj")] == [640] * 4
    assert stats.layer("matmul").kind == "matmul" and stats.layer("matmul").macs == 400
    assert stats.layer("matmul_1").macs == 400
    assert stats.layer("matmul").shape == "2x2x5x5"
    assert stats.macs == 4 * 640 + 800
    assert stats.params == 4 * 72
    check_totals(stats)


class MatmulForms(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (torch.bmm(a, b), a.matmul(b), torch.baddbmm(a.matmul(b), a, b),
                torch.einsum("bqd,bkd->bqk", a, b.transpose(1, 2)), torch.mm(a[0], b[0]),
                F.scaled_dot_product_attention(q, k, v))


def test_matmul_forms_and_sdpa() -> None:
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 3)
    stats = stats_of(MatmulForms(), a, b, q, k, v)
    macs = {l.kind: l.macs for l in stats.layers}
    # (2,3,5) = 30 outputs * K 4; mm: 15 * 4; sdpa: 2*2*5 rows * S 7 * E 4 + (2,2,5,3) = 60 outputs * S 7
    assert macs == {"bmm": 120, "matmul": 120, "baddbmm": 120, "einsum": 120, "mm": 60,
                    "scaled_dot_product_attention": 560 + 420}
    assert stats.params == 0 and stats.macs_unknown == []


def test_multihead_attention_and_lstm_leaves() -> None:
    class Leaves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lstm = nn.LSTM(8, 6, num_layers=2)
            self.gru = nn.GRU(6, 3, bidirectional=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.mha(x, x, x)
            y, _ = self.lstm(y)  # seq-first: T=2 (batch dim of x), N=5
            y, _ = self.gru(y)
            return y

    stats = stats_of(Leaves(), torch.randn(2, 5, 8))
    mha, lstm, gru = stats.layer("mha"), stats.layer("lstm"), stats.layer("gru")
    # 4 projections: N*L*E*E = 2*5*64 each; attention: 2 matmuls of N*L*S*E = 2*5*5*8
    assert (mha.kind, mha.macs, mha.params) == ("MultiheadAttention", 4 * 640 + 2 * 400, 3 * 72 + 72)
    # per step: layer 0: 4*6*(8+6) = 336, layer 1: 4*6*(6+6) = 288; T*N = 10 steps
    assert lstm.macs == 10 * (336 + 288)
    assert lstm.params == (4 * 6 * 8 + 4 * 6 * 6 + 48) + (4 * 6 * 6 + 4 * 6 * 6 + 48)
    # bidirectional GRU: 2 * 3*3*(6+3) = 162 per step, 10 steps
    assert gru.macs == 10 * 162
    assert stats.macs_unknown == []
    check_totals(stats)


# --------------------------------------------------------------------------- sharing, sparsity


def test_shared_weights_and_repeated_module_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(self.a(x)))

    stats = stats_of(Tied(), torch.randn(3, 4))
    # a.weight 16 + a.bias 4 + b.bias 4; a is called twice: 2 * (3*4 outputs * 4)
    assert stats.params == 24
    assert (stats.layer("a").params, stats.layer("b").params) == (20, 4)
    assert (stats.layer("a").macs, stats.layer("b").macs) == (96, 48)
    assert [l.name for l in stats.layers] == ["a", "b"]
    assert stats.bytes == 24 * 4


def test_sparsity_after_zeroing_known_weights() -> None:
    model = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight[:, :3] = 0.0  # 12 of 40 weights
        model[2].weight[0] = 0.0  # 4 of 8
    stats = stats_of(model, torch.randn(1, 10))
    assert stats.params == 44 + 10
    assert (stats.nonzero, stats.pruned_params, stats.active_params) == (54 - 16, 16, 38)
    assert stats.sparsity == pytest.approx(16 / 54)
    assert stats.compression_ratio == pytest.approx(54 / 38)
    assert stats.layer("0").sparsity == pytest.approx(12 / 44)
    assert stats.layer("2").nonzero == 6

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    empty = stats_of(model, torch.randn(1, 10))
    assert empty.compression_ratio == math.inf and empty.sparsity == 1.0
    assert empty.to_dict()["compression_ratio"] is None


def test_missing_shapes_is_a_clear_error() -> None:
    gm = symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    with pytest.raises(InputError, match=r"node '_0'.*propagate_shapes") as err:
        graph_stats(gm)
    assert isinstance(err.value, ValueError)
    # nothing to count MACs of: shapes are not needed
    plain = graph_stats(symbolic_trace(nn.Sequential(nn.ReLU(), nn.LayerNorm(3))))
    assert (plain.params, plain.macs, plain.layer("1").shape) == (6, 0, None)
    with pytest.raises(InputError, match="GraphModule"):
        graph_stats(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_opaque_leaf_marks_macs_unknown_unless_it_reports_them() -> None:
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    class Reporting(Opaque):
        def fxcompress_macs(self, input_shapes: list, output_shape: tuple) -> int:
            return math.prod(output_shape) * input_shapes[0][-1]

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, Opaque) or super().is_leaf_module(m, qualname)

    model = nn.Sequential(Opaque(), Reporting())
    gm = torch.fx.GraphModule(model, Tracer().trace(model))
    stats = graph_stats(propagate_shapes(gm, (torch.randn(2, 3),)))
    assert stats.macs_unknown == ["0"]
    assert (stats.layer("0").macs, stats.layer("1").macs, stats.params) == (0, 18, 24)


# --------------------------------------------------------------------------- quantized storage


def dequantized_linear(weight: torch.Tensor, per_channel_fake_quant: bool) -> torch.fx.GraphModule:
    """The graph a quantization pass leaves: weights in get_attr buffers, dequantized by graph ops."""
    root, graph = nn.Module(), torch.fx.Graph()
    x = graph.placeholder("x")
    root.bias = nn.Parameter(torch.zeros(weight.shape[0]))
    if per_channel_fake_quant:
        scale = weight.abs().amax(dim=1).clamp_min(1e-3) / 127
        root.weight = nn.Parameter(weight.clone())
        root.register_buffer("w_scale", scale)
        root.register_buffer("w_zero_point", torch.zeros(weight.shape[0], dtype=torch.int32))
        w = graph.call_function(torch.fake_quantize_per_channel_affine, (
            graph.get_attr("weight"), graph.get_attr("w_scale"), graph.get_attr("w_zero_point"),
            0, -128, 127))
    else:
        scale = weight.abs().max() / 127
        root.register_buffer("w_int8", torch.round(weight / scale).to(torch.int8))
        root.register_buffer("w_scale", scale.reshape(()))
        as_float = graph.call_method("float", (graph.get_attr("w_int8"),))
        w = graph.call_function(operator.mul, (as_float, graph.get_attr("w_scale")))
    graph.output(graph.call_function(F.linear, (x, w, graph.get_attr("bias"))))
    return propagate_shapes(torch.fx.GraphModule(root, graph), (torch.randn(2, weight.shape[1]),))


def test_int8_buffers_count_as_params_with_one_byte_each() -> None:
    weight = torch.linspace(0.5, 2.0, 30).reshape(6, 5)
    weight[0] = 0.0
    fp32 = stats_of(nn.Sequential(nn.Linear(5, 6)), torch.randn(2, 5))
    int8 = graph_stats(dequantized_linear(weight, per_channel_fake_quant=False))
    layer = int8.layer("linear")
    # 30 int8 weights (row 0 zero) + 6 zero biases; 2*6 outputs * 5
    assert (layer.params, layer.nonzero, layer.macs) == (36, 25, 60)
    assert int8.params == fp32.params == 36 and int8.macs == fp32.macs == 60
    # 30 int8 weights + 6 fp32 bias + the fp32 scalar scale
    assert int8.bytes_by_dtype == {"float32": 7 * 4, "int8": 30}
    assert layer.bytes_by_dtype == {"float32": 7 * 4, "int8": 30}
    assert int8.bytes < fp32.bytes == 36 * 4
    assert [l.name for l in int8.layers] == ["linear"]


def test_per_channel_scales_and_zero_points_are_bytes_not_params() -> None:
    stats = graph_stats(dequantized_linear(torch.randn(6, 5), per_channel_fake_quant=True))
    assert (stats.params, stats.macs) == (36, 60)
    assert stats.bytes_by_dtype == {"float32": (36 + 6) * 4, "int32": 6 * 4}
    assert stats.layer("linear").bytes == stats.bytes


class WeightFakeQuant(nn.Module):
    """A QAT weight quantizer module: learnable per-channel scale, zero-point buffer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), 0.05))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, 0, -128, 127)


def test_weight_quantizer_module_state_joins_its_layer_as_bytes() -> None:
    root, graph = nn.Module(), torch.fx.Graph()
    root.weight = nn.Parameter(torch.randn(4, 2, 3, 3))
    root.bias = nn.Parameter(torch.randn(4))
    root.fq = WeightFakeQuant(4)
    x = graph.placeholder("x")
    w = graph.call_module("fq", (graph.get_attr("weight"),))
    graph.output(graph.call_function(F.conv2d, (x, w, graph.get_attr("bias"))))
    gm = propagate_shapes(torch.fx.GraphModule(root, graph), (torch.randn(1, 2, 5, 5),))
    stats = graph_stats(gm)
    # one layer: 72 weights + 4 biases; the scale (4 floats) and zero point (4 int32) are bytes only
    rows = [(l.name, l.params, l.macs, l.shape) for l in stats.layers]
    assert rows == [("conv2d", 76, 4 * 9 * 18, "1x4x3x3")]
    assert stats.bytes_by_dtype == {"float32": (76 + 4) * 4, "int32": 16}


# --------------------------------------------------------------------------- ONNX


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 4, 1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.dw(x))
        return self.fc(torch.flatten(self.conv2(x), 1))


def export(model: nn.Module, x: torch.Tensor, dynamic: bool = False) -> onnx.ModelProto:
    buffer = io.BytesIO()
    axes = {"x": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model.eval(), (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def test_onnx_stats_match_graph_stats() -> None:
    model, x = SmallNet(), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        model.conv2.weight[0] = 0.0  # 8 zeros
    fx = stats_of(model, x)
    # conv1: 1x8x4x4 = 128 * 27; dw: 128 * 9; conv2: 1x4x4x4 = 64 * 8; fc: 10 * 64
    assert fx.macs == 128 * 27 + 128 * 9 + 64 * 8 + 10 * 64
    assert fx.params == 224 + 80 + 32 + 650 and fx.nonzero == fx.params - 8
    for dynamic in (False, True):
        ox = onnx_stats(export(model, x, dynamic))
        assert (ox.params, ox.nonzero, ox.macs) == (fx.params, fx.nonzero, fx.macs)
        assert ox.bytes_by_dtype == {"float32": 4 * fx.params}
        assert [(l.kind, l.macs, l.params) for l in ox.layers] == [
            ("Conv", 128 * 27, 224), ("Conv", 128 * 9, 80), ("Conv", 64 * 8, 32), ("Gemm", 640, 650)]
        assert [l.macs for l in ox.layers] == [l.macs for l in fx.layers]
        check_totals(ox)


def test_aten_graph_from_torch_export() -> None:
    model, x = SmallNet().eval(), torch.randn(2, 3, 8, 8)
    gm = torch.export.export(model, (x,)).module()
    aten = graph_stats(gm)
    assert [(l.name, l.kind, l.macs) for l in aten.layers] == [
        ("conv2d", "conv2d", 2 * 128 * 27), ("conv2d_1", "conv2d", 2 * 128 * 9),
        ("conv2d_2", "conv2d", 2 * 64 * 8), ("linear", "linear", 2 * 640)]
    assert aten.params == stats_of(model, x).params == 986


def test_onnx_stats_lstm_and_attention_match_graph_stats() -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6, num_layers=2)
            self.attn = AttentionBlock(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.lstm(x)
            return self.attn(y)

    model, x = Seq(), torch.randn(3, 5, 4)
    fx, ox = stats_of(model, x), onnx_stats(export(model, x))
    assert (ox.params, ox.macs) == (fx.params, fx.macs)


def test_onnx_stats_follow_slices_whose_bounds_are_computed_from_shapes() -> None:
    """The TorchScript exporter lowers ``chunk`` of a ``view(b, -1, h, w)`` to ``Slice`` nodes whose
    bounds come from ``Shape`` -> ``Div``; ONNX shape inference alone leaves the pieces' shapes
    unknown (their convs would count 1 pixel). Their shapes are computed: the MACs match."""

    class ChunkAfterView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.size()
            p, q = x.view(b, -1, h, w).chunk(2, dim=1)
            return torch.cat([self.a(p), self.b(q)], dim=1)

    model, x = ChunkAfterView(), torch.randn(1, 8, 5, 5)
    fx, ox = stats_of(model, x), onnx_stats(export(model, x))
    assert ox.macs == fx.macs == 2 * 4 * 4 * 9 * 25 and ox.macs_unknown == []


def test_zoo_onnx_macs_equal_fx_macs() -> None:
    """Every zoo model: the same MACs before and after lowering; the same params where the exporter
    does not fold BatchNorm (it folds Conv+BN in eval mode, which drops BN's params)."""
    from zoo import ZOO

    for name, factory in ZOO.items():
        model, inputs = factory()
        fx = stats_of(model, *inputs)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), inputs, buffer, dynamo=False, opset_version=17)
        ox = onnx_stats(onnx.load_from_string(buffer.getvalue()))
        assert (name, ox.macs, ox.macs_unknown) == (name, fx.macs, fx.macs_unknown)
        check_totals(fx)
        check_totals(ox)
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            assert (name, ox.params, ox.nonzero) == (name, fx.params, fx.nonzero)


def qlinear_conv_model() -> onnx.ModelProto:
    w = np.arange(3 * 2 * 3 * 3, dtype=np.int8).reshape(3, 2, 3, 3) - 20  # one zero (value 20)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(3, 0.02, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.2, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
        numpy_helper.from_array(np.array([1, 0, 2], np.int32), "bias"),
        numpy_helper.from_array(np.ones((4, 3), np.int8), "m_w"),
        numpy_helper.from_array(np.array(0.5, np.float32), "m_scale"),
        numpy_helper.from_array(np.array([1, 27], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp",
                                         "bias"], ["y"], name="qconv"),
        helper.make_node("DequantizeLinear", ["y", "y_scale", "y_zp"], ["y_f"], name="dq_y"),
        helper.make_node("Reshape", ["y_f", "shape"], ["flat"], name="flatten"),
        helper.make_node("DequantizeLinear", ["m_w", "m_scale"], ["m_w_f"], name="dq_w"),
        helper.make_node("Transpose", ["m_w_f"], ["m_w_t"], name="t", perm=[1, 0]),
        helper.make_node("Constant", [], ["c"], name="c",
                         value=numpy_helper.from_array(np.ones((4, 2), np.float32))),
        helper.make_node("MatMul", ["m_w_t", "c"], ["wc"], name="const_mm"),
        helper.make_node("Slice", ["flat", "zero", "three", "one"], ["head"], name="slice"),
        helper.make_node("MatMul", ["head", "wc"], ["out"], name="mm"),
    ]
    inits += [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "zero"), (3, "three"),
                                                                               (1, "one"))]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                         [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_onnx_int8_initializers_are_one_byte() -> None:
    stats = onnx_stats(qlinear_conv_model())
    qconv = stats.layer("qconv")
    # out 1x3x3x3 = 27 outputs * 2 in-ch * 9 taps; params: 54 int8 weights + 3 int32 bias
    assert (qconv.kind, qconv.macs, qconv.params, qconv.nonzero) == ("QLinearConv", 486, 57, 55)
    # m_w reaches a MatMul through DequantizeLinear/Transpose: 3x2 = 6 outputs * K 4; c is 8 params
    assert (stats.layer("const_mm").macs, stats.layer("const_mm").params) == (24, 12 + 8)
    assert (stats.layer("mm").macs, stats.layer("mm").params) == (1 * 2 * 3, 0)
    assert stats.params == 57 + 20
    assert stats.bytes_by_dtype == {
        "float32": 4 * (1 + 3 + 1 + 1) + 4 * 8,  # x/w/y/m scales + constant c
        "int8": 54 + 3 + 12,  # w, w_zp, m_w
        "int32": 12, "int64": 8 * 5, "uint8": 2,
    }
    assert stats.macs == 486 + 24 + 6
    assert qconv.bytes_by_dtype["int8"] == 54 + 3 and qconv.bytes_by_dtype["int32"] == 12
    assert stats.layer("const_mm").bytes_by_dtype["int8"] == 12
    check_totals(stats)


# --------------------------------------------------------------------------- reporting helpers


def test_format_count_and_bytes() -> None:
    cases = {0: "0", 999: "999", 1000: "1K", 4500: "4.5K", 12345: "12.3K", 123456: "123K",
             999_999: "1M", 1_234_567: "1.23M", 2.5e9: "2.5G", -4500: "-4.5K", 0.5: "0.5"}
    assert {n: format_count(n) for n in cases} == cases
    assert format_count(math.inf) == "inf" and format_count(None) == "-"
    assert [format_bytes(n) for n in (100, 1536, 4 * 2**20)] == ["100 B", "1.5 KiB", "4 MiB"]


def test_to_dict_round_trip_and_compare() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(1, 2, 6, 6)
    before = stats_of(model, x)
    with torch.no_grad():
        model[0].weight[:2] = 0.0
    after = stats_of(nn.Sequential(model[0], model[2], model[3]), x)
    data = before.to_dict()
    assert list(data) == ["params", "nonzero", "pruned_params", "active_params", "sparsity",
                          "compression_ratio", "bytes", "bytes_by_dtype", "macs", "macs_unknown", "layers"]
    assert GraphStats.from_dict(json.loads(json.dumps(data, allow_nan=False))) == before
    assert data["layers"][1]["bytes_by_dtype"] == {"float32": 16 * 4, "int64": 8}

    report = GraphStats.compare(before, after)
    assert report == compare(before, after)
    assert (report["params_before"], report["params_after"]) == (76 + 8 + 195, 76 + 195)
    assert report["params_ratio"] == pytest.approx(271 / 279)
    assert report["macs_ratio"] == 1.0
    assert report["nonzero_after"] == 271 - 36
    assert report["layers"]["0"]["nonzero_ratio"] == pytest.approx(40 / 76)
    assert report["layers"]["1"]["params_after"] == 0 and report["layers"]["1"]["kind"] == "BatchNorm2d"
    json.dumps(report, allow_nan=False)
