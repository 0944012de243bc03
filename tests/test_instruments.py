"""Instruments: validated when the pipeline is built, NumericCheck's default limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress.pass_base import PassContext, PassResult


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


X = (torch.randn(3, 6),)


@dataclass(frozen=True)
class Scale(fxc.Pass):
    name: ClassVar[str] = "test-instr-scale"
    factor: float = 1.0

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            gm.fc.weight.mul_(self.factor)
        return PassResult(gm)


def compile_fx(passes: list[fxc.Pass], **kw: Any) -> fxc.Compiled:
    return fxc.compile(Net(), X, passes, target="fx", progress=False, **kw)


@pytest.mark.parametrize("instrument, message", [
    (fxc.PassTiming, r"instrument 0 is the class PassTiming, not an instance; add '\(\)': PassTiming\(\)"),
    (object(), r"instrument 0 <object object .*> \(object\) has none of the instrument hooks.*"
               r"on_pipeline_start, should_run, before_pass, check, after_pass, on_pipeline_end"),
])
def test_bad_instrument_is_rejected_before_any_pass_runs(instrument: Any, message: str) -> None:
    with pytest.raises(fxc.PipelineError, match=message):
        fxc.Pipeline([Scale()], instruments=[instrument])
    with pytest.raises(fxc.PipelineError, match=message):
        compile_fx([Scale()], instruments=[instrument])


def test_instrument_with_one_hook_is_accepted_and_called() -> None:
    class Counter:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def after_pass(self, p: Any, graph: Any, record: fxc.PassRecord, ctx: PassContext) -> None:
            self.seen.append(record.name)

    counter = Counter()
    compile_fx([Scale(factor=2.0)], instruments=[counter])
    assert counter.seen == ["input", "test-instr-scale{factor=2.0}"]


def test_instruments_not_a_list_is_rejected() -> None:
    with pytest.raises(fxc.PipelineError, match=r"instruments must be a list .* got 'timing'"):
        fxc.Pipeline([Scale()], instruments="timing")  # type: ignore[arg-type]


@pytest.mark.parametrize("check, message", [
    (lambda g: True, r"Bisect\(check\) is called as f\(graph, ctx\), but <lambda>\(g\) cannot take those"),
    (lambda g, c, extra: True, r"<lambda>\(g, c, extra\) cannot take those"),
    (3, r"Bisect\(check\) must be a callable taking \(graph, ctx\); got 3"),
])
def test_bisect_checks_its_callable_up_front(check: Any, message: str) -> None:
    with pytest.raises(fxc.PipelineError, match=message):
        fxc.Bisect(check)


def test_bisect_accepts_callables_that_take_graph_and_ctx() -> None:
    def check(graph: Any, ctx: PassContext, limit: float = 10.0) -> bool:
        return float(graph.fc.weight.detach().abs().max()) < limit

    bisect = fxc.Bisect(check)
    fxc.Bisect(lambda *args: True)
    compile_fx([Scale(factor=1.0), Scale(factor=100.0)], instruments=[bisect])
    assert bisect.culprit == "test-instr-scale{factor=100.0}" and bisect.culprit_index == 2


def test_evaluate_checks_its_metric_up_front() -> None:
    with pytest.raises(fxc.PipelineError, match=r"Evaluate\(metric\) is called as f\(run\)"):
        fxc.Evaluate(lambda: 1.0)


def test_numeric_check_without_limits_uses_the_exact_fp32_tolerances() -> None:
    """A tiny drift (1e-3 relative) passes no lossy limit a user would set, but is not exact."""
    c = compile_fx([Scale(factor=1.0), Scale(factor=1.001)], on_error="skip", instruments=[fxc.NumericCheck()])
    assert [r.status for r in c.report] == ["ok", "unchanged", "rolled-back"]
    message = c.report[2].diagnostics[0]["message"]
    assert "differ from the original model beyond rtol 0.0001, atol 1e-05" in message
    c = compile_fx([Scale(factor=1.001)], on_error="skip", instruments=[fxc.NumericCheck(max_abs=0.1)])
    assert [r.status for r in c.report] == ["ok", "ok"]


@pytest.mark.parametrize("limits", [{"max_abs": 10.0}, {"min_cosine": 0.5}])
def test_numeric_check_rolls_back_a_pass_that_makes_the_outputs_nan(limits: dict[str, float]) -> None:
    c = compile_fx([Scale(factor=float("nan"))], on_error="skip", instruments=[fxc.NumericCheck(**limits)])
    assert [r.status for r in c.report] == ["ok", "rolled-back"]
    assert "nan" in c.report[1].diagnostics[0]["message"]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_abs": -1.0}, r"NumericCheck\(max_abs=...\) must be a number in \[0, inf\]"),
    ({"min_cosine": 2.0}, r"NumericCheck\(min_cosine=...\) must be a number in \[-1, 1\]"),
    ({"min_top1": "0.9"}, r"NumericCheck\(min_top1=...\) must be a number in \[0, 1\] or None; got '0.9'"),
])
def test_numeric_check_rejects_impossible_limits(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(fxc.PipelineError, match=message):
        fxc.NumericCheck(**kwargs)
