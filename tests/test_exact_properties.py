"""Property: every exact clean-up / fusion pass (and cross-layer equalization), alone and all in
sequence (any order), keeps the outputs of random conv / BN / linear / activation stacks, and of
every model in the test zoo."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from fxcompress.testing import run_pass
from fxcompress.trace import trace
from _passes_util import (assert_same_outputs, assert_untouched, call_module_types, outputs, randomize_bn,
                          snapshot)
from passes.cleanup import EliminateDeadCode, FoldConstants, RemoveDropout, RemoveIdentity
from passes.fuse import FoldBatchNorm
from passes.quantize.equalize import EqualizeCrossLayer

EXACT_PASSES = (EliminateDeadCode(), RemoveDropout(), RemoveIdentity(), FoldConstants(), FoldBatchNorm(),
                EqualizeCrossLayer())
BIT_EXACT = (EliminateDeadCode, RemoveDropout, RemoveIdentity)   # they only drop no-ops: same bits


# --------------------------------------------------------------------------- building blocks

class Residual(nn.Module):
    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SharedOutput(nn.Module):
    """``bn(p(x)) + p(x)``: the producer's output has two users, so the BN cannot be folded."""

    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.producer, self.bn = producer, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.producer(x)
        return self.bn(y) + y


class Scale(nn.Module):
    """``x * exp(s)`` per channel: a parameter-only subgraph for FoldConstants."""

    def __init__(self, channels: int, rank: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(channels) * 0.3)
        self.shape = (1, channels) + (1,) * (rank - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.exp().reshape(self.shape)


class Noops(nn.Module):
    """``x * 1``, ``.contiguous()`` and functional eval dropout: all removable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout((x * 1).contiguous(), 0.3, training=self.training)


class Pool(nn.Module):
    """(N, C, ...) -> (N, C) by averaging the spatial dims."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.dims = tuple(range(2, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x.mean(dim=self.dims), 1)


# --------------------------------------------------------------------------- random stacks

RANK = {"2d": 4, "1d": 3, "flat": 2}
SIMPLE = ("bn", "relu", "gelu", "dropout", "identity", "residual", "shared", "scale", "noops")
OPS = {"2d": ("conv", "convT", *SIMPLE, "pool"), "1d": ("conv", *SIMPLE, "pool"), "flat": ("linear", *SIMPLE)}


@st.composite
def stacks(draw: Any) -> tuple[str, int, list[tuple[Any, ...]], int]:
    """(input kind, input channels, layer specs, seed): specs are plain tuples so failures print."""
    kind = start_kind = draw(st.sampled_from(sorted(RANK)))
    channels = start = draw(st.sampled_from([2, 4, 6]))
    specs: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 7))):
        op = draw(st.sampled_from(OPS[kind]))
        if op in ("conv", "convT", "linear"):
            out = draw(st.sampled_from([2, 4, 6, 8]))
            groups = draw(st.sampled_from([1, 2])) if op != "linear" else 1
            k = draw(st.sampled_from([1, 3] if op == "conv" else [1, 2]))
            specs.append((op, channels, out, k, groups, draw(st.booleans())))
            channels = out
        elif op == "pool":
            specs.append((op,))
            kind = "flat"
        else:
            specs.append((op, channels, kind))
    return start_kind, start, specs, draw(st.integers(0, 2**16))


def _producer(op: str, cin: int, cout: int, k: int, groups: int, bias: bool, kind: str) -> nn.Module:
    if op == "linear":
        return nn.Linear(cin, cout, bias=bias)
    if op == "convT":
        return nn.ConvTranspose2d(cin, cout, k, groups=groups, bias=bias)
    conv = nn.Conv2d if kind == "2d" else nn.Conv1d
    return conv(cin, cout, k, padding=k // 2, groups=groups, bias=bias)


def _bn(channels: int, kind: str) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "2d" else nn.BatchNorm1d(channels)


def build(start_kind: str, start: int, specs: list[tuple[Any, ...]], seed: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    kind = start_kind
    for spec in specs:
        op = spec[0]
        if op in ("conv", "convT", "linear"):
            layers += [_producer(*spec, kind=kind), _bn(spec[2], kind)]
        elif op == "pool":
            layers.append(Pool(RANK[kind]))
            kind = "flat"
        else:
            c = spec[1]
            same = (nn.Linear(c, c) if kind == "flat" else _producer("conv", c, c, 3, 1, True, kind))
            layers.append({
                "bn": lambda: _bn(c, kind), "relu": nn.ReLU, "gelu": nn.GELU,
                "dropout": lambda: nn.Dropout(0.5),
                "identity": nn.Identity, "residual": lambda: Residual(same, _bn(c, kind)),
                "shared": lambda: SharedOutput(same, _bn(c, kind)), "scale": lambda: Scale(c, RANK[kind]),
                "noops": Noops,
            }[op]())
    model = nn.Sequential(*layers).eval()
    randomize_bn(model, torch.Generator().manual_seed(seed))
    shape = {"2d": (2, start, 5, 5), "1d": (2, start, 8), "flat": (3, start)}[start_kind]
    return model, (torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1)),)


def foldable_pairs(specs: list[tuple[Any, ...]]) -> int:
    """BatchNorms ``fold-batchnorm`` may fold in the traced stack: each producer's own BN and, since
    a folded producer is again a producer, every ``bn`` layer chained right after it
    (Linear -> BN -> BN folds twice), plus the BN inside each residual body."""
    count, after_producer = 0, False
    for spec in specs:
        op = spec[0]
        if op in ("conv", "convT", "linear"):
            count, after_producer = count + 1, True
        elif op == "bn" and after_producer:
            count += 1
        else:
            count += op == "residual"
            after_producer = False
    return count


def _bn_nodes(gm: torch.fx.GraphModule) -> int:
    return sum(v for k, v in call_module_types(gm).items() if k.startswith("BatchNorm"))


@settings(max_examples=20)
@given(stacks(), st.permutations(range(len(EXACT_PASSES))))
@example(("flat", 2, [("linear", 2, 2, 1, 1, False), ("bn", 2, "flat")], 0), list(range(len(EXACT_PASSES))))
@example(("2d", 4, [("conv", 4, 6, 3, 2, True), ("bn", 6, "2d"), ("bn", 6, "2d"), ("relu", 6, "2d"),
                     ("bn", 6, "2d")], 7), list(range(len(EXACT_PASSES)))[::-1])
def test_exact_passes_preserve_random_stacks(stack: tuple, order: list[int]) -> None:
    model, inputs = build(*stack)
    before = snapshot(model)
    base = trace(model, inputs, frontend="fx")
    foldable = foldable_pairs(stack[2])
    for p in EXACT_PASSES:
        res = run_pass(p, base, inputs, check=False)  # outputs are checked below
        assert_same_outputs(model, res.graph, inputs, exact=isinstance(p, BIT_EXACT))
        if isinstance(p, FoldBatchNorm):   # every producer -> BN pair (chains included), and only those
            assert len(res.stats["folded"]) == foldable, res.stats
            assert _bn_nodes(res.graph) == len(res.stats["skipped"]) == _bn_nodes(base) - foldable

    gm = base
    for i in order:
        prev = outputs(gm, inputs)
        res = run_pass(EXACT_PASSES[i], gm, inputs, check=False)
        gm = res.graph
        assert_same_outputs(model, gm, inputs)
        if isinstance(EXACT_PASSES[i], BIT_EXACT):
            assert all(map(torch.equal, outputs(gm, inputs), prev))
        if isinstance(EXACT_PASSES[i], FoldBatchNorm):
            assert _bn_nodes(gm) == len(res.stats["skipped"])
    types = call_module_types(gm)
    assert not {"Dropout", "Identity"} & set(types)
    assert "dropout" not in str(gm.code)
    assert_untouched(model, before)


# --------------------------------------------------------------------------- the zoo

try:
    from zoo import ZOO
except ImportError:  # pragma: no cover - the zoo lives beside these tests
    ZOO = {}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_exact_passes_preserve_zoo_models(name: str) -> None:

    model, inputs = ZOO[name]()
    before = snapshot(model)
    gm = trace(model, inputs)
    bns = _bn_nodes(gm)
    folded = 0
    for p in EXACT_PASSES:
        prev = outputs(gm, inputs)
        res = run_pass(p, gm, inputs, check=False)
        gm = res.graph
        assert_same_outputs(model, gm, inputs)
        if isinstance(p, BIT_EXACT):
            assert all(map(torch.equal, outputs(gm, inputs), prev)), p
        if isinstance(p, FoldBatchNorm):
            folded = len(res.stats["folded"])
            assert _bn_nodes(gm) == len(res.stats["skipped"]) == bns - folded
    assert not {"Dropout", "Identity"} & set(call_module_types(gm))
    assert_untouched(model, before)
