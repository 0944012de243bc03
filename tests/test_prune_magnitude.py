"""PruneMagnitude: exact sparsity per layer / globally, head exclusion, permanence, ONNX."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule, symbolic_trace
from torch.nn.utils.prune import l1_unstructured

import fxcompress as fxc
from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.errors import PipelineError
from fxcompress.pass_base import PassContext
from fxcompress.testing import run_pass
from fxcompress.pipeline import Pipeline
from fxcompress.verify import propagate_shapes
from passes import PruneMagnitude
from passes.prune._common import head_layers
from zoo import ZOO


def run(name: str, p: PruneMagnitude):
    model, inputs = ZOO[name]()
    return model, inputs, run_pass(p, model, inputs)


def weights(gm: GraphModule, types=(nn.Conv2d, nn.Conv1d, nn.Linear)) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in gm.named_modules() if isinstance(m, types)}


@settings(max_examples=12, deadline=None)
@given(amount=st.floats(0.0, 1.0), name=st.sampled_from(["resnet_basic", "transformer_block", "audio_conv1d"]))
def test_layer_scope_sparsity_is_exact_per_layer(amount: float, name: str) -> None:
    model, _, result = run(name, PruneMagnitude(amount=amount, scope="layer"))
    assert set(result.stats["layers"]) == set(weights(result.graph)) - head_layers(result.graph)
    for path, w in weights(result.graph).items():
        zeros, n = int((w == 0).sum()), w.numel()
        if path in result.stats["layers"]:
            assert abs(zeros - amount * n) <= 1, (path, zeros, amount * n)
        else:  # the classifier head stays dense
            assert zeros == 0


@settings(max_examples=8, deadline=None)
@given(amount=st.floats(0.0, 1.0))
def test_global_scope_one_threshold(amount: float) -> None:
    _, _, result = run("resnet_bottleneck", PruneMagnitude(amount=amount, scope="global"))
    ws = [weights(result.graph)[p] for p in result.stats["layers"]]
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert abs(zeros - amount * total) <= 1
    # one threshold: every surviving weight is at least as large as every removed one
    kept = torch.cat([w[w != 0].abs() for w in ws])
    model, _ = ZOO["resnet_bottleneck"]()
    orig = dict(model.named_modules())
    removed = torch.cat([orig[p].weight.detach()[w == 0].abs() for p, w in zip(result.stats["layers"], ws)])
    if len(kept) and len(removed):
        assert kept.min() >= removed.max()
    assert result.stats["selected_sparsity"] == pytest.approx(zeros / total)


def test_global_differs_from_layer_and_keeps_smallest_layers_denser() -> None:
    _, _, layer = run("resnet_basic", PruneMagnitude(amount=0.6, scope="layer"))
    _, _, glob = run("resnet_basic", PruneMagnitude(amount=0.6, scope="global"))
    per_layer = [v["weight_sparsity"] for v in layer.stats["layers"].values()]
    per_glob = [v["weight_sparsity"] for v in glob.stats["layers"].values()]
    assert max(abs(s - 0.6) for s in per_layer) < 0.01
    assert max(per_glob) - min(per_glob) > 0.05


def test_zeros_are_permanent_and_outputs_change_only_through_weights() -> None:
    model, inputs, result = run("resnet_basic", PruneMagnitude(amount=0.5))
    gm = result.graph
    assert type(gm.get_submodule("layers.0.conv1").weight) is nn.Parameter
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in gm.modules())
    assert not any("mask" in n for n, _ in gm.named_buffers())
    assert all(p.requires_grad for p in gm.parameters())
    # the user's model is untouched
    assert int((model.layers[0].conv1.weight == 0).sum()) == 0
    onnx_model = export_onnx(gm, inputs)
    torch.testing.assert_close(OrtRunner(onnx_model)(*inputs), gm(*inputs), rtol=1e-4, atol=1e-4)
    s = result.stats
    assert s["active_params"] == s["total_params"] - s["pruned_params"]
    assert s["sparsity"] == pytest.approx(s["pruned_params"] / s["total_params"])
    assert s["params_after"] == s["params_before"]


def test_per_layer_stats_counted_by_hand() -> None:
    """Linear(4, 6) loses 12 of its 24 weights (its 6 biases stay); the head Linear(6, 3) is dense;
    batch 2, so MACs are 2 * 4 * 6 and 2 * 6 * 3 and do not change (zeros are still multiplied)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    inputs = (torch.randn(2, 4),)
    gm = propagate_shapes(symbolic_trace(copy.deepcopy(model)), inputs)
    s = PruneMagnitude(amount=0.5).run(gm, PassContext(inputs)).stats
    assert set(s["layers"]) == {"0"} and "classifier head" in s["skipped"]["2"]
    row = s["layers"]["0"]
    assert row["kind"] == "Linear"
    assert (row["params_before"], row["params_after"], row["active_params"], row["pruned_params"]) == (30, 30, 18, 12)
    assert row["sparsity"] == pytest.approx(12 / 30) and row["compression_ratio"] == pytest.approx(30 / 18)
    assert (row["weight_zeros"], row["weight_sparsity"]) == (12, 0.5)
    assert (row["macs_before"], row["macs_after"]) == (2 * 4 * 6, 2 * 4 * 6)
    total = 30 + 6 * 3 + 3
    assert (s["params_before"], s["params_after"], s["active_params"], s["pruned_params"]) == \
        (total, total, total - 12, 12)
    assert s["sparsity"] == pytest.approx(12 / total) and s["compression_ratio"] == pytest.approx(total / (total - 12))
    assert (s["macs_before"], s["macs_after"]) == (2 * (4 * 6 + 6 * 3),) * 2


def test_selection_by_type_pattern_and_head() -> None:
    _, _, r = run("resnet_basic", PruneMagnitude(amount=0.5, types=("Linear",), exclude_head=False))
    assert list(r.stats["layers"]) == ["fc"]
    _, _, r = run("resnet_basic", PruneMagnitude(amount=0.5, include=("layers.1.*",), exclude=("*downsample*",)))
    assert sorted(r.stats["layers"]) == ["layers.1.conv1", "layers.1.conv2"]
    assert r.stats["skipped"]["layers.1.downsample.0"] == "excluded by pattern"
    assert "classifier head" in r.stats["skipped"]["fc"]
    assert head_layers(run("leaf_mha_lstm", PruneMagnitude(amount=0.0))[2].graph) == {"head.2"}
    # a residual sum feeds the output: no single layer is the head
    assert head_layers(run("transformer_block", PruneMagnitude(amount=0.0))[2].graph) == set()


def test_pipeline_string_and_validation() -> None:
    (p,) = Pipeline.parse("prune-magnitude{amount=0.8,scope=global}").leaves()
    assert p == PruneMagnitude(amount=0.8, scope="global")
    assert str(p) == "prune-magnitude{amount=0.8,scope=global}"
    with pytest.raises(PipelineError):
        PruneMagnitude(amount=1.5)
    with pytest.raises(PipelineError):
        Pipeline.parse("prune-magnitude{scope=everything}")


def _two_layer() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3)).eval(), (torch.randn(2, 10),)


def test_repeat_prunes_the_remaining_weights_as_torch_prune_does() -> None:
    """``amount`` is relative to the unpruned weights (torch.nn.utils.prune's convention): two
    rounds of 0.2 zero 40 + 32 of 200 weights, the same ones two ``l1_unstructured`` calls zero."""
    model, inputs = _two_layer()
    compiled = fxc.compile(model, inputs, "repeat{n=2}(prune-magnitude{amount=0.2})", target="fx", progress=False)
    rows = [r for r in compiled.report if "prune-magnitude" in r.name]
    assert [r.status for r in rows] == ["ok", "ok"]
    ours = compiled.graph_module.get_submodule("0").weight
    reference = copy.deepcopy(model[0])
    l1_unstructured(reference, "weight", 0.2)
    l1_unstructured(reference, "weight", 0.2)
    assert int((ours == 0).sum()) == int((reference.weight == 0).sum()) == 200 - int(200 * 0.8 * 0.8)
    assert torch.equal(ours == 0, reference.weight == 0)
    assert int((model[0].weight == 0).sum()) == 0


def test_zeros_already_there_count_as_pruned_and_nothing_to_prune_is_reported() -> None:
    model, inputs = _two_layer()
    gm = propagate_shapes(symbolic_trace(copy.deepcopy(model)), inputs)
    with torch.no_grad():
        gm.get_submodule("0").weight[:5] = 0  # 50 of 200 already zero
    r = PruneMagnitude(amount=0.5, scope="global").run(gm, PassContext(inputs))
    assert (r.stats["already_zero"], r.stats["newly_pruned"]) == (50, 75)
    assert int((r.graph.get_submodule("0").weight == 0).sum()) == 125
    again = PruneMagnitude(amount=0.001).run(r.graph, PassContext(inputs))
    assert again.stats["newly_pruned"] == 0
    assert any("nothing pruned" in d.message and "75 remaining" in d.message for d in again.diagnostics)


def test_repeated_nm_is_unchanged_and_says_the_layout_is_reached() -> None:
    """N:M is a layout, not an amount: the second round keeps every weight (status "unchanged")."""
    torch.manual_seed(0)
    model, inputs = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval(), (torch.randn(2, 8),)
    compiled = fxc.compile(model, inputs, "repeat{n=2}(prune-nm)", target="fx", progress=False)
    rows = [r for r in compiled.report if "prune-nm" in r.name]
    assert [r.status for r in rows] == ["ok", "unchanged"]
    assert not any("already 2:4" in d["message"] for d in rows[0].diagnostics)
    assert any("already 2:4" in d["message"] and d["node"] == "0" for d in rows[1].diagnostics)
    w = compiled.graph_module.get_submodule("0").weight
    assert int((w == 0).sum()) == w.numel() // 2
