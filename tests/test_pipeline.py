"""The pass manager: verification, rollback, ordering, instruments, nesting."""

from __future__ import annotations

import io
import operator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress.pass_base import PassContext, PassResult
from fxcompress.trace import trace


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        y = y.mean(dim=(2, 3))
        return self.fc(y) + 0.5


X = (torch.randn(2, 3, 6, 6),)


@fxc.register
@dataclass(frozen=True)
class NoOp(fxc.Pass):
    name: ClassVar[str] = "test-noop"
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm)


@fxc.register
@dataclass(frozen=True)
class ReluToSigmoid(fxc.Pass):
    """Deliberately broken: claims to be exact but changes the activation."""

    name: ClassVar[str] = "test-relu-to-sigmoid"
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        for n in gm.graph.nodes:
            if n.target is torch.relu:
                n.target = torch.sigmoid
        gm.recompile()
        return PassResult(gm)


@fxc.register
@dataclass(frozen=True)
class Explode(fxc.Pass):
    name: ClassVar[str] = "test-explode"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        next(iter(gm.graph.nodes)).name = "half_done"  # a partial edit that must not leak out
        raise RuntimeError("boom")


@fxc.register
@dataclass(frozen=True)
class DropModule(fxc.Pass):
    """Deliberately broken: deletes a submodule still used by the graph."""

    name: ClassVar[str] = "test-drop-module"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        delattr(gm, "fc")
        return PassResult(gm)


@fxc.register
@dataclass(frozen=True)
class ScaleFc(fxc.Pass):
    """Lossy on purpose: its error against the original must be reported."""

    name: ClassVar[str] = "test-scale-fc"
    factor: float = 1.1

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            gm.fc.weight.mul_(self.factor)
        return PassResult(gm, stats={"factor": self.factor})


@fxc.register
@dataclass(frozen=True)
class AddZeroToOutput(fxc.Pass):
    """Changes the graph text but not the values (x + 0.0 before output)."""

    name: ClassVar[str] = "test-add-zero"
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            z = gm.graph.call_function(operator.add, (out.args[0], 0.0))
        out.args = (z,)
        gm.recompile()
        return PassResult(gm)


@fxc.register
@dataclass(frozen=True)
class NeedsCalibration(fxc.Pass):
    name: ClassVar[str] = "test-needs-calibration"
    requires: ClassVar[tuple[str, ...]] = ("calibration-data",)
    calls: ClassVar[list[int]] = []

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        NeedsCalibration.calls.append(1)
        return PassResult(gm)


@fxc.register
@dataclass(frozen=True)
class OnnxNoOp(fxc.OnnxPass):
    name: ClassVar[str] = "test-onnx-noop"
    exact: ClassVar[bool] = True

    def run(self, graph, ctx):  # type: ignore[no-untyped-def]
        return PassResult(graph)


def compile_fx(passes, **kw):  # type: ignore[no-untyped-def]
    return fxc.compile(Net(), X, passes, target="fx", **kw)


def test_report_has_one_row_per_pass_and_snapshots_match() -> None:
    c = compile_fx([NoOp(), AddZeroToOutput(), ScaleFc()])
    assert [r.name for r in c.report] == ["input", "test-noop", "test-add-zero", "test-scale-fc"]
    assert [r.status for r in c.report] == ["ok", "unchanged", "ok", "ok"]
    assert [r.changed for r in c.report] == [False, False, True, False]
    assert c.report[3].weights_changed and c.report[3].stats == {"factor": 1.1}
    assert len(c.snapshots) == 4 and str(c.snapshots[-1]) == c.snapshots[-1].text
    assert c.snapshots[1].text == c.snapshots[0].text != c.snapshots[2].text
    assert c.report[2].error["max_abs"] < 1e-6 and c.report[2].error["cosine"] > 0.999999
    assert c.report[3].error["max_abs"] > 1e-3  # lossy pass: error vs the original is measured
    assert c.report[0].params == sum(p.numel() for p in Net().parameters())
    assert "test-scale-fc" in str(c.report)


def test_exact_pass_that_changes_outputs_names_first_divergent_node() -> None:
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxc.PassVerificationError) as info:
        fxc.compile(model, X, [NoOp(), ReluToSigmoid()], target="fx")
    err = info.value
    assert err.pass_name == "test-relu-to-sigmoid" and err.position == 2 and err.node == "relu"
    assert "first divergent node: 'relu'" in str(err) and "rolled back" in str(err)
    assert "torch.sigmoid" in err.diff
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_raising_pass_is_rolled_back_with_cause() -> None:
    with pytest.raises(fxc.PassError) as info:
        compile_fx([Explode()])
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "'test-explode' (#1) raised RuntimeError: boom" in str(info.value)


def test_skip_keeps_the_previous_graph() -> None:
    c = compile_fx([AddZeroToOutput(), Explode(), DropModule(), NoOp()], on_error="skip")
    statuses = [r.status for r in c.report]
    assert statuses == ["ok", "ok", "rolled-back", "rolled-back", "unchanged"]
    assert "half_done" not in c.snapshots[-1].text
    assert hasattr(c.graph_module, "fc")
    assert torch.allclose(c.graph_module(*X), Net()(*X), atol=1e-6)
    assert "fc" in c.report[3].diagnostics[0]["message"]


def test_broken_graph_names_the_node() -> None:
    with pytest.raises(fxc.PassError, match="left a broken graph: graph fails lint") as info:
        compile_fx([DropModule()])
    assert info.value.node == "fc" and "-call_module   %fc = fc:Linear(8->4)" in info.value.diff


def test_requirements_checked_before_any_pass_runs() -> None:
    NeedsCalibration.calls.clear()
    with pytest.raises(fxc.PipelineError, match=r"'test-needs-calibration' \(#2\) requires 'calibration-data': "
                                                 r"pass calibration="):
        compile_fx([NoOp(), NeedsCalibration()])
    assert NeedsCalibration.calls == []
    compile_fx([NeedsCalibration()], calibration=[X[0]])
    assert NeedsCalibration.calls == [1]


def test_up_front_and_run_time_errors_number_passes_alike() -> None:
    """Both count report rows: ``input`` is #0, the first pass #1, export-onnx takes a row, a Repeat body n."""
    with pytest.raises(fxc.PassError, match=r"'test-explode' \(#2\) raised") as info:
        compile_fx([NoOp(), Explode()])
    assert info.value.position == 2
    with pytest.raises(fxc.PipelineError, match=r"'test-needs-calibration' \(#2\) requires"):
        compile_fx([NoOp(), NeedsCalibration()])
    with pytest.raises(fxc.PipelineError, match=r"'test-needs-calibration' \(#4\) requires"):
        compile_fx([fxc.Repeat(2, (NoOp(),)), NoOp(), NeedsCalibration()])
    with pytest.raises(fxc.PipelineError, match=r"'test-noop' \(#3\) works on the FX graph"):
        fxc.Pipeline([OnnxNoOp(), NoOp()]).check(PassContext(X))


def test_fx_pass_after_onnx_pass_is_rejected() -> None:
    with pytest.raises(fxc.PipelineError, match="works on the FX graph but comes after ONNX pass 'test-onnx-noop'"):
        fxc.Pipeline([OnnxNoOp(), NoOp()]).check(PassContext(X))


def test_repeat_and_nested_pipelines_run_in_order() -> None:
    c = compile_fx("test-noop,repeat{n=3}(test-scale-fc{factor=0.5}),pipeline(test-noop)")
    names = [r.name for r in c.report]
    assert names == ["input", "test-noop"] + [f"repeat[{k}/3]/test-scale-fc{{factor=0.5}}" for k in (1, 2, 3)] \
        + ["test-noop"]
    w0 = Net().fc.weight
    assert torch.allclose(c.graph_module.fc.weight, w0 * 0.125)


def test_pipeline_string_is_recorded() -> None:
    c = compile_fx([NoOp(), ScaleFc(factor=2.0)])
    assert c.pipeline == "test-noop,test-scale-fc{factor=2.0}"
    assert c.report.meta["pipeline"] == c.pipeline


def test_instruments_print_dump_time_and_bisect(tmp_path) -> None:  # type: ignore[no-untyped-def]
    buf = io.StringIO()
    timing = fxc.PassTiming()
    bisect = fxc.Bisect(lambda gm, ctx: float(gm.fc.weight.detach().abs().max()) < 10.0)
    compile_fx([NoOp(), ScaleFc(factor=3.0), ScaleFc(factor=30.0), NoOp()],
               instruments=[fxc.PrintAfter(["test-scale-fc"], stream=buf), fxc.DumpGraphs(tmp_path), timing, bisect])
    assert buf.getvalue().count("// after test-scale-fc") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_input.fxg", "01_test-noop.fxg", "02_test-scale-fc.fxg", "03_test-scale-fc.fxg", "04_test-noop.fxg"]
    assert set(timing.times) == {"input", "test-noop", "test-scale-fc"}
    assert bisect.culprit == "test-scale-fc{factor=30.0}" and bisect.culprit_index == 3


def test_numeric_check_rolls_back_a_pass_beyond_limits() -> None:
    c = compile_fx([ScaleFc(factor=1.0001), ScaleFc(factor=5.0)], on_error="skip",
                   instruments=[fxc.NumericCheck(min_cosine=0.9999, max_abs=0.01)])
    assert [r.status for r in c.report] == ["ok", "ok", "rolled-back"]
    assert "max abs error" in c.report[2].diagnostics[0]["message"]
    c = compile_fx([LossyDoubleOutput()], on_error="skip", instruments=[fxc.NumericCheck(max_abs=0.01)])
    assert [r.status for r in c.report] == ["ok", "rolled-back"]
    assert "output shape differs" in c.report[1].diagnostics[0]["message"]


def test_analysis_cache_is_invalidated_when_the_graph_changes() -> None:
    ctx = PassContext(X)
    calls = []
    ctx.analysis("shapes", lambda: calls.append(1) or "value")
    ctx.analysis("shapes", lambda: calls.append(1) or "value")
    assert calls == [1]
    gm = trace(Net(), X)
    fxc.Pipeline([NoOp()]).apply(gm, ctx)
    assert ctx.cached_analyses == ("shapes",) and ctx.cached("shapes") == "value"
    fxc.Pipeline([AddZeroToOutput()]).apply(gm, ctx)
    assert ctx.cached_analyses == () and ctx.cached("shapes") is None


def test_apply_does_not_touch_the_given_graph_module() -> None:
    gm = trace(Net(), X)
    code = gm.code
    fxc.Pipeline([AddZeroToOutput(), ScaleFc()]).apply(gm, PassContext(X))
    assert gm.code == code


def test_passing_a_class_instead_of_instance_is_a_clear_error() -> None:
    with pytest.raises(fxc.PipelineError, match=r"did you pass the class instead of an instance"):
        fxc.Pipeline([NoOp])  # type: ignore[list-item]


def test_bad_compile_arguments() -> None:
    with pytest.raises(fxc.PipelineError, match="unknown target 'tpu'"):
        fxc.compile(Net(), X, [], target="tpu")
    with pytest.raises(fxc.InputError, match="needs a torch.nn.Module"):
        fxc.compile(lambda x: x, X, [])  # type: ignore[arg-type]
    with pytest.raises(fxc.InputError, match="example_inputs must be"):
        fxc.compile(Net(), [], [])


@fxc.register
@dataclass(frozen=True)
class DoubleOutput(fxc.Pass):
    """Deliberately broken: claims to be exact but concatenates the output with itself."""

    name: ClassVar[str] = "test-double-output"
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            cat = gm.graph.call_function(torch.cat, ([out.args[0], out.args[0]], 1))
        out.args = (cat,)
        return PassResult(gm)


@dataclass(frozen=True)
class LossyDoubleOutput(DoubleOutput):
    name: ClassVar[str] = "test-lossy-double-output"
    exact: ClassVar[bool] = False


fxc.register(LossyDoubleOutput)


def test_exact_pass_changing_the_output_shape_is_a_verification_error() -> None:
    with pytest.raises(fxc.PassVerificationError) as info:
        compile_fx([NoOp(), DoubleOutput()])
    err = info.value
    assert err.pass_name == "test-double-output" and err.position == 2
    assert "output shape differs: reference (2, 4), actual (2, 8)" in str(err) and "rolled back" in str(err)
    c = compile_fx([DoubleOutput(), NoOp()], on_error="skip")
    assert [r.status for r in c.report] == ["ok", "rolled-back", "unchanged"]
    assert c.graph_module(*X).shape == (2, 4) and "torch.cat" not in c.graph_module.code


def test_lossy_pass_changing_the_output_shape_records_no_error_but_a_diagnostic() -> None:
    c = compile_fx([LossyDoubleOutput()])
    row = c.report[1]
    assert row.status == "ok" and row.error is None
    assert row.diagnostics[-1]["severity"] == "warning"
    assert "not measured: output shape differs: reference (2, 4), actual (2, 8)" in row.diagnostics[-1]["message"]
    assert c.report[0].error is not None


class _Ends:
    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def on_pipeline_start(self, pipeline, ctx) -> None:  # type: ignore[no-untyped-def]
        self.starts.append(1)

    def on_pipeline_end(self, report, ctx) -> None:  # type: ignore[no-untyped-def]
        self.ends.append(len(report))


def test_pipeline_end_hooks_run_when_a_pass_raises() -> None:
    ends, bar = _Ends(), fxc.ProgressBar()
    with pytest.raises(fxc.PassError, match="test-explode"):
        compile_fx([NoOp(), Explode()], instruments=[ends, bar])
    assert ends.starts == [1] and ends.ends == [2]
    assert not bar.progress.live.is_started
    compile_fx([NoOp()], instruments=[ends])
    assert ends.ends == [2, 2]


class Shift(nn.Module):
    """A leaf module reading tensors no state_dict shows: a non-persistent buffer and a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(4), persistent=False)
        self.scale = torch.tensor(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


class WithShift(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.shift = Shift()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift(self.fc(x))


@dataclass(frozen=True)
class BumpTensor(fxc.Pass):
    """Deliberately broken: claims to be exact but changes a tensor no state_dict shows."""

    name: ClassVar[str] = "test-bump-tensor"
    exact: ClassVar[bool] = True
    attr: str = "offset"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        getattr(gm.shift, self.attr).add_(1.0)
        return PassResult(gm)


@pytest.mark.parametrize("attr", ["offset", "scale"])
def test_exact_pass_changing_an_unsaved_tensor_is_caught(attr: str) -> None:
    x = (torch.randn(2, 4),)
    assert attr not in str(list(trace(WithShift(), x, leaf_modules=[Shift]).state_dict()))
    with pytest.raises(fxc.PassVerificationError, match="declared exact but changed the outputs") as info:
        fxc.compile(WithShift(), x, [BumpTensor(attr)], target="fx", leaf_modules=[Shift])
    assert info.value.node == "shift"
    c = fxc.compile(WithShift(), x, [BumpTensor(attr)], target="fx", verify=False, leaf_modules=[Shift])
    assert c.report[1].status == "ok" and c.report[1].weights_changed


def test_skipped_broken_pass_leaves_the_previous_graph_and_names_the_node() -> None:
    c = compile_fx([AddZeroToOutput(), ReluToSigmoid()], on_error="skip")
    assert [r.status for r in c.report] == ["ok", "ok", "rolled-back"]
    code = c.graph_module.code
    assert "torch.relu" in code and "sigmoid" not in code
    assert c.snapshots[-1].text == c.snapshots[1].text
    diag = c.report[2].diagnostics[0]
    assert diag["severity"] == "error" and diag["node"] == "relu"
    assert "first divergent node: 'relu'" in diag["message"]
    assert torch.allclose(c.graph_module(*X), Net()(*X), atol=1e-6)


def test_compile_verify_and_on_error_apply_to_a_pipeline_object() -> None:
    pipe = fxc.Pipeline([AddZeroToOutput(), ReluToSigmoid()])
    with pytest.raises(fxc.PassVerificationError):
        compile_fx(pipe)
    skipped = compile_fx(pipe, on_error="skip")
    assert [r.status for r in skipped.report] == ["ok", "ok", "rolled-back"]
    assert "torch.relu" in skipped.graph_module.code
    unverified = compile_fx(pipe, verify=False)
    assert [r.status for r in unverified.report] == ["ok", "ok", "ok"]
    assert "torch.sigmoid" in unverified.graph_module.code
    own = compile_fx(fxc.Pipeline([ReluToSigmoid()], on_error="skip"), instruments=[fxc.PassTiming()])
    assert own.report[1].status == "rolled-back"
    with pytest.raises(fxc.PassVerificationError):
        compile_fx(fxc.Pipeline([ReluToSigmoid()], on_error="skip"), on_error="raise")
    assert pipe.on_error == "raise" and pipe.verify is True
    with pytest.raises(fxc.PipelineError, match="option 'on_error' of pass 'pipeline' must be one of 'raise', 'skip'; got 'ignore'"):
        compile_fx(pipe, on_error="ignore")


@dataclass(frozen=True)
class OnnxReluToSigmoid(fxc.OnnxPass):
    """Deliberately broken: claims to be exact but turns the ONNX Relu into a Sigmoid."""

    name: ClassVar[str] = "test-onnx-relu-to-sigmoid"
    exact: ClassVar[bool] = True

    def run(self, graph, ctx):  # type: ignore[no-untyped-def]
        for node in graph.nodes:
            if node.op == "Relu":
                node.op = "Sigmoid"
        return PassResult(graph)


def test_exact_onnx_pass_that_changes_outputs_names_the_onnx_node() -> None:
    from fxcompress.backends.onnx_export import export_onnx
    from fxcompress.onnx_graph import fx_node_of

    relu = next(n for n in export_onnx(trace(Net(), X), X).graph.node if n.op_type == "Relu")
    with pytest.raises(fxc.PassVerificationError) as info:
        fxc.compile(Net(), X, [OnnxNoOp(), OnnxReluToSigmoid()], target="onnx", progress=False)
    err = info.value
    assert err.pass_name == "test-onnx-relu-to-sigmoid" and err.node == relu.name and fx_node_of(relu) == "relu"
    assert f"first divergent node: '{relu.name}'" in str(err) and "Sigmoid" in err.diff
    c = fxc.compile(Net(), X, [OnnxReluToSigmoid()], target="onnx", on_error="skip", progress=False)
    assert c.report[-1].status == "rolled-back" and c.report[-1].diagnostics[0]["node"] == relu.name
    assert [n.op_type for n in c.onnx_model.graph.node].count("Relu") == 1


def test_dump_graphs_numbers_files_like_the_snapshots_after_a_rollback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = compile_fx([NoOp(), Explode(), ScaleFc(), ReluToSigmoid(), AddZeroToOutput()], on_error="skip",
                   instruments=[fxc.DumpGraphs(tmp_path)])
    assert [r.status for r in c.report].count("rolled-back") == 2
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(s.filename for s in c.snapshots)
    assert files[-1] == f"{len(c.snapshots) - 1:02d}_test-add-zero.fxg"
    assert all((tmp_path / s.filename).read_text(encoding="utf-8") == s.text for s in c.snapshots)


class LogNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_exact_pass_keeping_nan_outputs_is_not_rolled_back() -> None:
    x = (torch.tensor([[-1.0, 2.0, 0.5]]),)
    c = fxc.compile(LogNet(), x, [NoOp(), AddZeroToOutput()], target="fx")
    assert [r.status for r in c.report] == ["ok", "unchanged", "ok"]
    assert torch.isnan(c.graph_module(*x)[0, 0])


class Tied(nn.Module):
    """Two linears sharing one weight, an LSTM (its own copy protocol) and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.scale = torch.tensor(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(self.b(self.a(x)))
        return y * self.scale


def test_copy_graph_module_is_a_deep_copy() -> None:
    """The pass manager's copy (rollback depends on it): same text and weights, nothing shared with
    the source, tied parameters still tied, a module with its own copy protocol copied its way."""
    import copy

    from fxcompress.graph_text import to_text
    from fxcompress.pass_base import copy_graph_module
    from fxcompress.pipeline import _weights_digest

    x = (torch.randn(2, 3, 4),)
    gm = trace(Tied(), x)
    new = copy_graph_module(gm)
    assert to_text(new) == to_text(gm) == to_text(copy.deepcopy(gm))
    assert _weights_digest(new) == _weights_digest(gm)
    source = {id(t) for t in gm.state_dict(keep_vars=True).values()}
    assert not source & {id(t) for t in new.state_dict(keep_vars=True).values()}
    assert new.get_submodule("a").weight is new.get_submodule("b").weight
    assert new.get_submodule("lstm") is not gm.get_submodule("lstm")
    with torch.no_grad():
        new.get_submodule("a").weight.add_(1.0)
        torch.testing.assert_close(new(*x), copy_graph_module(new)(*x), rtol=0, atol=0)
        assert not torch.equal(new(*x), gm(*x))


@dataclass(frozen=True)
class DoubleWithoutRecompile(fxc.Pass):
    """Rewrites the graph (its output doubled) and, like every pass, leaves ``recompile()`` to the manager."""

    name: ClassVar[str] = "test-double-without-recompile"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            doubled = gm.graph.call_function(operator.mul, (out.args[0], 2.0))
        out.args = (doubled,)
        return PassResult(gm)


def test_the_manager_recompiles_and_propagates_shapes_after_a_pass() -> None:
    from fxcompress.testing import run_pass

    model = Net().eval()
    with torch.no_grad():
        expected = 2 * model(*X)
    compiled = fxc.compile(model, X, [DoubleWithoutRecompile()], target="fx", progress=False)
    outcome = fxc.Pipeline((DoubleWithoutRecompile(),)).apply(trace(model, X), PassContext(X))
    result = run_pass(DoubleWithoutRecompile(), model, X)
    for gm in (compiled.graph_module, outcome.graph_module, result.graph):
        assert "* 2.0" in gm.code  # the generated forward is the rewritten graph's
        doubled = next(n for n in gm.graph.nodes if n.target is operator.mul)
        assert tuple(doubled.meta["tensor_meta"].shape) == tuple(expected.shape)
        with torch.no_grad():
            torch.testing.assert_close(gm(*X), expected)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*X), expected)
