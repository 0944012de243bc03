"""The pytest plugin (golden fixture, --update-goldens, FXCOMPRESS_ACCEPT, ini option) and GraphCheck."""

from __future__ import annotations

import io

import onnx
import pytest
import torch
from torch import nn

import fxcompress.verify  # noqa: F401  (imported once here, so inner pytest runs do not re-import it)
from fxcompress.graph_text import to_text
from fxcompress.testing import GraphCheck

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]


@pytest.fixture(autouse=True)
def _no_accept_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs must not inherit FXCOMPRESS_ACCEPT from whoever runs this suite."""
    monkeypatch.delenv("FXCOMPRESS_ACCEPT", raising=False)

MODEL_TEST = """
import torch
from torch import nn
from fxcompress.verify import propagate_shapes

class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))

def graph(width):
    torch.manual_seed(0)
    return propagate_shapes(torch.fx.symbolic_trace(Net(width).eval()), (torch.randn(1, 3, 4, 4),))

def test_net(golden):
    golden.check(graph(WIDTH), "net")
"""

CONV_LINE_8 = ("call_module   %conv = conv:Conv2d(3->8, k=3x3, s=1, p=1, g=1, bias) (%x) "
               "{weight: f32[8,3,3,3], bias: f32[8]} -> f32[1,8,4,4]")


def _model_test(pytester: pytest.Pytester, width: int) -> None:
    pytester.makepyfile(test_model=MODEL_TEST.replace("WIDTH", str(width)))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An in-process pytest run without the unrelated plugins (hypothesis re-imports itself each run)."""
    return pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:xdist", *args)


def _golden(pytester: pytest.Pytester, directory: str = "tests/goldens"):
    return pytester.path / directory / "net.fxg"


def test_missing_golden_fails_showing_the_text_and_writes_nothing(pytester):
    _model_test(pytester, 8)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*golden file *net.fxg does not exist*--update-goldens*",
                                 "# fxg 1 fx", CONV_LINE_8])
    assert not _golden(pytester).exists()


def test_update_goldens_writes_then_plain_run_passes(pytester):
    _model_test(pytester, 8)
    result = run(pytester, "--update-goldens")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*fxcompress: 1 golden file(s) written*", "created *net.fxg"])
    text = _golden(pytester).read_text(encoding="utf-8")
    assert text.startswith("# fxg 1 fx\n") and text.endswith("\n")
    assert CONV_LINE_8 in text.splitlines()
    run(pytester).assert_outcomes(passed=1)


def test_mismatch_fails_with_unified_diff_and_update_rewrites(pytester):
    _model_test(pytester, 8)
    run(pytester, "--update-goldens").assert_outcomes(passed=1)
    _model_test(pytester, 16)
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*graph differs from golden*net.fxg*--update-goldens*",
        "--- golden *net.fxg",
        "+++ actual",
        "@@ *",
        f"-{CONV_LINE_8}",
        "+call_module   %conv = conv:Conv2d(3->16, k=3x3, s=1, p=1, g=1, bias) (%x) "
        "{weight: f32[16,3,3,3], bias: f32[16]} -> f32[1,16,4,4]",
    ])
    assert CONV_LINE_8 in _golden(pytester).read_text(encoding="utf-8")

    result = run(pytester, "--update-goldens")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["updated *net.fxg"])
    assert "Conv2d(3->16," in _golden(pytester).read_text(encoding="utf-8")
    run(pytester).assert_outcomes(passed=1)


def test_accept_env_and_ini_directory(pytester, monkeypatch):
    pytester.makeini("[pytest]\nfxcompress_goldens = model_goldens\n")
    _model_test(pytester, 8)
    monkeypatch.setenv("FXCOMPRESS_ACCEPT", "1")
    run(pytester).assert_outcomes(passed=1)
    assert _golden(pytester, "model_goldens").exists()
    assert not _golden(pytester).exists()
    monkeypatch.setenv("FXCOMPRESS_ACCEPT", "0")
    _model_test(pytester, 4)
    run(pytester).assert_outcomes(failed=1)


def test_golden_accepts_text_and_rejects_escaping_names(pytester):
    pytester.makepyfile("""
        import pytest
        def test_text(golden):
            golden.check("# fxg 1 fx\\nplaceholder   %x", "sub/plain")
        def test_escape(golden):
            with pytest.raises(ValueError, match="relative name"):
                golden.path("../outside")
    """)
    run(pytester, "--update-goldens").assert_outcomes(passed=2)
    assert (pytester.path / "tests/goldens/sub/plain.fxg").read_text() == "# fxg 1 fx\nplaceholder   %x\n"


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.conv2(y) + y
        return self.fc(self.dropout(y.mean((2, 3))))


@pytest.fixture(scope="module")
def small_gm() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(Small().eval())


def test_graphcheck_count_absent_present_order_chain(small_gm):
    check = GraphCheck(small_gm)
    counts = {"Conv2d": 2, "BatchNorm2d": 1, "torch.relu": 1, "relu": 1, "add": 1, "Linear": 1}
    assert check.count(counts) is check
    check.absent(["Identity", "sigmoid"]).present(["dropout", "Dropout", "conv1", "Tensor.mean"])
    check.order(["conv1", "bn1", "relu", "conv2", "add", "fc", "output"])
    assert check.kind_counts()["Conv2d"] == 2


def test_graphcheck_count_message_lists_what_was_found(small_gm):
    with pytest.raises(AssertionError) as info:
        GraphCheck(small_gm).count({"BatchNorm2d": 0, "Conv2d": 2, "Linear": 3})
    message = str(info.value)
    assert "BatchNorm2d: expected 0, found 1 [bn1 (BatchNorm2d)]" in message
    assert "Linear: expected 3, found 1 [fc (Linear)]" in message
    assert not any(line.startswith("  Conv2d:") for line in message.splitlines()), "Conv2d count was right"
    assert "graph has 10 nodes:" in message and "Conv2d: 2" in message


def test_graphcheck_absent_present_order_messages(small_gm):
    absent = r"'dropout' should be absent but matches 1 node\(s\): dropout \(Dropout\)"
    with pytest.raises(AssertionError, match=absent):
        GraphCheck(small_gm).absent(["dropout", "Identity"])
    with pytest.raises(AssertionError, match=r"no node matches 'Sigmoid', 'gelu'"):
        GraphCheck(small_gm).present(["Conv2d", "Sigmoid", "gelu"])
    with pytest.raises(AssertionError) as info:
        GraphCheck(small_gm).order(["fc", "conv1"])
    assert ("no node matching 'conv1' after fc (Linear); it only occurs before, at conv1 (Conv2d)"
            in str(info.value))
    assert "node order: x (placeholder), conv1 (Conv2d)" in str(info.value)


def test_graphcheck_on_onnx_counts_op_types():
    buffer = io.BytesIO()
    torch.onnx.export(Small().eval(), (torch.randn(1, 3, 4, 4),), buffer, dynamo=False, opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    GraphCheck(model).count({"Conv": 2, "BatchNormalization": 0, "Gemm": 1}).absent(["Dropout"]) \
        .order(["Conv", "Relu", "Add", "Gemm"]).present(["/conv1/Conv"])
    found = r"Conv: expected 3, found 2 \[/conv1/Conv \(Conv\), /conv2/Conv \(Conv\)\]"
    with pytest.raises(AssertionError, match=found):
        GraphCheck(model).count({"Conv": 3})
    assert "= Conv(" in to_text(model)


def test_graphcheck_rejects_other_objects():
    with pytest.raises(TypeError, match="GraphCheck needs"):
        GraphCheck(nn.Linear(2, 2))


class WithDropouts(nn.Module):
    """A Dropout module named ``drop`` (not ``dropout``) and a functional dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.fc(self.drop(x)), 0.1, training=False)


@pytest.fixture(scope="module")
def dropouts_gm() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(WithDropouts().eval())


def test_graphcheck_design_example_catches_dropout_modules_and_functions(dropouts_gm):
    with pytest.raises(AssertionError) as info:
        GraphCheck(dropouts_gm).count({"BatchNorm2d": 0}).absent(["dropout"])
    assert ("'dropout' should be absent but matches 2 node(s): drop (Dropout), "
            "dropout (torch.nn.functional.dropout)") in str(info.value)
    GraphCheck(dropouts_gm).count({"dropout": 2, "Dropout": 2, "DROPOUT": 2, "torch.nn.functional.dropout": 1,
                                   "linear": 1})


def test_graphcheck_matches_names_exactly(dropouts_gm):
    GraphCheck(dropouts_gm).present(["drop", "fc"]).absent(["FC", "Drop"])
    with pytest.raises(AssertionError, match=r"no node matches 'FC'"):
        GraphCheck(dropouts_gm).present(["FC"])


@pytest.mark.parametrize("counts, message", [
    ({"batchnorm": 0}, r"'batchnorm': no node has this kind and it is not a module class, a torch function or a "
                       r"Tensor method, so count could never find it \(misspelled\?\)\. Did you mean 'BatchNorm"),
    ({"Linaer": 1}, r"'Linaer': no node has this kind .* Did you mean 'Linear'"),
    ({"fc": 1}, r"'fc': is a node name, but count matches kinds, not names \(that node is fc \(Linear\)\)"),
])
def test_graphcheck_count_rejects_a_kind_that_can_never_match(dropouts_gm, counts, message):
    with pytest.raises(AssertionError, match=message) as info:
        GraphCheck(dropouts_gm).count(counts)
    assert "graph has 5 nodes: Dropout: 1, Linear: 1, output: 1, placeholder: 1" in str(info.value)


def test_graphcheck_count_zero_of_a_real_absent_kind_passes(dropouts_gm):
    GraphCheck(dropouts_gm).count({"BatchNorm2d": 0, "batchnorm2d": 0, "torch.sigmoid": 0, "sigmoid": 0,
                                   "Tensor.view": 0, "WithDropouts": 0, "Small": 0,
                                   "torch.nn.modules.conv.Conv2d": 0, "operator.mul": 0})
    with pytest.raises(AssertionError, match=r"BatchNorm2d: expected 1, found 0 \[none\]"):
        GraphCheck(dropouts_gm).count({"BatchNorm2d": 1})


def test_graphcheck_onnx_kinds_are_checked_against_onnx_op_types():
    buffer = io.BytesIO()
    torch.onnx.export(Small().eval(), (torch.randn(1, 3, 4, 4),), buffer, dynamo=False, opset_version=17)
    model = onnx.load_from_string(buffer.getvalue())
    GraphCheck(model).count({"conv": 2, "QuantizeLinear": 0, "Dropout": 0})
    with pytest.raises(AssertionError, match=r"'Convv': no node has this kind and it is not an ONNX op type.*"
                                             r"Did you mean 'Conv'"):
        GraphCheck(model).count({"Convv": 0})


# --------------------------------------------------------------------------- run_pass


def test_run_pass_runs_one_pass_on_a_copy_and_checks_exactness() -> None:
    import torch
    from torch import nn

    from fxcompress import Pass, PassResult
    from fxcompress.testing import run_pass

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU()).eval()
    x = torch.randn(3, 4)
    res = run_pass("remove-dropout", model, x)
    assert [n.op for n in res.graph.graph.nodes].count("call_module") == 2
    assert isinstance(model[1], nn.Dropout)  # the caller's model is untouched
    torch.testing.assert_close(res.graph(x), model(x))
    assert all("tensor_meta" in n.meta for n in res.graph.graph.nodes if n.op != "output")

    class Negate(Pass):  # claims exactness, flips the sign of the last layer's output
        name = "negate-output"
        exact = True

        def run(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                neg = gm.graph.call_function(torch.neg, (out.args[0],))
            out.args = (neg,)
            gm.recompile()
            return PassResult(graph=gm)

    with pytest.raises(AssertionError, match="negate-output is declared exact.*first divergent node: neg"):
        run_pass(Negate(), model, x)
    assert run_pass(Negate(), model, x, check=False).graph(x).neg().allclose(model(x))
    with pytest.raises(ValueError, match="runs one pass"):
        run_pass("remove-dropout,eliminate-dead-code", model, x)
