"""PruneChannels through ShuffleNetV2: chunk/split/tensor_split along channels, cat of a
pass-through half and a computed half, and the channel shuffle (view-transpose-view).

The analysis maps every removed channel through the shuffle (position ``i`` of the pass-through
half and of the computed half form one unit), and the selection keeps every split piece at
``1 - ratio`` of its units at least, so chained units stay balanced and no piece is emptied.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.fx import GraphModule, symbolic_trace

import fxcompress as fxc
from fxcompress.stats import graph_stats
from fxcompress.testing import run_pass
from fxcompress.verify import propagate_shapes
from passes import PruneChannels
from passes.prune.depgraph import DependencyGraph, dependency_graph
from passes.prune.importance import class_importance
from passes.prune.rewrite import apply_removal
from zoo import ZOO, ShuffleV2Unit, TinyShuffleNetV2, _build, channel_shuffle

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _traced(model: nn.Module, inputs: tuple[Tensor, ...]) -> GraphModule:
    return propagate_shapes(symbolic_trace(copy.deepcopy(model)), inputs)


def _prune(model: nn.Module, inputs: tuple[Tensor, ...], p: PruneChannels):  # type: ignore[no-untyped-def]
    return run_pass(p, model, inputs)


def _out(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    with torch.no_grad():
        return model(*inputs)


def _zero_removed(gm: GraphModule, dg: DependencyGraph, removed: np.ndarray) -> None:
    """Zero every parameter position of the removed classes (BatchNorm variance set to 1)."""
    params = dict(gm.named_parameters())
    with torch.no_grad():
        for s in dg.slices:
            pos = np.nonzero(removed[dg.comp[s.labels]])[0]
            if len(pos):
                name = f"{s.owner}.{s.param}"
                t = params[name] if name in params else gm.get_buffer(name)
                t.index_fill_(s.dim, torch.as_tensor(pos), 1.0 if s.param == "running_var" else 0.0)


def _removal_is_exact(gm: GraphModule, inputs: tuple[Tensor, ...], p: PruneChannels) -> np.ndarray:
    """Select with ``p``, zero the removed channels, remove them: the outputs must not change."""
    dg = dependency_graph(gm)
    scores, _ = class_importance(gm, dg, "l2")
    removed, _ = p.select(dg, scores)
    _zero_removed(gm, dg, removed)
    expected = _out(gm, inputs)
    apply_removal(gm, dg, removed)
    gm.recompile()  # called directly here, not through the manager
    propagate_shapes(gm, inputs)
    torch.testing.assert_close(_out(gm, inputs), expected, **TOL)
    return removed


def _split_sizes(gm: GraphModule) -> list[list[int]]:
    """Section sizes of every ``split`` (the pruned form of ``chunk``/``tensor_split``)."""
    return [list(n.args[1]) for n in gm.graph.nodes if n.target in ("split", torch.split)]


def test_ratio_half_prunes_every_width_to_the_half_width_network() -> None:
    """At ratio 0.5 every width halves (stem, both branches, the shuffled pass-through half, the
    1x1-dw-1x1 intermediate, conv5): the pruned graph has exactly the parameters and MACs of the
    same network built at half width (classifier outputs kept): 5938 -> 2030 params (0.342x),
    177792 -> 75584 MACs (0.425x)."""
    model, inputs = ZOO["shufflenet_v2"]()
    result = _prune(model, inputs, PruneChannels(ratio=0.5))
    half = TinyShuffleNetV2(stem=4, widths=(8, 16), last=32)
    expected = graph_stats(_traced(half, inputs))
    s = result.stats
    assert (s["params_before"], s["macs_before"]) == (5938, 177792)
    assert (s["params_after"], s["macs_after"]) == (expected.params, expected.macs) == (2030, 75584)
    assert [m.out_channels for m in result.graph.modules() if isinstance(m, nn.Conv2d)] == \
        [m.out_channels for m in half.modules() if isinstance(m, nn.Conv2d)]
    assert _split_sizes(result.graph) == [[4, 4], [4, 4], [8, 8]]  # every chunk stays balanced
    assert not any("kept_for_sections" in g for g in s["groups"])
    assert s["unpruned"] == {"fc": "reaches the model output 'fc' (its shape must not change)"}


@pytest.mark.parametrize("build", [
    lambda: ZOO["shufflenet_v2"](),
    lambda: _build(lambda: nn.Sequential(ShuffleV2Unit(8, 16, 2), ShuffleV2Unit(16, 16, 1),
                                         ShuffleV2Unit(16, 16, 1), nn.Conv2d(16, 4, 1)), (2, 8, 8, 8), seed=20),
], ids=["zoo", "units"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_zeroed_channels_are_removed_exactly(build, ratio: float) -> None:  # type: ignore[no-untyped-def]
    """Zero every parameter position of the channels the pass removes (producer rows, BatchNorm
    affine and statistics, consumer columns): the pruned graph then computes the same outputs."""
    model, inputs = build()
    gm = _traced(model, inputs)
    classes = sum(len(g.classes) for g in dependency_graph(gm).groups if g.prunable)
    removed = _removal_is_exact(gm, inputs, PruneChannels(ratio=ratio))
    assert removed.sum() >= (ratio - 0.15) * classes
    assert sum(p.numel() for p in gm.parameters()) < (1.0 - ratio / 2) * sum(p.numel() for p in model.parameters())


def test_zero_branch_intermediate_channels_are_the_ones_removed_exactly() -> None:
    """The 1x1 -> depthwise -> 1x1 intermediate width is prunable on its own. Channels zeroed in
    the user's model (1x1 row, both BatchNorms' affine) score 0, are exactly the ones removed, and
    the pruned model equals the zeroed one within float tolerance."""
    model, inputs = ZOO["shufflenet_v2"]()
    zeroed: dict[str, list[int]] = {}
    with torch.no_grad():
        for path, unit in model.named_modules():
            if isinstance(unit, ShuffleV2Unit):
                width = unit.branch2[0].out_channels
                channels = list(range(1, width, 2))  # every other channel
                zeroed[f"{path}.branch2.0"] = channels
                unit.branch2[0].weight[channels] = 0
                for bn in (unit.branch2[1], unit.branch2[4]):
                    bn.weight[channels] = 0
                    bn.bias[channels] = 0
    result = _prune(model, inputs, PruneChannels(ratio=0.0, ratios={"*.branch2.0": 0.5}))
    for path, channels in zeroed.items():
        width = result.stats["layers"][path]["channels_before"]
        assert result.stats["layers"][path]["kept"] == [c for c in range(width) if c not in channels], path
        assert result.stats["layers"][path[:-1] + "3"]["channels_after"] == width // 2
    assert result.stats["params_after"] < result.stats["params_before"]
    torch.testing.assert_close(_out(result.graph, inputs), _out(model, inputs), **TOL)


def test_pruned_shufflenet_exports_and_runs_in_onnxruntime(golden) -> None:  # type: ignore[no-untyped-def]
    model, inputs = ZOO["shufflenet_v2"]()
    before = copy.deepcopy(model.state_dict())
    compiled = fxc.compile(model, inputs, "prune-channels{ratio=0.5}", target="onnxruntime")
    row = next(r for r in compiled.report if r.name == "prune-channels")
    assert row.status == "ok" and row.stats["params_after"] == 2030
    torch.testing.assert_close(compiled(*inputs), _out(compiled.graph_module, inputs), rtol=1e-4, atol=1e-5)
    bigger = tuple(torch.cat([t, t, t]) for t in inputs)  # the batch stays dynamic
    torch.testing.assert_close(compiled(*bigger), _out(compiled.graph_module, bigger), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the user's model changed"
    golden.check(compiled.graph_module, "prune_channels_shufflenet_v2")


class SplitHeads(nn.Module):
    """A stem whose 6 channels ``tensor_split`` cuts into two pieces of 3, each with its own conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        p, q = torch.relu(self.stem(x)).tensor_split(2, dim=1)
        return self.a(p) + self.b(q)


def test_a_split_piece_keeps_its_share_even_when_all_its_channels_score_lowest() -> None:
    """Ranking alone would remove the whole second piece (its stem channels are zero) and feed
    ``b`` nothing. Each piece keeps ceil(3 * (1 - 0.5)) = 2 of its 3 channels instead, so one
    channel fewer than the ratio asks is removed, and the group's record says so and where."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SplitHeads().eval()
    with torch.no_grad():
        model.stem.weight[3:] = 0
        model.stem.bias[3:] = 0
    inputs = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),)
    result = _prune(model, inputs, PruneChannels(ratio=0.5))
    kept = result.stats["layers"]["stem"]["kept"]
    assert len([c for c in kept if c < 3]) == 2
    assert [c for c in kept if c >= 3] == [4, 5]  # ties among the zero channels: the lowest index goes first
    group = next(g for g in result.stats["groups"] if "stem" in g["layers"])
    assert (group["units_after"], group["kept_for_sections"], group["sections"]) == (4, 1, ["tensor_split"])
    assert _split_sizes(result.graph) == [[2, 2]] and result.graph.a.in_channels == result.graph.b.in_channels == 2
    assert _out(result.graph, inputs).shape == (2, 4, 6, 6)


def _reshape_permute_reshape(x: Tensor, g: int) -> Tensor:
    b, c, h, w = x.shape
    return x.reshape(b, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)


SHUFFLES = {
    "view-transpose-view": channel_shuffle,
    "reshape-permute-reshape": _reshape_permute_reshape,
    "unflatten-transpose-flatten": lambda x, g: x.unflatten(1, (g, -1)).transpose(1, 2).flatten(1, 2),
}


class ShuffleSpelling(nn.Module):
    """Two conv branches concatenated, shuffled in ``groups`` groups by one of several spellings."""

    def __init__(self, spelling: str, groups: int) -> None:
        super().__init__()
        self.spelling, self.groups = spelling, groups
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.b = nn.Conv2d(3, 12, 1)
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        return self.head(SHUFFLES[self.spelling](y, self.groups))


@pytest.mark.parametrize("spelling", list(SHUFFLES))
@pytest.mark.parametrize("groups", [2, 3, 4])
def test_shuffle_spellings_and_group_counts_prune_exactly(spelling: str, groups: int) -> None:
    """Each shuffle group keeps the same channels (position i of every group is one unit), so the
    pruned shuffle is the original one restricted to the kept units: zeroed channels go exactly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(groups)
        model = ShuffleSpelling(spelling, groups).eval()
    inputs = (torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(7)),)
    gm = _traced(model, inputs)
    removed = _removal_is_exact(gm, inputs, PruneChannels(ratio=0.5))
    assert removed.sum() == 24 // groups // 2  # units span one channel of every group
    assert gm.head.in_channels == 24 - 24 // 2 and gm.a.out_channels + gm.b.out_channels == 12


@settings(max_examples=6, derandomize=True, deadline=None)
@given(stem=st.sampled_from([4, 6, 8]), widths=st.lists(st.sampled_from([8, 12, 16]), min_size=1, max_size=2),
       repeats=st.lists(st.integers(1, 3), min_size=2, max_size=2), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       round_to=st.sampled_from([1, 2]))
def test_random_shufflenets_prune_exactly_and_never_empty_a_piece(stem: int, widths: list[int], repeats: list[int],
                                                                  ratio: float, round_to: int) -> None:
    model, inputs = _build(lambda: TinyShuffleNetV2(stem, tuple(widths), tuple(repeats[:len(widths)]), 16),
                           (2, 3, 16, 16), seed=stem + sum(widths))
    gm = _traced(model, inputs)
    removed = _removal_is_exact(gm, inputs, PruneChannels(ratio=ratio, round_to=round_to))
    assert removed.any()
    assert all(min(sizes) >= 1 for sizes in _split_sizes(gm))
