"""``equalize-cross-layer``: exact on random conv / depthwise / linear / ReLU / ReLU6 stacks (the pass
manager verifies it and so does this test), equalizes what it should, says why when nothing
qualifies, absorbs high biases only where exact; and on real digits (per-tensor INT8, the TensorRT
scheme) with ``correct-bias``: see ``test_quant_repair_digits.py``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from fxcompress.testing import run_pass
from _passes_util import assert_untouched, outputs, snapshot
import fxcompress as fxc
from fxcompress.errors import PipelineError
from passes.quantize.equalize import EqualizeCrossLayer, _in_ranges, _out_ranges


class Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


# --------------------------------------------------------------------------- random stacks

@st.composite
def stacks(draw: Any) -> tuple[int, list[tuple[Any, ...]], int]:
    """(input channels, layer specs, seed): conv (groups 1, 2 or depthwise), linear after a flatten,
    and between them ReLU, ReLU6, Hardtanh(0, b), identity, dropout, max/avg pooling."""
    channels = start = draw(st.sampled_from([2, 3, 4]))
    specs: list[tuple[Any, ...]] = []
    flat = False
    for _ in range(draw(st.integers(2, 7))):
        if flat:
            op = draw(st.sampled_from(["linear", "linear", "relu", "relu6", "identity"]))
        else:
            op = draw(st.sampled_from(["conv", "conv", "dw", "relu", "relu6", "hardtanh", "identity", "dropout",
                                       "maxpool", "avgpool", "flatten"]))
        if op == "conv":
            out = draw(st.sampled_from([2, 4, 6]))
            groups = draw(st.sampled_from([1, 2])) if channels % 2 == 0 and out % 2 == 0 else 1
            k = draw(st.sampled_from([1, 3]))
            specs.append(("conv", channels, out, k, groups, draw(st.booleans())))
            channels = out
        elif op == "dw":
            specs.append(("dw", channels, draw(st.booleans())))
        elif op == "linear":
            out = draw(st.sampled_from([3, 5, 8]))
            specs.append(("linear", channels, out, draw(st.booleans())))
            channels = out
        elif op == "flatten":
            specs.append(("flatten",))
            channels *= 16   # 4x4 feature map after the stack's input 4x4 (pools keep it, see below)
            flat = True
        else:
            specs.append((op,))
    return start, specs, draw(st.integers(0, 2**16))


def _spread_weights(layer: nn.Module, gen: torch.Generator) -> None:
    """Per-output-channel magnitudes two orders of magnitude apart, as BN folding makes them."""
    with torch.no_grad():
        scale = torch.exp(torch.randn(layer.weight.shape[0], generator=gen) * 1.5)
        layer.weight.mul_(scale.reshape(-1, *([1] * (layer.weight.dim() - 1))))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen) * scale)


def build(start: int, specs: list[tuple[Any, ...]], seed: int) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for spec in specs:
        op = spec[0]
        if op == "conv":
            _, cin, cout, k, groups, bias = spec
            layers.append(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias))
        elif op == "dw":
            _, c, bias = spec
            layers.append(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=bias))
        elif op == "linear":
            _, cin, cout, bias = spec
            layers.append(nn.Linear(cin, cout, bias=bias))
        else:
            layers.append({"relu": nn.ReLU, "relu6": nn.ReLU6, "hardtanh": lambda: nn.Hardtanh(0.0, 2.5),
                           "identity": nn.Identity, "dropout": lambda: nn.Dropout(0.3),
                           "maxpool": lambda: nn.MaxPool2d(3, stride=1, padding=1),
                           "avgpool": lambda: nn.AvgPool2d(3, stride=1, padding=1),
                           "flatten": Flat}[op]())
        if isinstance(layers[-1], (nn.Conv2d, nn.Linear)):
            _spread_weights(layers[-1], gen)
    model = nn.Sequential(*layers).eval()
    return model, (torch.randn(3, start, 4, 4, generator=torch.Generator().manual_seed(seed + 1)) * 2,)


def _pairs(specs: list[tuple[Any, ...]], clip: str = "rescale") -> int:
    """Conv/linear -> (homogeneous ops) -> conv/linear pairs the pass must find in the stack."""
    count, open_ = 0, False
    for spec in specs:
        op = spec[0]
        if op in ("conv", "dw", "linear"):
            count += open_
            open_ = True
        elif op in ("relu6", "hardtanh") and clip == "skip":
            open_ = False
    return count


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(a.abs().max())))


@settings(max_examples=30)
@given(stacks(), st.sampled_from(["rescale", "skip"]))
@example((4, [("conv", 4, 4, 1, 1, True), ("relu6",), ("dw", 4, True), ("relu6",), ("conv", 4, 2, 1, 1, False)], 3),
         "rescale")
@example((2, [("conv", 2, 6, 3, 2, True), ("avgpool",), ("flatten",), ("linear", 96, 5, True), ("relu",),
              ("linear", 5, 3, True)], 11), "rescale")
def test_equalization_is_exact_on_random_stacks(stack: tuple, clip: str) -> None:
    model, inputs = build(*stack)
    before = snapshot(model)
    res = run_pass(EqualizeCrossLayer(clip=clip), model, inputs)
    for x, y in zip(outputs(model, inputs), outputs(res.graph, inputs), strict=True):
        _close(x, y)
    pairs = res.stats["pairs"]
    assert len(pairs) == _pairs(stack[1], clip), (res.stats, stack)
    if res.stats.get("sweeps", 0) < EqualizeCrossLayer().iterations:   # converged: every pair balanced
        assert all(row["imbalance_after"] < 1e-2 for row in pairs), pairs
    if not pairs:
        assert any(d.severity == "warning" and "no conv/linear pair" in d.message for d in res.diagnostics)
    # the pass manager itself verifies the declared exactness (float64 reference)
    c = fxc.compile(model, inputs, [EqualizeCrossLayer(clip=clip)], target="fx", progress=False)
    assert c.report[-1].status in ("ok", "unchanged")
    assert_untouched(model, before)


def test_single_pair_ends_with_equal_ranges() -> None:
    """One pair: A's output channel ranges equal B's input channel ranges afterwards, both
    sqrt(r1 r2) (Nagel et al.), and equalizing again changes nothing."""
    model, inputs = build(3, [("conv", 3, 6, 3, 1, True), ("relu",), ("conv", 6, 4, 3, 1, True)], 5)
    r1, r2 = _out_ranges(model[0].weight.double()), _in_ranges(model[2].weight.double(), model[2])
    res = run_pass(EqualizeCrossLayer(), model, inputs)
    a, b = res.graph.get_submodule("0"), res.graph.get_submodule("2")
    ra, rb = _out_ranges(a.weight.double()), _in_ranges(b.weight.double(), b)
    torch.testing.assert_close(ra, rb, rtol=1e-5, atol=0)
    torch.testing.assert_close(ra, (r1 * r2).sqrt(), rtol=1e-5, atol=0)
    again = run_pass(EqualizeCrossLayer(), res.graph, inputs)
    assert again.stats["pairs"][0]["scale_max"] == pytest.approx(1.0, abs=1e-5)


def test_depthwise_chain_is_equalized_and_relu6_gets_a_per_channel_bound() -> None:
    """conv -> ReLU6 -> depthwise -> ReLU6 -> conv: both pairs, the middle layer in both, and every
    ReLU6 becomes relu + minimum with a per-channel bound (exact)."""
    model, inputs = build(4, [("conv", 4, 8, 1, 1, True), ("relu6",), ("dw", 8, True), ("relu6",),
                              ("conv", 8, 4, 1, 1, True)], 7)
    inputs = (inputs[0] * 10,)   # drive the clips
    res = run_pass(EqualizeCrossLayer(), model, inputs)
    _close(outputs(model, inputs)[0], outputs(res.graph, inputs)[0])
    assert [(p["a"], p["b"]) for p in res.stats["pairs"]] == [("_0", "_2"), ("_2", "_4")]
    for p in res.stats["pairs"]:
        assert p["a_out_after"]["precision"] > p["a_out_before"]["precision"]
    mins = [n for n in res.graph.graph.nodes if n.target is torch.minimum]
    assert len(mins) == 2 and not any(isinstance(m, nn.ReLU6) for m in res.graph.modules())
    assert res.stats["sweeps"] > 1


def test_skip_clip_leaves_relu6_pairs_and_says_why() -> None:
    model, inputs = build(4, [("conv", 4, 8, 1, 1, True), ("relu6",), ("conv", 8, 4, 1, 1, True)], 1)
    res = run_pass(EqualizeCrossLayer(clip="skip"), model, inputs)
    assert res.stats["pairs"] == []
    assert "clip=skip" in res.stats["not_equalized"]["_0"]
    assert any("no conv/linear pair qualifies" in d.message for d in res.diagnostics)


def test_nothing_qualifies_names_the_reasons() -> None:
    """A residual and an unfolded BatchNorm block every pair; the warning says why for each layer."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            return self.b(self.bn(y + x))

    x = (torch.randn(2, 3, 4, 4),)
    res = run_pass(EqualizeCrossLayer(), Net().eval(), x)
    reasons = res.stats["not_equalized"]
    assert "add" in reasons["a"] and "graph output" in reasons["b"]
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)).eval()
    res = run_pass(EqualizeCrossLayer(), model, x)
    assert "fold-batchnorm" in res.stats["not_equalized"]["_0"]


def test_high_bias_absorption_is_exact_and_only_where_provable() -> None:
    """A's input is a ReLU6 output (bounded), its weights are positive and its biases large, so its
    pre-activation is provably >= c > 0: c moves into the 1x1 conv after it. With a padded 3x3 conv
    as B the same shift would not be exact at the borders: nothing is absorbed."""
    torch.manual_seed(0)
    for k, absorbed in ((1, True), (3, False)):
        model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU6(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                              nn.Conv2d(4, 3, k, padding=k // 2)).eval()
        with torch.no_grad():
            model[2].weight.abs_()
            model[2].bias.copy_(torch.tensor([3.0, 5.0, 0.5, 8.0]))
        x = (torch.randn(2, 2, 5, 5) * 3,)
        res = run_pass(EqualizeCrossLayer(), model, x)
        _close(outputs(model, x)[0], outputs(res.graph, x)[0])
        row = next(p for p in res.stats["pairs"] if p["a"] == "_2")
        assert (row["absorbed_channels"] > 0) is absorbed, row
        off = run_pass(EqualizeCrossLayer(absorb_high_bias=False), model, x)
        assert all(p["absorbed_channels"] == 0 for p in off.stats["pairs"])


def test_declares_its_place_in_the_pipeline() -> None:
    x = (torch.randn(2, 3, 6, 6),)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with pytest.warns(fxc.PassOrderWarning, match="equalize-cross-layer.*fold-batchnorm"):
        fxc.compile(model, x, "equalize-cross-layer,fold-batchnorm", target="fx", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxc.PassOrderWarning)
        c = fxc.compile(model, x, "fold-batchnorm,equalize-cross-layer", target="fx", progress=False)
    assert len(c.report[-1].stats["pairs"]) == 1
    with pytest.raises(PipelineError, match="option 'clip' .* must be one of 'rescale', 'skip'; got 'relu'"):
        EqualizeCrossLayer(clip="relu")


def test_equalized_graph_lowers_to_onnx_runtime() -> None:
    """The per-channel ReLU6 (Relu + Min) and the rescaled layers run in ONNX Runtime as in FX."""
    model, inputs = build(4, [("conv", 4, 8, 1, 1, True), ("relu6",), ("dw", 8, True), ("relu6",),
                              ("conv", 8, 4, 1, 1, True)], 2)
    c = fxc.compile(copy.deepcopy(model), inputs, "equalize-cross-layer", target="onnxruntime", progress=False)
    ops = {n.op_type for n in c.onnx_model.graph.node}
    assert {"Relu", "Min"} <= ops
    _close(outputs(model, inputs)[0], c(*inputs))
