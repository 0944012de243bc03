"""Nothing the user passes in is changed: example inputs (even for models with in-place ops), and
the model given to ``benchmark``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.pass_base import PassContext
from fxcompress.trace import trace
from fxcompress.verify import first_divergent_node, node_values, propagate_shapes

CLEANUP = "eliminate-dead-code,remove-dropout,remove-identity,fold-constants"


class InPlace(nn.Module):
    """Doubles its input in place, then runs an identity and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)
        self.id = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.fc(self.id(self.drop(x)))


def _inputs() -> tuple[tuple[torch.Tensor], tuple[torch.Tensor]]:
    torch.manual_seed(1)
    x = torch.randn(2, 4)
    return (x,), (x.clone(),)


@pytest.mark.parametrize("target", ["fx", "onnxruntime"])
def test_in_place_model_keeps_inputs_and_no_pass_is_rolled_back(target: str) -> None:
    inputs, pristine = _inputs()
    compiled = fxc.compile(InPlace(), inputs, CLEANUP, target=target, on_error="skip", progress=False)
    assert torch.equal(inputs[0], pristine[0])
    statuses = {r.name: r.status for r in compiled.report}
    assert "rolled-back" not in statuses.values(), compiled.report
    assert statuses["remove-identity"] == "ok" and statuses["remove-dropout"] == "ok"
    assert all(r.error is None or r.error["max_abs"] < 1e-6 for r in compiled.report)
    expected = InPlace().eval()(pristine[0].clone())
    assert torch.allclose(compiled(pristine[0].clone()), expected, atol=1e-6)
    assert torch.equal(inputs[0], pristine[0])


def test_framework_helpers_run_on_clones() -> None:
    inputs, pristine = _inputs()
    gm = trace(InPlace(), inputs)
    propagate_shapes(gm, inputs)
    values = node_values(gm, inputs)
    assert first_divergent_node(gm, gm, inputs) is None
    fxc.Pipeline([]).apply(gm, PassContext(inputs, original=InPlace().eval()))
    assert torch.equal(inputs[0], pristine[0])
    assert torch.equal(values["x"], pristine[0]) and torch.equal(values["mul_"], 2 * pristine[0])


def test_benchmark_restores_training_flags_and_leaves_inputs_alone() -> None:
    model = InPlace().train()
    model.drop.eval()
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    inputs, pristine = _inputs()
    result = fxc.benchmark(model, inputs, warmup=1, iters=3)
    assert seen == [False] * 4
    assert model.training and not model.drop.training and model.fc.training and model.id.training
    assert torch.equal(inputs[0], pristine[0])
    assert result.iters == 3 and result.batch == 2 and result.median_ms > 0


def test_benchmark_restores_training_flags_when_the_model_raises() -> None:
    model = InPlace().train()
    with pytest.raises(RuntimeError):
        fxc.benchmark(model, (torch.randn(2, 5),), warmup=0, iters=1)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("kw, message", [
    ({"iters": 0}, r"benchmark\(iters=\.\.\.\) must be an integer >= 1, got 0"),
    ({"iters": 2.5}, r"iters=\.\.\.\) must be an integer >= 1, got 2.5"),
    ({"warmup": -1}, r"benchmark\(warmup=\.\.\.\) must be an integer >= 0, got -1"),
])
def test_benchmark_rejects_bad_counts(kw: dict, message: str) -> None:
    with pytest.raises(fxc.InputError, match=message):
        fxc.benchmark(nn.Linear(2, 2), (torch.randn(1, 2),), **kw)


def test_benchmark_is_the_public_api() -> None:
    from fxcompress import bench

    assert fxc.benchmark is bench.benchmark and "benchmark" in fxc.__all__
