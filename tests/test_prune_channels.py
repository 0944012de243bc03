"""PruneChannels: dependency analysis, coupling, exactness, ONNX lowering, goldens.

The central correctness check is *zeroed equivalence*: for a removal chosen by the pass, zero
every parameter position of the removed channels in the unpruned graph (producer rows, norm
affine, consumer columns, broadcast tensors); the pruned graph must then compute exactly the
same outputs. It exercises every transfer rule (coupling, cat offsets, heads, shuffle, split,
flatten, slices) on real numbers rather than on shapes only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.fx import GraphModule, symbolic_trace

from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.errors import PassError, PassVerificationError, PipelineError
from fxcompress.pass_base import PassContext
from fxcompress.pipeline import Pipeline
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from fxcompress.verify import propagate_shapes
from passes import PruneChannels
from passes.prune.depgraph import dependency_graph
from passes.prune.importance import class_importance
from passes.prune.rewrite import apply_removal
from zoo import ZOO

REQUIRED_ZOO = ["resnet_basic", "resnet_bottleneck", "inverted_residual", "dense_block", "transformer_block",
                "audio_conv1d"]


def traced(model: nn.Module, inputs: tuple[Tensor, ...]) -> GraphModule:
    return propagate_shapes(symbolic_trace(copy.deepcopy(model)), inputs)


def prune(model: nn.Module, inputs: tuple[Tensor, ...], p: PruneChannels, **ctx_kw):
    return run_pass(p, model, inputs, **ctx_kw)


def out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# --------------------------------------------------------------------------- structural models

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            elif isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.num_channels, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_channels, generator=gen) * 0.2)
    return model.eval()


class ShuffleUnit(nn.Module):
    """ShuffleNetV2-style: chunk, a depthwise branch, cat, channel shuffle (view-transpose-view)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                                    nn.Conv2d(8, 8, 1), nn.ReLU())
        self.head = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        x = F.relu(self.head(x))
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A squeeze-excitation gate (per-channel mul), a learnable per-channel scale (get_attr) and a
    grouped conv (groups=2: whole groups are pruned)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 16)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(4, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x))
        b, c = x.size(0), x.size(1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3)))))).view(b, c, 1, 1)
        x = x * s * self.scale
        x = F.relu(self.gn(self.grouped(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FlattenHead(nn.Module):
    """conv -> flatten -> Linear (a channel is a block of h*w features), a channel slice, a
    split with explicit sections and a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 12, 3, padding=1)
        self.up = nn.ConvTranspose2d(6, 6, 2, stride=2)
        self.down = nn.Conv2d(6, 6, 2, stride=2)
        self.conv2 = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(12 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv(x))
        head, rest = torch.split(y, [6, 6], dim=1)
        head = self.down(F.relu(self.up(head)))
        part = self.conv2(rest[:, 2:])
        y = torch.cat([head, part], dim=1)
        return self.fc(y.flatten(1))


class HeadsView(nn.Module):
    """Attention with separate q/k/v projections and view(b, t, heads, d) (prune whole heads),
    an input projection so the residual stream is prunable, a LayerNorm-free MLP."""

    def __init__(self, din: int = 6, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.embed = nn.Linear(din, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.out = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        b, t, _ = h.shape
        q = self.q(h).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, self.d).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, self.d).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.o(a.transpose(1, 2).reshape(b, t, self.heads * self.d))
        h = h + self.mlp(h)
        return self.out(h.mean(1))


class Unsupported(nn.Module):
    """Ops the analysis must refuse: a roll along channels, a channel mean, a shared module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.roll(self.a(x), 1, dims=1)
        z = self.b(x)
        z = z * z.mean(1, keepdim=True)
        w = self.shared(self.shared(F.relu(self.c(y + z))))
        return self.fc(w.mean((2, 3)))


STRUCTURES = {
    "shuffle": lambda: (_randomize(ShuffleUnit(), 1), (torch.randn(2, 3, 8, 8, generator=_gen(11)),)),
    "squeeze_excite": lambda: (_randomize(SqueezeExcite(), 2), (torch.randn(2, 3, 8, 8, generator=_gen(12)),)),
    "flatten_head": lambda: (_randomize(FlattenHead(), 3), (torch.randn(2, 2, 4, 4, generator=_gen(13)),)),
    "heads_view": lambda: (_randomize(HeadsView(), 4), (torch.randn(2, 5, 6, generator=_gen(14)),)),
}


def _build(name: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name in STRUCTURES:
            return STRUCTURES[name]()
        return ZOO[name]()


# --------------------------------------------------------------------------- zeroed equivalence

def zero_removed(gm: GraphModule, dg, removed: np.ndarray) -> None:
    """Zero every parameter position that belongs to a removed class (BN variance set to 1)."""
    with torch.no_grad():
        for s in dg.slices:
            pos = np.nonzero(removed[dg.comp[s.labels]])[0]
            if not len(pos):
                continue
            name = f"{s.owner}.{s.param}" if s.param else s.owner
            t = gm.get_parameter(name) if name in dict(gm.named_parameters()) else gm.get_buffer(name)
            t.index_fill_(s.dim, torch.as_tensor(pos), 1.0 if s.param == "running_var" else 0.0)


@pytest.mark.parametrize("name", REQUIRED_ZOO + ["leaf_mha_lstm", "classifier_digits"] + list(STRUCTURES))
def test_zeroed_equivalence(name: str) -> None:
    model, inputs = _build(name)
    gm = traced(model, inputs)
    dg = dependency_graph(gm)
    scores, _ = class_importance(gm, dg, "l2")
    removed, _ = PruneChannels(ratio=0.5).select(dg, scores)
    assert removed.any(), dg.summary()
    zero_removed(gm, dg, removed)
    expected = out(gm, inputs)
    apply_removal(gm, dg, removed)
    gm.recompile()  # called directly here, not through the manager
    propagate_shapes(gm, inputs)
    torch.testing.assert_close(out(gm, inputs), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the zoo at 0.5

@pytest.mark.parametrize("name", REQUIRED_ZOO)
def test_zoo_ratio_half(name: str, golden) -> None:
    model, inputs = ZOO[name]()
    before = copy.deepcopy(model.state_dict())
    gm = trace(model, inputs)
    result = run_pass(PruneChannels(ratio=0.5), gm, inputs)
    pruned = result.graph
    s = result.stats
    assert out(pruned, inputs).shape == out(model, inputs).shape
    assert s["params_after"] <= 0.6 * s["params_before"], s
    assert s["macs_after"] <= 0.6 * s["macs_before"], s
    assert s["pruned_params"] == s["total_params"] - s["active_params"]
    assert s["compression_ratio"] == pytest.approx(s["total_params"] / s["active_params"])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    onnx_model = export_onnx(pruned, inputs)
    got = OrtRunner(onnx_model)(*inputs)
    torch.testing.assert_close(got, out(pruned, inputs), rtol=1e-4, atol=1e-4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"user model changed: {key}"
    golden.check(pruned, f"prune_channels_{name}")


def test_ratio_zero_is_exact_on_zoo() -> None:
    for name in REQUIRED_ZOO:
        model, inputs = ZOO[name]()
        gm = traced(model, inputs)
        result = run_pass(PruneChannels(ratio=0.0), gm, inputs)
        assert torch.equal(out(result.graph, inputs), out(model, inputs)), name
        assert result.stats["params_after"] == result.stats["params_before"]
        assert all(r["channels_after"] == r["channels_before"] for r in result.stats["layers"].values())


class ZeroChannelNet(nn.Module):
    def __init__(self, bn: bool = False, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = norm if norm is not None else nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("bn", [False, True])
def test_zero_channel_is_removed_exactly(bn: bool) -> None:
    torch.manual_seed(0)
    model = _randomize(ZeroChannelNet(bn), 5)
    with torch.no_grad():
        model.conv1.weight[5] = 0
        model.conv1.bias[5] = 0
        if bn:  # BatchNorm maps 0 to beta - gamma * mean / std: zero mean and shift keep it 0
            model.bn.bias[5] = 0
            model.bn.running_mean[5] = 0
    inputs = (torch.randn(2, 3, 6, 6, generator=_gen(3)),)
    result = prune(model, inputs, PruneChannels(ratio=0.125, ratios=(("conv2", 0.0),)))
    assert result.stats["layers"]["conv1"]["kept"] == [0, 1, 2, 3, 4, 6, 7]
    torch.testing.assert_close(out(result.graph, inputs), out(model, inputs), rtol=1e-6, atol=1e-6)


def _zero_conv1_channels(model: ZeroChannelNet, channels: list[int]) -> ZeroChannelNet:
    """All weights of ``channels`` of conv1 zero, and the norm's affine for them too."""
    with torch.no_grad():
        model.conv1.weight[channels] = 0
        model.conv1.bias[channels] = 0
        if getattr(model.bn, "weight", None) is not None:
            model.bn.weight.copy_(torch.rand(8, generator=_gen(7)) + 0.5)
            model.bn.bias.copy_(torch.randn(8, generator=_gen(8)))
            model.bn.bias[channels] = 0
    return model.eval()


@pytest.mark.parametrize("norm, zeros", [
    (lambda: nn.BatchNorm2d(8, track_running_stats=False), [5]),
    (lambda: nn.InstanceNorm2d(8, affine=True), [5]),
    (lambda: nn.GroupNorm(8, 8), [5]),
    (lambda: nn.GroupNorm(4, 8), [2, 3]),  # a whole group of two channels
], ids=["bn-batch-stats", "instancenorm", "groupnorm-per-channel", "groupnorm-groups"])
def test_zero_channel_exact_before_per_channel_or_per_group_norms(norm, zeros: list[int]) -> None:
    """Norms whose statistics stay within a channel (or a whole removed group) keep the removal of
    an all-zero channel exact, including BatchNorm without running statistics."""
    torch.manual_seed(0)
    model = _zero_conv1_channels(ZeroChannelNet(norm=norm()), zeros)
    inputs = (torch.randn(2, 3, 6, 6, generator=_gen(3)),)
    result = prune(model, inputs, PruneChannels(ratio=0.125 * len(zeros), ratios=(("conv2", 0.0),)))
    assert result.stats["layers"]["conv1"]["kept"] == [c for c in range(8) if c not in zeros]
    assert result.stats["layers"]["bn"]["channels_after"] == 8 - len(zeros)
    torch.testing.assert_close(out(result.graph, inputs), out(model, inputs), rtol=1e-6, atol=1e-6)


def test_batch_stats_norm_scores_its_shift_not_the_cancelled_bias() -> None:
    """Behind a BatchNorm with batch statistics a zero row outputs the constant beta: a zero row
    with a large beta matters, one with beta = 0 does not (a folded running-stats BN would crash)."""
    torch.manual_seed(0)
    model = _zero_conv1_channels(ZeroChannelNet(norm=nn.BatchNorm2d(8, track_running_stats=False)), [2, 6])
    with torch.no_grad():
        model.bn.bias[2] = 3.0
        model.conv1.bias[6] = 5.0  # cancelled by the batch mean: the channel still outputs beta = 0
    inputs = (torch.randn(2, 3, 6, 6, generator=_gen(3)),)
    result = prune(model, inputs, PruneChannels(ratio=0.125, ratios=(("conv2", 0.0),)))
    assert result.stats["layers"]["conv1"]["kept"] == [0, 1, 2, 3, 4, 5, 7]
    bn = result.graph.bn
    assert bn.num_features == 7 and not bn.track_running_stats and bn.running_mean is None
    assert torch.equal(bn.bias, model.bn.bias[[0, 1, 2, 3, 4, 5, 7]])
    torch.testing.assert_close(out(result.graph, inputs), out(model, inputs), rtol=1e-6, atol=1e-6)


def _layernorm_net() -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[3] = 0
        model[0].bias[3] = 0
        model[1].weight.copy_(torch.rand(16, generator=_gen(4)) + 0.5)
        model[1].bias.copy_(torch.randn(16, generator=_gen(5)))
        model[1].bias[3] = 0
    return model, (torch.randn(3, 6, generator=_gen(6)),)


def _groupnorm1_net() -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    model = _zero_conv1_channels(ZeroChannelNet(norm=nn.GroupNorm(1, 8)), [5])
    return model, (torch.randn(2, 3, 6, 6, generator=_gen(3)),)


@pytest.mark.parametrize("build, layer, channel, what", [
    (_layernorm_net, "0", 3, "LayerNorm"), (_groupnorm1_net, "conv1", 5, "GroupNorm with one group")],
    ids=["layernorm", "groupnorm-1"])
def test_norm_over_channels_blocks_the_group_with_a_reason(build, layer: str, channel: int, what: str) -> None:
    """A LayerNorm / one-group GroupNorm normalizes over all channels: removing even an all-zero
    channel changes its mean and variance. By default its channels stay, with the reason listed;
    norm_stats='prune' prunes them and the outputs then move (why it is not the default)."""
    model, inputs = build()
    ratios = (("conv2", 0.0),) if layer == "conv1" else ()
    blocked = prune(model, inputs, PruneChannels(ratio=0.125, ratios=ratios))
    reason = blocked.stats["unpruned"][layer]
    assert what in reason and "statistics over the channel axis" in reason and "norm_stats='prune'" in reason
    n = blocked.stats["layers"][layer]["channels_before"]
    assert blocked.stats["layers"][layer]["channels_after"] == n
    assert any(layer == d.node and "statistics" in d.message for d in blocked.diagnostics)
    assert torch.equal(out(blocked.graph, inputs), out(model, inputs))
    pruned = prune(model, inputs, PruneChannels(ratio=1 / n, ratios=ratios, norm_stats="prune"))
    assert pruned.stats["layers"][layer]["kept"] == [c for c in range(n) if c != channel]
    assert (out(pruned.graph, inputs) - out(model, inputs)).abs().max() > 1e-3
    with pytest.raises(PipelineError, match="norm_stats"):
        PruneChannels(norm_stats="skip")


def test_zero_channel_exact_through_the_pipeline() -> None:
    """The pipeline's report measures the error against the original model: zero up to float32
    summation order (a conv with fewer input channels may sum in another order on another CPU:
    7.45e-09 seen on AVX-512 VNNI)."""
    torch.manual_seed(0)
    model = ZeroChannelNet(bn=False).eval()
    with torch.no_grad():
        model.conv1.weight[[1, 4]] = 0
        model.conv1.bias[[1, 4]] = 0
        model.conv2.weight[2] = 0
        model.conv2.bias[2] = 0
    inputs = (torch.randn(2, 3, 6, 6),)
    gm = trace(model, inputs)
    outcome = Pipeline.parse("prune-channels{ratio=0.2}").apply(gm, PassContext(inputs, original=model))
    torch.testing.assert_close(out(outcome.graph_module, inputs), out(model, inputs), rtol=1e-6, atol=1e-6)
    assert outcome.graph_module.conv1.out_channels == 7  # floor(0.2 * 8) = 1: channel 1 (ties: lowest index)
    assert outcome.graph_module.conv2.out_channels == 5
    record = outcome.report[-1]
    assert record.stats["layers"]["conv2"]["kept"] == [0, 1, 3, 4, 5]
    assert not PruneChannels(ratio=0.2).exact  # so the recorded error is what proves exactness
    assert record.status == "ok"
    assert record.error["max_abs"] <= 1e-6 and record.error["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_ratio_zero_is_declared_exact_and_the_pipeline_verifies_it() -> None:
    """ratio=0 (and no non-zero per-layer ratio) makes the instance exact: the pipeline then
    checks its outputs; the class stays non-exact in the catalogue."""
    assert PruneChannels(ratio=0.0).exact and PruneChannels(ratio=0.0, ratios={"fc": 0.0}).exact
    assert not PruneChannels.exact and not PruneChannels().exact
    assert not PruneChannels(ratio=0.0, ratios={"layers.*": 0.3}).exact
    model, inputs = ZOO["resnet_basic"]()
    gm = trace(model, inputs)
    outcome = Pipeline((PruneChannels(ratio=0.0),)).apply(gm, PassContext(inputs, original=model))
    assert outcome.report[-1].error["max_abs"] == 0.0  # nothing removed: the same kernels on the same shapes

    @dataclasses.dataclass(frozen=True)
    class Drifting(PruneChannels):
        shares_weights: ClassVar[bool] = False  # it writes into conv1.weight in place

        def run(self, gm: GraphModule, ctx: PassContext):
            result = super().run(gm, ctx)
            with torch.no_grad():
                result.graph.conv1.weight.mul_(1.01)
            return result

    with pytest.raises(PassVerificationError, match="declared exact"):
        Pipeline((Drifting(ratio=0.0),)).apply(gm, PassContext(inputs, original=model))
    outcome = Pipeline((Drifting(ratio=0.1),)).apply(gm, PassContext(inputs, original=model))
    assert outcome.report[-1].error["max_abs"] > 0  # not declared exact: recorded, not refused


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv2(F.relu(self.bn(self.conv1(x)))).mean((2, 3)))


def test_per_layer_and_total_stats_counted_by_hand() -> None:
    """ratio=0.5 on a 1x3x5x5 input: conv1/bn 8 -> 4 channels, conv2 4 -> 2, the head keeps its
    2 outputs and loses 2 inputs. Every weight is non-zero, so active = params after."""
    torch.manual_seed(0)
    model = _randomize(SmallNet(), 9)
    inputs = (torch.randn(1, 3, 5, 5, generator=_gen(9)),)
    s = prune(model, inputs, PruneChannels(ratio=0.5)).stats
    hw = 5 * 5
    expected = {  # (params before, params after, MACs before, MACs after); bias MACs not counted
        "conv1": (8 * 3 * 9 + 8, 4 * 3 * 9 + 4, 8 * 3 * 9 * hw, 4 * 3 * 9 * hw),
        "bn": (2 * 8, 2 * 4, 0, 0),
        "conv2": (4 * 8 + 4, 2 * 4 + 2, 4 * 8 * hw, 2 * 4 * hw),
        "fc": (2 * 4 + 2, 2 * 2 + 2, 2 * 4, 2 * 2),
    }
    channels = {"conv1": (8, 4), "bn": (8, 4), "conv2": (4, 2), "fc": (2, 2)}
    assert set(s["layers"]) == set(expected)
    for name, (pb, pa, mb, ma) in expected.items():
        row = s["layers"][name]
        assert (row["channels_before"], row["channels_after"]) == channels[name], name
        assert len(row["kept"]) == channels[name][1]
        assert (row["params_before"], row["params_after"], row["macs_before"], row["macs_after"]) == \
            (pb, pa, mb, ma), name
        assert row["active_params"] == pa and row["pruned_params"] == pb - pa, name
        assert row["sparsity"] == pytest.approx((pb - pa) / pb) and row["compression_ratio"] == pytest.approx(pb / pa)
    total_b, total_a = (sum(v[i] for v in expected.values()) for i in (0, 1))
    macs_b, macs_a = (sum(v[i] for v in expected.values()) for i in (2, 3))
    assert (s["params_before"], s["params_after"], s["active_params"]) == (total_b, total_a, total_a)
    assert (s["macs_before"], s["macs_after"]) == (macs_b, macs_a)
    assert s["sparsity"] == pytest.approx(1 - total_a / total_b)
    assert s["compression_ratio"] == pytest.approx(total_b / total_a)


# --------------------------------------------------------------------------- coupling

def test_residual_add_inputs_share_kept_indices() -> None:
    model, inputs = ZOO["resnet_basic"]()
    layers = prune(model, inputs, PruneChannels(ratio=0.5)).stats["layers"]
    stage1 = [layers[n]["kept"] for n in ("conv1", "bn1", "layers.0.conv2", "layers.0.bn2")]
    assert len(stage1[0]) == 4 and all(k == stage1[0] for k in stage1)
    stage2 = [layers[n]["kept"] for n in ("layers.1.conv2", "layers.1.bn2", "layers.1.downsample.0",
                                          "layers.1.downsample.1")]
    assert len(stage2[0]) == 8 and all(k == stage2[0] for k in stage2)
    assert layers["fc"]["channels_after"] == 10


def test_concat_offsets() -> None:
    model, inputs = ZOO["dense_block"]()
    gm = traced(model, inputs)
    result = run_pass(PruneChannels(ratio=0.5), gm, inputs)
    layers = result.stats["layers"]
    offsets, expected = 0, []
    for name, width in (("conv0", 8), ("dense.0.conv2", 4), ("dense.1.conv2", 4), ("dense.2.conv2", 4)):
        expected += [offsets + i for i in layers[name]["kept"]]
        offsets += width
    assert layers["transition.0"]["kept"] == expected  # the BatchNorm on the concatenation
    orig = traced(model, inputs)
    kept_out = layers["transition.2"]["kept"]
    w = orig.get_submodule("transition.2").weight[kept_out][:, expected]
    assert torch.equal(result.graph.get_submodule("transition.2").weight, w)


def test_depthwise_groups_equal_channels() -> None:
    model, inputs = ZOO["inverted_residual"]()
    pruned = prune(model, inputs, PruneChannels(ratio=0.5)).graph
    dw = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 3
    for m in dw:
        assert m.groups == m.in_channels == m.out_channels
        assert m.weight.shape[1] == 1
    assert [m.out_channels for m in dw] == [16, 16, 48]


def test_attention_heads_are_pruned_whole() -> None:
    model, inputs = ZOO["transformer_block"]()
    result = prune(model, inputs, PruneChannels(ratio=0.5))
    gm = result.graph
    assert gm.attn.qkv.out_features == 3 * 2 * 4  # 2 of 4 heads kept, head_dim 4 unchanged
    assert gm.attn.proj.in_features == 8
    kept = result.stats["layers"]["attn.qkv"]["kept"]
    heads = sorted({(i % 16) // 4 for i in kept})
    assert len(heads) == 2
    for part in range(3):  # q, k and v keep the same heads, each whole
        assert [i for i in kept if part * 16 <= i < (part + 1) * 16] == \
            [part * 16 + h * 4 + d for h in heads for d in range(4)]
    assert "attn.proj" in result.stats["unpruned"]  # its output joins the model input (residual)
    assert "x" in result.stats["unpruned"]["attn.proj"]


def test_channel_shuffle_split_and_cat() -> None:
    model, inputs = STRUCTURES["shuffle"]()
    result = prune(model, inputs, PruneChannels(ratio=0.5))
    kept = result.stats["layers"]["stem.0"]["kept"]
    branch = result.stats["layers"]["branch.5"]["kept"]
    # the shuffle interleaves the halves: channel i of the first half (a stem channel passed
    # through) and channel i of the branch output form one unit; both halves keep the same count
    assert [i for i in kept if i < 8] == branch
    assert result.graph.head.in_channels == 2 * len(branch)
    assert result.stats["layers"]["head"]["channels_after"] == 6


def test_grouped_conv_groupnorm_and_layer_scale() -> None:
    model, inputs = STRUCTURES["squeeze_excite"]()
    result = prune(model, inputs, PruneChannels(ratio=0.5))
    gm = result.graph
    assert gm.grouped.groups == 1 and gm.grouped.in_channels == 8  # one of two whole groups
    assert gm.conv.out_channels == 8 and gm.fc2.out_features == 8 and gm.scale.shape == (8, 1, 1)
    assert gm.gn.num_groups == 2 and gm.gn.num_channels == 4
    kept = result.stats["layers"]["conv"]["kept"]
    assert kept == list(range(8)) or kept == list(range(8, 16))


def test_flatten_slice_split_and_transpose_conv() -> None:
    model, inputs = STRUCTURES["flatten_head"]()
    result = prune(model, inputs, PruneChannels(ratio=0.5))
    gm = result.graph
    assert gm.fc.in_features == 16 * (gm.down.out_channels + gm.conv2.out_channels)
    assert gm.conv.out_channels == 6
    assert gm.up.in_channels + gm.conv2.in_channels <= 6


def test_unsupported_ops_are_left_with_reasons() -> None:
    model = Unsupported().eval()
    inputs = (torch.randn(2, 3, 4, 4),)
    result = prune(model, inputs, PruneChannels(ratio=0.5))
    unpruned = result.stats["unpruned"]
    assert "roll" in unpruned["a"]
    assert "reduces over the channel axis" in unpruned["b"]
    assert "called 2 times" in unpruned["c"]
    assert result.graph.a.out_channels == 8 and result.graph.shared.out_channels == 8
    torch.testing.assert_close(out(result.graph, inputs), out(model, inputs))


# --------------------------------------------------------------------------- options

def test_ratios_round_to_min_channels_exclude() -> None:
    model, inputs = ZOO["resnet_bottleneck"]()
    s = prune(model, inputs, PruneChannels(ratio=0.5, ratios={"layers.2.*": 0.75})).stats["layers"]
    assert s["layers.2.conv1"]["channels_after"] == 2 and s["layers.0.conv1"]["channels_after"] == 2
    s = prune(model, inputs, PruneChannels(ratio=0.7, round_to=4)).stats["layers"]
    assert all(r["channels_after"] % 4 == 0 for n, r in s.items() if n != "fc")
    assert s["layers.2.conv1"]["channels_after"] == 4  # 8 - floor(5.6) = 3 -> rounded up to 4
    s = prune(model, inputs, PruneChannels(ratio=0.9, min_channels=3)).stats["layers"]
    assert min(r["channels_after"] for r in s.values()) == 3
    result = prune(model, inputs, PruneChannels(ratio=0.5, exclude=("layers.0.conv1",)))
    assert result.stats["layers"]["layers.0.conv1"]["channels_after"] == 4
    assert "excluded by pattern" in result.stats["unpruned"]["layers.0.conv1"]


def test_pipeline_string_round_trip() -> None:
    p = Pipeline.parse("prune-channels{ratio=0.5,round-to=8,ratios={layer3.*:0.6},exclude=[stem*]}")
    (pc,) = p.leaves()
    assert pc == PruneChannels(ratio=0.5, round_to=8, ratios=(("layer3.*", 0.6),), exclude=("stem*",))
    assert Pipeline.parse(str(p)).leaves().__next__() == pc
    with pytest.raises(PipelineError, match="ratio"):
        PruneChannels(ratio=1.0)
    with pytest.raises(PipelineError, match="importance"):
        PruneChannels(importance="random")


class ResTiny(nn.Module):
    """conv1/bn1 and conv2/bn2 coupled by a residual add: one group of 8 channels, two producers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(a + self.bn2(self.conv2(a))).mean((2, 3)))


def _reference_importance(model: ResTiny, importance: str, data) -> Tensor:
    """Score of each of the 8 coupled channels, summed over the members of the group."""
    pairs = ((model.conv1, model.bn1), (model.conv2, model.bn2))
    if importance == "bn-scale":
        return sum(bn.weight.detach().abs() for _, bn in pairs)
    if importance in ("l1", "l2"):  # each producer's row with its BatchNorm folded in
        score = torch.zeros(8, dtype=torch.float64)
        for conv, bn in pairs:
            scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
            rows = conv.weight.detach().double().flatten(1) * scale[:, None]
            shift = (bn.bias.detach().double() - scale * bn.running_mean.double())[:, None]
            folded = torch.cat([rows, shift], 1)
            score += folded.abs().sum(1) if importance == "l1" else folded.norm(dim=1)
        return score
    model = copy.deepcopy(model)
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
    taylor = lambda p, dim: (p.detach() * p.grad).abs().transpose(0, dim).reshape(8, -1).sum(1)  # noqa: E731
    slices = [(model.conv1.weight, 0), (model.bn1.weight, 0), (model.bn1.bias, 0), (model.conv2.weight, 1),
              (model.conv2.weight, 0), (model.bn2.weight, 0), (model.bn2.bias, 0), (model.fc.weight, 1)]
    return sum(taylor(p, dim) for p, dim in slices)


def test_importance_criteria() -> None:
    """Each criterion keeps the 4 channels with the largest reference importance, computed here
    from the weights (L1/L2 of BN-folded rows), |gamma| or |w * dL/dw| over every member."""
    torch.manual_seed(0)
    model = _randomize(ResTiny(), 22)
    with torch.no_grad():  # rows of unequal size, so weight norms and |gamma| rank channels differently
        model.conv1.weight.mul_(torch.rand(8, 1, 1, 1, generator=_gen(122)) * 3)
        model.conv2.weight.mul_(torch.rand(8, 1, 1, 1, generator=_gen(122)) * 3)
    inputs = (torch.randn(2, 3, 6, 6, generator=_gen(22)),)
    data = [(torch.randn(4, 3, 6, 6, generator=_gen(i)), torch.randint(0, 3, (4,), generator=_gen(i)))
            for i in range(2)]
    chosen = {}
    for importance in ("l1", "l2", "bn-scale", "taylor"):
        result = prune(model, inputs, PruneChannels(ratio=0.5, importance=importance), train_data=data)
        assert result.stats["importance"] == importance
        layers = result.stats["layers"]
        expected = sorted(torch.argsort(_reference_importance(model, importance, data), descending=True)[:4].tolist())
        assert all(layers[n]["kept"] == expected for n in ("conv1", "bn1", "conv2", "bn2")), importance
        chosen[importance] = tuple(expected)
    assert len(set(chosen.values())) >= 3, chosen  # the criteria really differ on this model


def test_bn_scale_keeps_largest_gamma() -> None:
    model, inputs = ZOO["audio_conv1d"]()
    gamma = model.features[1].weight.detach()
    s = prune(model, inputs, PruneChannels(ratio=0.5, importance="bn-scale")).stats["layers"]
    assert s["features.0"]["kept"] == sorted(torch.argsort(gamma, descending=True)[:4].tolist())


def test_taylor_without_data_is_a_clear_error() -> None:
    model, inputs = ZOO["resnet_basic"]()
    with pytest.raises(PassError, match="train_data= or calibration="):
        prune(model, inputs, PruneChannels(importance="taylor"))


@settings(max_examples=10, deadline=None)
@given(ratio=st.floats(0.0, 0.95), round_to=st.sampled_from([1, 2, 4]))
def test_kept_counts_property(ratio: float, round_to: int) -> None:
    model, inputs = ZOO["audio_conv1d"]()
    s = prune(model, inputs, PruneChannels(ratio=ratio, round_to=round_to)).stats
    for name, n in (("features.0", 8), ("features.4", 16), ("features.7", 16)):
        after = s["layers"][name]["channels_after"]
        want = max(1, min(n, math.ceil((n - math.floor(ratio * n + 1e-9)) / round_to) * round_to))
        assert after == want
    assert s["params_after"] <= s["params_before"]


def test_compile_end_to_end_with_fold_and_repeat() -> None:
    """The issue's usage: fold BatchNorm, prune iteratively, lower to ONNX Runtime; the report
    carries the per-layer channel counts and totals of every pruning step."""
    import fxcompress as fxc

    model, inputs = ZOO["resnet_basic"]()
    compiled = fxc.compile(model, inputs, "fold-batchnorm,repeat{n=2}(prune-channels{ratio=0.3,round-to=2})",
                           target="onnxruntime", progress=False)
    assert compiled(*inputs).shape == (2, 10)
    steps = [r for r in compiled.report if "prune-channels" in r.name]
    assert len(steps) == 2
    first, second = steps[0].stats, steps[1].stats
    assert first["layers"]["conv1"]["channels_after"] == 6 and second["layers"]["conv1"]["channels_after"] == 6
    assert second["layers"]["layers.1.conv1"]["channels_before"] == 12
    assert second["layers"]["layers.1.conv1"]["channels_after"] == 10
    assert second["params_before"] == first["params_after"] > second["params_after"]
    torch.testing.assert_close(compiled(*inputs), out(compiled.graph_module, inputs), rtol=1e-4, atol=1e-4)


def test_layernorm_affine_is_sliced_and_taylor_uses_calibration() -> None:
    """With norm_stats='prune', a LayerNorm over pruned channels keeps its affine params for the
    kept ones (its statistics are then taken over fewer channels: an approximation). Taylor
    importance works from input-only calibration batches (the model's own predictions as targets)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).eval()
    inputs = (torch.randn(3, 5, 6, generator=_gen(1)),)
    calibration = [torch.randn(4, 5, 6, generator=_gen(i)) for i in range(3)]
    result = prune(model, inputs, PruneChannels(ratio=0.5, importance="taylor", norm_stats="prune"),
                   calibration=calibration)
    gm = result.graph
    kept = result.stats["layers"]["0"]["kept"]
    assert gm.get_submodule("1").normalized_shape == (8,)
    assert torch.equal(gm.get_submodule("1").weight, model[1].weight[kept])
    assert torch.equal(gm.get_submodule("3").weight, model[3].weight[:, kept])
    assert out(gm, inputs).shape == (3, 5, 4)
    onnx_model = export_onnx(gm, inputs)
    torch.testing.assert_close(OrtRunner(onnx_model)(*inputs), out(gm, inputs), rtol=1e-4, atol=1e-4)
