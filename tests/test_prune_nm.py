"""PruneNM: the N:M pattern along input channels, skipped layers, check_nm, ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import symbolic_trace

from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.errors import PipelineError
from fxcompress.pass_base import PassContext
from fxcompress.testing import run_pass
from fxcompress.verify import propagate_shapes
from passes import PruneNM
from passes.prune.nm import check_nm, nm_groups
from zoo import ZOO


def run(name: str, p: PruneNM):
    model, inputs = ZOO[name]()
    return model, inputs, run_pass(p, model, inputs)


@pytest.mark.parametrize("name", ["resnet_bottleneck", "transformer_block", "audio_conv1d"])
def test_two_four_pattern(name: str) -> None:
    model, inputs, result = run(name, PruneNM())
    mods = dict(result.graph.named_modules())
    assert result.stats["layers"], result.stats
    for path in result.stats["layers"]:
        w = mods[path].weight.detach()
        assert check_nm(w, 2, 4)
        groups = nm_groups(w, 4)
        assert bool(((groups == 0).sum(1) >= 2).all())  # every group of 4 has at least 2 zeros
        orig = dict(model.named_modules())[path].weight.detach()
        # the two kept weights of a group are its two largest in magnitude
        og = nm_groups(orig, 4).abs()
        kept_min = torch.where(groups != 0, og, torch.inf).min(1).values
        dropped_max = torch.where(groups == 0, og, -torch.inf).max(1).values
        assert bool((kept_min >= dropped_max).all())
    for path, reason in result.stats["skipped"].items():
        assert "multiple of m=4" in reason or "classifier head" in reason
    onnx_model = export_onnx(result.graph, inputs)
    torch.testing.assert_close(OrtRunner(onnx_model)(*inputs), result.graph(*inputs), rtol=1e-4, atol=1e-4)


def test_layers_with_indivisible_channels_are_skipped() -> None:
    _, _, result = run("audio_conv1d", PruneNM())
    assert "features.0" in result.stats["skipped"]  # 1 input channel
    assert "fc" in result.stats["skipped"]
    assert sorted(result.stats["layers"]) == ["features.4", "features.7"]
    assert result.stats["layers"]["features.4"]["sparsity"] == pytest.approx(0.5)


def test_per_layer_stats_counted_by_hand() -> None:
    """2:4 on Linear(8, 4): 16 of its 32 weights become zero, its 4 biases stay; the head
    Linear(4, 2) is dense. Batch 3: MACs 3 * 8 * 4 and 3 * 4 * 2, unchanged by sparsity."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    inputs = (torch.randn(3, 8),)
    gm = propagate_shapes(symbolic_trace(copy.deepcopy(model)), inputs)
    s = PruneNM().run(gm, PassContext(inputs)).stats
    assert set(s["layers"]) == {"0"}
    row = s["layers"]["0"]
    assert (row["params_before"], row["params_after"], row["active_params"], row["pruned_params"]) == (36, 36, 20, 16)
    assert row["sparsity"] == pytest.approx(16 / 36) and row["compression_ratio"] == pytest.approx(36 / 20)
    assert (row["weight_zeros"], row["weight_sparsity"]) == (16, 0.5)
    assert (row["macs_before"], row["macs_after"]) == (3 * 8 * 4, 3 * 8 * 4)
    total = 36 + 4 * 2 + 2
    assert (s["total_params"], s["active_params"], s["macs_before"]) == (total, total - 16, 3 * (8 * 4 + 4 * 2))


def test_group_layout_is_input_channels_per_kernel_position() -> None:
    w = torch.zeros(2, 8, 3, 3)
    w[0, 0:4, 1, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, 4:8, 0, 2] = torch.tensor([5.0, 0.5, 6.0, 0.1])
    assert not check_nm(w, 2, 4)
    model = nn.Sequential(nn.Conv2d(8, 2, 3))
    with torch.no_grad():
        model[0].weight.copy_(w)
    gm = propagate_shapes(symbolic_trace(model), (torch.randn(1, 8, 5, 5),))
    result = PruneNM(exclude_head=False).run(gm, PassContext((torch.randn(1, 8, 5, 5),)))
    new = result.graph.get_submodule("0").weight.detach()
    assert check_nm(new, 2, 4)
    assert new[0, 0:4, 1, 1].tolist() == [0.0, 0.0, 3.0, 4.0]
    assert new[1, 4:8, 0, 2].tolist() == [5.0, 0.0, 6.0, 0.0]


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3), m=st.sampled_from([4, 8]), out=st.integers(1, 4), groups=st.integers(1, 3))
def test_check_nm_property(n: int, m: int, out: int, groups: int) -> None:
    if n >= m:
        return
    layer = nn.Linear(m * groups, out)
    gm = symbolic_trace(nn.Sequential(layer))
    x = torch.randn(2, m * groups)
    result = PruneNM(n=n, m=m, exclude_head=False).run(propagate_shapes(gm, (x,)), PassContext((x,)))
    w = result.graph.get_submodule("0").weight.detach()
    assert check_nm(w, n, m)
    assert int((w != 0).sum()) == out * groups * n
    if n + 1 < m:
        assert not check_nm(layer.weight.detach(), n, m) or int((layer.weight == 0).sum()) > 0


def test_validation() -> None:
    with pytest.raises(PipelineError):
        PruneNM(n=4, m=4)
    with pytest.raises(PipelineError, match="no N:M layout"):
        PruneNM(types=("ConvTranspose2d",))
    assert not check_nm(torch.ones(3, 6), 2, 4)  # 6 input channels: not a multiple of 4
