"""Exactness judged against float32's own error (``verify.check_exact``) and the first divergent
node found through each node's counterpart (``verify.first_divergent_node``).

Deep conv-BN-ReLU stacks with realistic and extreme BatchNorm statistics must pass
``fold-batchnorm`` through the pipeline; deliberately broken folds must still be rejected, naming
the broken layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress import verify
from fxcompress.pass_base import PassContext, PassResult
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes.fuse import FoldBatchNorm

PROPERTY = settings(derandomize=True, max_examples=3, deadline=None, database=None)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny tensors: intra-op threads only add overhead (and stall on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Block(nn.Module):
    def __init__(self, channels: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        return x + y if self.residual else y


class Stack(nn.Module):
    """``depth`` conv-BN-ReLU blocks between a stem conv and a linear head."""

    def __init__(self, depth: int, channels: int, residual: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(channels, residual) for _ in range(depth)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def realistic_stats(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """Trained-looking affine parameters, then running statistics re-estimated on random inputs
    (train-mode forwards) so every BatchNorm output has a scale of about 1; returns eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.reset_running_stats()
                m.momentum = None
        model.train()
        for _ in range(2):
            model(torch.randn(x.shape, generator=gen))
    return model.eval()


def extreme_stats(model: nn.Module, seed: int) -> nn.Module:
    """The same function in exact arithmetic, computed at float32's edge: tiny running variances
    (down to 1e-6, below eps) and means 1e3 standard deviations away, with gamma and beta
    compensating (the BatchNorm's float32 arithmetic cancels large terms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                old_scale = m.weight / torch.sqrt(m.running_var + m.eps)
                var = m.running_var * 10.0 ** -torch.randint(3, 7, (c,), generator=gen).float()
                shift = 1e3 * torch.sqrt(m.running_var) * torch.randn(c, generator=gen)
                new_scale_unit = 1 / torch.sqrt(var + m.eps)
                m.weight.copy_(old_scale / new_scale_unit)
                m.bias.add_(shift * old_scale)
                m.running_mean.add_(shift)
                m.running_var.copy_(var)
    return model


def deep_stack(depth: int, channels: int, residual: bool, extreme: bool, seed: int
               ) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    model = Stack(depth, channels, residual)
    x = torch.randn(2, 3, 6, 6)
    realistic_stats(model, x, seed)
    if extreme:
        extreme_stats(model, seed)
    return model, (x,)


def fold_row(compiled: Any) -> Any:
    return next(r for r in compiled.report if r.name.startswith("fold-batchnorm") or "broken-fold" in r.name)


@PROPERTY
@given(depth=st.integers(50, 56), channels=st.sampled_from([4, 8]), residual=st.booleans(),
       extreme=st.booleans(), seed=st.integers(0, 2**16))
@example(depth=50, channels=8, residual=False, extreme=False, seed=1)
@example(depth=50, channels=8, residual=True, extreme=False, seed=2)
@example(depth=50, channels=8, residual=False, extreme=True, seed=3)
@example(depth=50, channels=8, residual=True, extreme=True, seed=4)
def test_fold_batchnorm_accepted_on_deep_stacks(depth: int, channels: int, residual: bool, extreme: bool,
                                                 seed: int) -> None:
    model, inputs = deep_stack(depth, channels, residual, extreme, seed)
    compiled = fxc.compile(model, inputs, "fold-batchnorm", target="fx")
    row = fold_row(compiled)
    assert row.status == "ok" and len(row.stats["folded"]) == depth
    assert not any(isinstance(m, nn.BatchNorm2d) for m in compiled.graph_module.modules())
    with torch.no_grad():
        ref = verify.float64_values(trace(model, inputs), inputs)
        out = compiled.graph_module(*inputs)
        own = model(*inputs)
    scale = float(ref.abs().max())
    assert float((out.double() - ref).abs().max()) <= verify.EXACT_FACTOR * float((own.double() - ref).abs().max()) \
        + verify.FLOOR_RTOL * scale + verify.FLOOR_ATOL


def test_extreme_statistics_defeat_the_fixed_tolerance() -> None:
    """The case the rule exists for: float32 rounding alone exceeds rtol 1e-4/atol 1e-5."""
    model, inputs = deep_stack(50, 8, False, True, seed=3)
    gm = trace(model, inputs)
    folded = run_pass(FoldBatchNorm(), verify.propagate_shapes(gm, inputs), inputs).graph
    with torch.no_grad():
        old, new = gm(*inputs), folded(*inputs)
    assert not verify.allclose(old, new)
    verdict = verify.check_exact(gm, inputs, old, new)
    assert verdict.ok and verdict.float64, verdict


DEFECTS = ("wrong-eps", "dropped-bias", "transposed-scale", "reversed-scale", "off-by-one-channel")


def broken_fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, defect: str) -> nn.Conv2d:
    """``bn(conv(x))`` folded into one conv, wrongly by ``defect``."""
    w, b = conv.weight.detach().double(), conv.bias.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    eps = 1e-2 if defect == "wrong-eps" else bn.eps
    scale = gamma / torch.sqrt(var + eps)
    if defect == "reversed-scale":
        scale = scale.flip(0)
    if defect == "off-by-one-channel":
        scale = scale.roll(1)
    new = copy.deepcopy(conv)
    shape = (1, -1, 1, 1) if defect == "transposed-scale" else (-1, 1, 1, 1)
    new.weight = nn.Parameter((w * scale.reshape(shape)).float())
    bias = beta - mean * scale if defect == "dropped-bias" else (b - mean) * scale + beta
    new.bias = nn.Parameter(bias.float())
    return new


@fxc.register
@dataclass(frozen=True)
class BrokenFold(FoldBatchNorm):
    """``fold-batchnorm`` with one layer (``blocks.<layer>``) folded wrongly; still declared exact."""

    name: ClassVar[str] = "test-broken-fold"
    exact: ClassVar[bool] = True
    defect: str = "wrong-eps"
    layer: int = 25

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        block = gm.get_submodule(f"blocks.{self.layer}")
        wrong = broken_fold(block.conv, block.bn, self.defect)
        result = super().run(gm, ctx)
        block.conv = wrong
        return result


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("defect", DEFECTS)
def test_broken_fold_is_rejected_naming_the_broken_layer(defect: str, residual: bool) -> None:
    model, inputs = deep_stack(50, 8, residual, False, seed=1)
    with pytest.raises(fxc.PassVerificationError) as info:
        fxc.compile(model, inputs, [BrokenFold(defect=defect, layer=25)], target="fx")
    err = info.value
    assert err.pass_name == "test-broken-fold" and err.node == "blocks_25_conv", str(err).splitlines()[0]
    assert "first divergent node: 'blocks_25_conv'" in str(err)
    assert "error vs float64" in str(err) or "max abs change" in str(err)


def test_folded_conv_stands_for_the_batchnorm_it_absorbed() -> None:
    model, inputs = deep_stack(3, 4, True, False, seed=0)
    gm = verify.propagate_shapes(trace(model, inputs), inputs)
    result = FoldBatchNorm().run(copy.deepcopy(gm), PassContext(inputs))
    assert result.replaces == {f"blocks_{i}_conv": f"blocks_{i}_bn" for i in range(3)}
    inferred = verify.counterparts(gm, result.graph)
    explicit = verify.counterparts(gm, result.graph, result.replaces)
    for i in range(3):
        assert inferred[f"blocks_{i}_conv"] == explicit[f"blocks_{i}_conv"] == f"blocks_{i}_bn"
        assert explicit[f"blocks_{i}_relu"] == f"blocks_{i}_relu"
    assert explicit["stem"] == "stem" and explicit["output"] == "output"
    assert verify.first_divergent_node(gm, result.graph, inputs, result.replaces) is None


class Huge(nn.Module):
    """Unnormalized activations: BatchNorm scales each block by ~3, outputs reach ~1e12."""

    def __init__(self, depth: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(*[Block(8, False) for _ in range(depth)])
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.fill_(6.0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_huge_outputs_judged_relative_to_their_scale() -> None:
    model, inputs = Huge(), (torch.randn(2, 8, 6, 6),)
    with torch.no_grad():
        assert float(model(*inputs).abs().max()) > 1e10
    compiled = fxc.compile(model, inputs, "fold-batchnorm", target="fx")
    assert fold_row(compiled).status == "ok"
    with pytest.raises(fxc.PassVerificationError) as info:
        fxc.compile(model, inputs, [BrokenFold(defect="dropped-bias", layer=9)], target="fx")
    assert info.value.node == "blocks_9_conv"


def _conv_stack_graph(depth: int = 3) -> tuple[GraphModule, tuple[torch.Tensor]]:
    model, inputs = deep_stack(depth, 4, True, False, seed=0)
    return verify.propagate_shapes(trace(model, inputs), inputs), inputs


def test_fast_path_runs_no_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = verify.to_float64
    monkeypatch.setattr(verify, "to_float64", lambda gm: calls.append(1) or real(gm))
    model, inputs = deep_stack(6, 4, True, False, seed=0)
    assert fold_row(fxc.compile(model, inputs, "fold-batchnorm", target="fx")).status == "ok"
    assert calls == []
    gm, inputs = _conv_stack_graph()
    with torch.no_grad():
        old = gm(*inputs)
    nudged = old + 1e-4 * float(old.abs().max())
    assert verify.check_exact(gm, inputs, old, old + verify.exactness_floor(old) / 2).ok and calls == []
    first, second = verify.check_exact(gm, inputs, old, nudged), verify.check_exact(gm, inputs, old, nudged)
    assert not first.ok and first.float64 and not second.ok and calls == [1]  # cached per graph


def test_nan_positions_must_match() -> None:
    gm, inputs = _conv_stack_graph()
    old = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert verify.check_exact(gm, inputs, old, old.clone()).ok
    moved = torch.tensor([float("nan"), 1.0, float("inf"), 2.0])
    flipped = torch.tensor([1.0, float("nan"), float("-inf"), 2.0])
    for new in (moved, flipped):
        verdict = verify.check_exact(gm, inputs, old, new)
        assert not verdict.ok and "NaN/inf" in verdict.reason


class Float32Only(nn.Module):
    """An op with a float32 kernel only (a leaf when traced)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise TypeError(f"no {x.dtype} kernel")
        return x * 2


class WithFloat32Only(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4).eval()
        self.op = Float32Only()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.bn(self.conv(x)))


class CastsToFloat32(WithFloat32Only):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).float() * 2


@pytest.mark.parametrize("model_cls", [WithFloat32Only, CastsToFloat32], ids=["no-float64-kernel", "explicit-cast"])
def test_without_float64_the_scaled_tolerance_decides(model_cls: type[nn.Module]) -> None:
    model, inputs = model_cls().eval(), (torch.randn(2, 3, 6, 6),)
    gm = verify.propagate_shapes(trace(model, inputs, leaf_modules=[Float32Only]), inputs)
    with torch.no_grad():
        old = gm(*inputs)
    scale = max(1.0, float(old.abs().max()))
    within, beyond = old + 0.5 * verify.ATOL * scale, old + 10 * verify.ATOL * scale + verify.RTOL * old.abs()
    ok, bad = verify.check_exact(gm, inputs, old, within), verify.check_exact(gm, inputs, old, beyond)
    assert ok.ok and not ok.float64
    assert not bad.ok and not bad.float64 and "no float64 reference" in bad.reason
    assert fold_row(fxc.compile(model, inputs, "fold-batchnorm", target="fx",
                                leaf_modules=[Float32Only])).status == "ok"


def test_to_float64_converts_plain_tensor_attributes_and_leaves_the_graph_alone() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.factor = torch.tensor([0.1, 0.2, 0.3])

        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.lin(x)[:, idx] * self.factor

    gm = trace(Scaled(), (torch.randn(2, 3), torch.tensor([2, 0, 1])))
    g = verify.to_float64(gm)
    assert g.factor.dtype == torch.float64 and g.lin.weight.dtype == torch.float64
    assert gm.factor.dtype == torch.float32 and gm.lin.weight.dtype == torch.float32
    out = verify.float64_values(gm, (torch.randn(2, 3), torch.tensor([2, 0, 1])))
    assert out.dtype == torch.float64 and out.shape == (2, 3)
