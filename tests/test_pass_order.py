"""Ordering constraints declared by passes: hard ones are errors before any pass runs, soft ones
(``order_preferences``) are warnings with the suggested order and the reason, shown by
``Pipeline.check()``, ``compile`` (``PassOrderWarning``, the logger, the ``input`` row) and
``fxcompress compile`` (stderr)."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress.pass_base import PassContext, PassResult
from passes import FineTune, FoldBatchNorm, PruneChannels, QuantizeInt8
from test_pipeline import OnnxNoOp

X = (torch.randn(2, 3, 6, 6),)
#: a context that satisfies every ``requires`` of the built-in passes
FULL = PassContext(X, calibration=[X], train_data=[(X[0], torch.tensor([0, 1]))], original=nn.Identity())

FOLD_BEFORE_TRAINING = "training after BatchNorm is folded away barely recovers"
CHANNELS_BEFORE_QUANT = "prune channels first, then quantize"
CHANNELS_BEFORE_UNSTRUCTURED = "channel importance sees the zeros"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@dataclass(frozen=True)
class Recorder(fxc.Pass):
    """Records every run, so a test can tell that no pass ran."""

    name: ClassVar[str] = "test-order-recorder"
    exact: ClassVar[bool] = True
    runs: ClassVar[list[str]] = []

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        Recorder.runs.append(self.name)
        return PassResult(gm)


@dataclass(frozen=True)
class Early(Recorder):
    """A third-party pass declaring its own preference: the framework only evaluates the data."""

    name: ClassVar[str] = "test-order-early"
    order_preferences: ClassVar[tuple] = (fxc.prefer_before("test-order-late", reason="late needs early's output"),)


@dataclass(frozen=True)
class Late(Recorder):
    name: ClassVar[str] = "test-order-late"


def _warnings(text: str, ctx: PassContext = FULL) -> list[str]:
    return [d.message for d in fxc.Pipeline.parse(text).check(ctx)]


def _suggested(message: str) -> str:
    return message.split("suggested order: ", 1)[1].rstrip(")")


@pytest.mark.parametrize("text, reason, moved, suggested", [
    ("fold-batchnorm,prune-channels{ratio=0.7},distill{epochs=2}", FOLD_BEFORE_TRAINING,
     "'fold-batchnorm' (#1) comes before 'distill{epochs=2}' (#3)",
     "prune-channels{ratio=0.7},distill{epochs=2},fold-batchnorm"),
    ("fold-batchnorm,fine-tune{epochs=2},quantize-int8", FOLD_BEFORE_TRAINING,
     "'fold-batchnorm' (#1) comes before 'fine-tune{epochs=2}' (#2)",
     "fine-tune{epochs=2},fold-batchnorm,quantize-int8"),
    ("fold-batchnorm,quantize-int8{qat=true},fine-tune", FOLD_BEFORE_TRAINING,
     "'fold-batchnorm' (#1) comes before 'quantize-int8{qat=true}' (#2), 'fine-tune' (#3)",
     "quantize-int8{qat=true},fine-tune,fold-batchnorm"),
    ("fold-batchnorm,quantize-int8,prune-channels{ratio=0.3}", CHANNELS_BEFORE_QUANT,
     "'prune-channels{ratio=0.3}' (#3) comes after 'quantize-int8' (#2)",
     "fold-batchnorm,prune-channels{ratio=0.3},quantize-int8"),
    ("prune-nm,prune-channels,fine-tune,fold-batchnorm", CHANNELS_BEFORE_UNSTRUCTURED,
     "'prune-channels' (#2) comes after 'prune-nm' (#1)", "prune-channels,prune-nm,fine-tune,fold-batchnorm"),
    ("prune-magnitude{amount=0.3},prune-channels,onnx-cleanup", CHANNELS_BEFORE_UNSTRUCTURED,
     "'prune-channels' (#2) comes after 'prune-magnitude{amount=0.3}' (#1)",
     "prune-channels,prune-magnitude{amount=0.3},onnx-cleanup"),
])
def test_each_declared_preference_warns_with_the_suggested_order_and_reason(
        text: str, reason: str, moved: str, suggested: str) -> None:
    (message,) = _warnings(text)
    assert message.startswith(f"pass order: {moved}"), message
    assert reason in message
    assert _suggested(message) == suggested
    assert _warnings(suggested) == []  # the suggestion satisfies every preference
    fxc.Pipeline.parse(suggested).check(FULL)  # and every hard constraint (no raise)


def test_two_preferences_broken_at_once_get_one_suggestion_satisfying_both() -> None:
    messages = _warnings("fold-batchnorm,prune-nm,prune-channels,fine-tune,quantize-int8")
    assert len(messages) == 2
    assert {_suggested(m) for m in messages} == {"prune-channels,prune-nm,fine-tune,fold-batchnorm,quantize-int8"}
    messages = _warnings("fold-batchnorm,quantize-int8,prune-nm,prune-channels,fine-tune")
    assert len(messages) == 3 and len({_suggested(m) for m in messages}) == 1
    assert _warnings(_suggested(messages[0])) == []


@pytest.mark.parametrize("text", [
    "prune-channels{ratio=0.7},distill{epochs=2},fold-batchnorm",
    "prune-channels{ratio=0.7},fine-tune{epochs=2},fold-batchnorm",
    "fine-tune,fold-batchnorm,quantize-int8",
    "fold-batchnorm,quantize-int8",            # PTQ does not train
    "prune-channels,prune-nm,fine-tune,fold-batchnorm,quantize-int8",
    "remove-dropout,fold-batchnorm,onnx-cleanup",
])
def test_the_good_order_gives_no_warning(text: str) -> None:
    assert _warnings(text) == []


def test_builtin_recipes_follow_every_declared_preference() -> None:
    from passes.recipes import RECIPES

    for name, text in RECIPES.items():
        assert _warnings(text) == [], name


def test_trains_is_data_on_the_class_or_the_instance() -> None:
    assert FineTune.trains and not FoldBatchNorm.trains and not PruneChannels.trains
    assert QuantizeInt8(qat=True).trains and not QuantizeInt8().trains and not QuantizeInt8.trains


def test_nested_pipeline_warns_without_a_flat_suggestion() -> None:
    (message,) = _warnings("fold-batchnorm,repeat{n=2}(prune-channels,fine-tune)")
    assert "'fold-batchnorm' (#1) comes before 'fine-tune' (#3), 'fine-tune' (#5)" in message
    assert "move it after 'fine-tune'" in message and "suggested order" not in message


def test_third_party_passes_declare_preferences_as_data() -> None:
    (d,) = fxc.Pipeline([Late(), Early()]).check(PassContext(X))
    assert d.severity == "warning" and d.node is None
    assert d.message == ("pass order: 'test-order-early' (#2) comes after 'test-order-late' (#1), but it should "
                         "run before 'test-order-late': late needs early's output (move it before "
                         "'test-order-late'; suggested order: test-order-early,test-order-late)")
    assert fxc.Pipeline([Early(), Late()]).check(PassContext(X)) == []


def test_compile_shows_the_warning_before_any_work(caplog: pytest.LogCaptureFixture) -> None:
    """As a PassOrderWarning, in the log and in the report's ``input`` row; no pass has run when
    the warning is given."""
    Recorder.runs.clear()
    seen_at_start: list[int] = []

    class AtStart:
        def on_pipeline_start(self, pipeline: fxc.Pipeline, ctx: PassContext) -> None:
            seen_at_start.append(len(Recorder.runs))

    with pytest.warns(fxc.PassOrderWarning, match=r"'test-order-early' \(#2\) comes after 'test-order-late'"), \
            caplog.at_level(logging.WARNING, logger="fxcompress"):
        compiled = fxc.compile(Net(), X, [Late(), Early()], target="fx", instruments=[AtStart()], progress=False)
    assert seen_at_start == [0] and Recorder.runs == ["test-order-late", "test-order-early"]
    assert any("suggested order: test-order-early,test-order-late" in r.getMessage() for r in caplog.records)
    (diag,) = compiled.report[0].diagnostics
    assert compiled.report[0].name == "input" and diag["severity"] == "warning"
    assert "late needs early's output" in diag["message"]
    assert all(d["severity"] == "info" for r in compiled.report[1:] for d in r.diagnostics)  # only "found nothing"


def test_compile_in_the_good_order_warns_nothing() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxc.PassOrderWarning)
        compiled = fxc.compile(Net(), X, [Early(), Late()], target="fx", progress=False)
    assert compiled.report[0].diagnostics == []


@pytest.mark.parametrize("passes, error", [
    ([Recorder(), OnnxNoOp(), Late()], "'test-order-late' (#4) works on the FX graph but comes after ONNX pass"),
    ([Recorder(), FineTune()], "'fine-tune' (#2) requires 'train-data'"),
])
def test_hard_constraints_are_errors_before_any_pass_runs(passes: list[fxc.Pass], error: str) -> None:
    Recorder.runs.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxc.PassOrderWarning)
        with pytest.raises(fxc.PipelineError) as info:
            fxc.compile(Net(), X, passes, target="onnx", progress=False)
    assert error in str(info.value)
    assert Recorder.runs == []


def test_cli_compile_prints_the_warning_to_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from fxcompress import cli

    (tmp_path / "ordermodels.py").write_text(
        "import torch\nfrom torch import nn\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), "
        "nn.Linear(64, 2)).eval()\n")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["fxcompress", "compile", "ordermodels:make", "--input-shape", "1x3x6x6",
                                      "--passes", "fold-batchnorm,quantize-int8,prune-channels",
                                      "--calibration", "x.npy", "--target", "onnx", "--out", "out"])
    monkeypatch.setitem(cli._state, "debug", False)
    cli.main()
    out, err = capsys.readouterr()
    (line,) = [ln for ln in err.splitlines() if ln.startswith("warning: pass order:")]
    assert "'prune-channels' (#3) comes after 'quantize-int8' (#2)" in line
    assert CHANNELS_BEFORE_QUANT in line
    assert "suggested order: fold-batchnorm,prune-channels,quantize-int8" in line
    assert "PassOrderWarning" not in err and "wrote out/" in out
