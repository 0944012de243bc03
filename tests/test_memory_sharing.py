"""Compile cost proportional to the model (issue #15): graph versions share the parameters no pass
replaced, snapshots are text, rollback still restores, and the user's model is neither changed nor
aliased by what ``compile`` returns."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.errors import PassError
from fxcompress.copying import copy_graph_module, shared_copy
from fxcompress.pipeline import run_passes
from fxcompress.trace import trace


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@dataclass(frozen=True)
class ReplaceB(fxc.Pass):
    """Replaces ``b.weight`` (halved) and touches nothing else; ``fail`` raises afterwards."""

    name: ClassVar[str] = "test-replace-b"
    shares_weights: ClassVar[bool] = True
    fail: bool = False

    def run(self, gm: Any, ctx: fxc.PassContext) -> fxc.PassResult:
        gm.b.weight = nn.Parameter(gm.b.weight.detach() * 0.5)
        if self.fail:
            raise RuntimeError("boom")
        return fxc.PassResult(graph=gm)


@dataclass(frozen=True)
class ScaleInPlace(fxc.Pass):
    """Writes into ``a.weight`` in place; ``declared`` says (wrongly) that it shares weights."""

    name: ClassVar[str] = "test-scale-in-place"
    declared: bool = False

    @property
    def shares_weights(self) -> bool:  # type: ignore[override]
        return self.declared

    def run(self, gm: Any, ctx: fxc.PassContext) -> fxc.PassResult:
        with torch.no_grad():
            gm.a.weight.mul_(2.0)
        return fxc.PassResult(graph=gm)


class Graphs:
    """Instrument keeping the graph given to and returned by every pass."""

    def __init__(self) -> None:
        self.before: list[Any] = []
        self.after: list[Any] = []

    def before_pass(self, p: Any, graph: Any, ctx: Any) -> None:
        self.before.append(graph)

    def after_pass(self, p: Any, graph: Any, record: Any, ctx: Any) -> None:
        if p is not None:
            self.after.append(graph)


@pytest.fixture
def setup() -> tuple[nn.Module, tuple[torch.Tensor], Any, fxc.PassContext]:
    torch.manual_seed(0)
    model = Net().eval()
    x = (torch.randn(2, 8),)
    gm = trace(copy.deepcopy(model), x)
    return model, x, gm, fxc.PassContext(x, original=model)


def _ptrs(module: nn.Module) -> dict[str, int]:
    return {n: p.data_ptr() for n, p in module.named_parameters()}


def test_untouched_parameters_are_shared_between_graph_versions(setup: Any) -> None:
    _, _, gm, ctx = setup
    graphs = Graphs()
    b_before = gm.b.weight.detach().clone()
    out = fxc.Pipeline((ReplaceB(),), instruments=(graphs,)).apply(gm, ctx, handed_over=True)
    before, after = _ptrs(graphs.before[0]), _ptrs(out.graph_module)
    assert {n for n in before if before[n] == after[n]} == {"a.weight", "a.bias", "b.bias"}
    assert before["b.weight"] != after["b.weight"]
    assert torch.equal(graphs.before[0].b.weight, b_before)  # copy-on-write: the graph before keeps its value
    assert graphs.before[0].a.weight is not out.graph_module.a.weight  # shared storage, own Parameter objects


def test_a_pass_that_writes_in_place_gets_its_own_copy(setup: Any) -> None:
    _, x, gm, ctx = setup
    a_before = gm.a.weight.detach().clone()
    graphs = Graphs()
    out = run_passes(gm, [ScaleInPlace()], ctx, instruments=[graphs])
    assert torch.equal(graphs.before[0].a.weight, a_before) and torch.equal(gm.a.weight, a_before)
    theirs = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    assert not theirs & {p.untyped_storage().data_ptr() for p in out.graph_module.parameters()}
    torch.testing.assert_close(out.graph_module.a.weight, a_before * 2, rtol=0, atol=0)


def test_an_undeclared_in_place_write_is_reported(setup: Any) -> None:
    _, _, gm, ctx = setup
    with pytest.raises(PassError, match=r"wrote into parameter\(s\) a\.weight .* in place.*shares_weights"):
        run_passes(gm, [ScaleInPlace(declared=True)], ctx)


def test_rollback_restores_the_graph_before_exactly(setup: Any) -> None:
    _, x, gm, ctx = setup
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    out = run_passes(gm, [ReplaceB(fail=True)], ctx, on_error="skip")
    assert out.report.rows[-1].status == "rolled-back"
    after = out.graph_module.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_snapshots_hold_text_not_modules(setup: Any) -> None:
    model, x, _, _ = setup
    compiled = fxc.compile(model, x, "remove-dropout,quantize-dynamic", target="fx", progress=False)
    assert len(compiled.snapshots) == 3
    for snap in compiled.snapshots:
        assert all(isinstance(v, (int, str)) for v in vars(snap).values())


def test_compile_neither_changes_nor_aliases_the_users_model(setup: Any) -> None:
    model, x, _, _ = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = fxc.compile(model, x, [ScaleInPlace(), ReplaceB()], target="fx", progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    theirs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not theirs & {p.untyped_storage().data_ptr() for p in compiled.graph_module.parameters()}
    with torch.no_grad():
        model.a.weight.zero_()
    assert compiled.graph_module.a.weight.abs().sum() > 0


def test_shared_copy_and_float64_copy_leave_the_source_alone() -> None:
    model = Net()
    tied = nn.Sequential(model, nn.Linear(4, 8))
    tied[1].weight = model.a.weight
    twin = shared_copy(tied)
    assert twin[1].weight is twin[0].a.weight and twin[0].a.weight is not model.a.weight
    assert twin[0].a.weight.data_ptr() == model.a.weight.data_ptr()
    twin.double()
    assert model.a.weight.dtype == torch.float32
    gm = trace(Net(), (torch.randn(1, 8),))
    copied = copy_graph_module(gm, share_parameters=True)
    copied.a.weight.requires_grad_(False)
    assert gm.a.weight.requires_grad
