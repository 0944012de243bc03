"""Pipeline strings: parsing, printing, type checks and error messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress.options import format_value
from fxcompress.registry import available, get, parse_pipeline


@fxc.register
@dataclass(frozen=True)
class _Opts(fxc.Pass):
    name: ClassVar[str] = "test-options"
    ratio: float = 0.5
    round_to: int = 1
    mode: Literal["l1", "l2"] = "l2"
    exclude: tuple[str, ...] = ()
    ratios: dict[str, float] | None = None
    flag: bool = False
    label: str = "x"

    def run(self, gm: GraphModule, ctx: fxc.PassContext) -> fxc.PassResult:
        return fxc.PassResult(gm)


@pytest.mark.parametrize("text", [
    "test-options",
    "test-options{ratio=0.25,round-to=8}",
    "test-options{mode=l1,exclude=[fc,layer4.*],flag=true}",
    'test-options{ratios={layer3.*:0.6,fc:0.0},label="a b"}',
    "repeat{n=3}(test-options{ratio=0.1},test-options)",
    "pipeline{verify=false}(test-options,repeat{n=2}(test-options))",
])
def test_round_trip(text: str) -> None:
    passes = parse_pipeline(text)
    assert ",".join(map(str, passes)) == text
    assert parse_pipeline(",".join(map(str, passes))) == passes


def test_quoted_and_bare_keys_parse_alike() -> None:
    assert parse_pipeline('test-options{ratios={"layer3.*":0.6}}') == parse_pipeline("test-options{ratios={layer3.*:0.6}}")


def test_values_are_typed_and_converted() -> None:
    (p,) = parse_pipeline("test-options{ratio=1,round-to=8,exclude=[a,'b,c'],ratios={x:1}}")
    assert p == _Opts(ratio=1.0, round_to=8, exclude=("a", "b,c"), ratios={"x": 1.0})
    assert isinstance(p.ratio, float) and isinstance(p.exclude, tuple)


def test_pipeline_object_round_trip() -> None:
    pipe = fxc.Pipeline.parse("test-options{ratio=0.3},repeat{n=2}(test-options{flag=true})")
    assert str(pipe) == "test-options{ratio=0.3},repeat{n=2}(test-options{flag=true})"
    assert str(fxc.Pipeline.parse(str(pipe))) == str(pipe)
    assert [p.name for p in pipe.leaves()] == ["test-options", "test-options"]


def test_unknown_pass_lists_known_names() -> None:
    with pytest.raises(fxc.PipelineError, match=r"unknown pass 'fold-batchnrom'; known passes: .*test-options"):
        parse_pipeline("test-options,fold-batchnrom")


def test_unknown_option_lists_the_options() -> None:
    with pytest.raises(fxc.PipelineError, match=r"no option 'ration'; its options: ratio, round-to, mode"):
        parse_pipeline("test-options{ration=0.5}")


@pytest.mark.parametrize("text, message", [
    ("test-options{ratio=abc}", r"option 'ratio' of pass 'test-options' expects a number; got 'abc'"),
    ("test-options{round-to=1.5}", r"expects an integer; got 1.5"),
    ("test-options{mode=l3}", r"must be one of 'l1', 'l2'; got 'l3'"),
    ("test-options{flag=1}", r"expects true/false; got 1"),
    ("test-options{ratio=0.5", r"expected ',' or '}'"),
    ("test-options(test-options)", r"does not take nested passes"),
    ("repeat{n=0}(test-options)", r"Repeat needs n >= 1"),
])
def test_bad_options_are_errors(text: str, message: str) -> None:
    with pytest.raises(fxc.PipelineError, match=message):
        parse_pipeline(text)


def test_values_are_never_evaluated() -> None:
    (p,) = parse_pipeline('test-options{label="__import__(\'os\').system(\'false\')"}')
    assert p.label == "__import__('os').system('false')"


def test_strings_that_look_like_literals_are_quoted() -> None:
    assert format_value("true") == '"true"'
    assert format_value("1.5") == '"1.5"'
    assert format_value("layer3.*") == "layer3.*"
    (p,) = parse_pipeline(str(_Opts(label="true")))
    assert p.label == "true"


def test_registry_lists_framework_and_entry_point_passes() -> None:
    names = available()
    assert {"pipeline", "repeat", "test-options"} <= set(names)
    assert get("test-options") is _Opts


def test_duplicate_name_is_an_error() -> None:
    @dataclass(frozen=True)
    class Clash(fxc.Pass):
        name: ClassVar[str] = "test-options"

    with pytest.raises(fxc.PipelineError, match="registered twice"):
        fxc.register(Clash)


def test_string_options_round_trip_with_quotes_and_escapes() -> None:
    for label in ['q"x', 'a\\b', "it's", "nan", "inf", "none", "True", " x", "é x", "\n\t", "", "{a:1}", "a,b)"]:
        p = _Opts(label=label, exclude=(label, "fc"), ratios={label: 0.5})
        assert parse_pipeline(str(p)) == [p], str(p)
    (p,) = parse_pipeline('test-options{label="q\\"x"}')
    assert p.label == 'q"x'
    (p,) = parse_pipeline("test-options{label='raw \\d+'}")
    assert p.label == "raw \\d+"


@given(st.text(), st.lists(st.text(max_size=8), max_size=3))
@settings(max_examples=150, deadline=None)
def test_any_string_round_trips(label: str, exclude: list[str]) -> None:
    p = _Opts(label=label, exclude=tuple(exclude), ratios={k: 1.0 for k in exclude} or None)
    assert parse_pipeline(str(p)) == [p]
    assert str(fxc.Pipeline.parse(str(fxc.Pipeline([p])))) == str(p)


@pytest.mark.parametrize("text, position, message", [
    ('test-options{label="a\\qb"}', 21, "malformed string literal (Invalid \\escape)"),
    ('test-options{label="\\u12"}', 21, "malformed string literal"),
    ('test-options{label="abc}', 19, "unterminated string"),
    ("test-options{label='abc}", 19, "unterminated string"),
    ("test-options{exclude=[", 22, "expected a value, got the end of the pipeline string"),
])
def test_malformed_literals_name_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(fxc.PipelineError) as info:
        parse_pipeline(text)
    assert f"{message}" in str(info.value) and f"at position {position}:" in str(info.value)
    assert str(info.value).splitlines()[-1] == "  " + " " * position + "^"


def test_register_rejects_a_class_that_is_not_a_frozen_dataclass() -> None:
    class Plain(fxc.Pass):
        name: ClassVar[str] = "test-plain"

    class Undecorated(_Opts):
        name: ClassVar[str] = "test-undecorated"
        extra: int = 1  # not an option: the subclass is no dataclass of its own

    with pytest.raises(fxc.PipelineError, match=r"\('test-plain'\) is not a dataclass itself; decorate the "
                                                 r"class with @dataclass\(frozen=True\)"):
        fxc.register(Plain)
    with pytest.raises(fxc.PipelineError, match=r"\('test-undecorated'\) is not a dataclass itself"):
        fxc.register(Undecorated)
    assert "test-plain" not in available() and "test-undecorated" not in available()


@pytest.mark.parametrize("name", ["FoldBN", "fold_bn", "fold bn", "-fold", "fold--bn", "fold-", "2fold"])
def test_register_rejects_a_name_that_is_not_kebab_case(name: str) -> None:
    @dataclass(frozen=True)
    class Named(fxc.Pass):
        pass

    Named.name = name  # type: ignore[misc]
    with pytest.raises(fxc.PipelineError, match=rf"name {name!r} is not kebab-case; use lowercase"):
        fxc.register(Named)
    assert name not in available()


def test_pass_classes_are_reachable_from_the_library_and_each_subpackage() -> None:
    import passes
    import passes.onnx
    import passes.prune
    import passes.quantize
    from passes.onnx import CheckTensorRT

    assert CheckTensorRT is passes.CheckTensorRT is get("check-tensorrt")
    assert passes.quantize.QuantizeInt8 is get("quantize-int8")
    assert passes.prune.PruneChannels is get("prune-channels")
    assert passes.Repeat is fxc.Repeat
    assert {"CheckTensorRT", "OnnxCleanup", "check_tensorrt"} <= set(dir(passes.onnx))
    assert "QuantizeInt8" not in dir(passes.onnx)  # a subpackage lists only its own passes
    with pytest.raises(AttributeError, match=r"module 'passes.onnx' has no pass class 'FoldBatchNorm'; "
                                             r"available: CheckTensorRT, (\w+, )*OnnxCleanup"):
        passes.onnx.FoldBatchNorm  # noqa: B018


@dataclass(frozen=True)
class _OwnPostInit(fxc.Pass):
    """Its ``__post_init__`` does not call super() and compares ``ratio`` with a number."""

    name: ClassVar[str] = "test-own-post-init"
    ratio: float = 0.5
    names: tuple[str, ...] = ()
    model: object = fxc.pass_base.not_in_pipeline_string()

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise fxc.PipelineError(f"test-own-post-init: ratio={self.ratio} must be in [0, 1)")

    def run(self, gm: GraphModule, ctx: fxc.PassContext) -> fxc.PassResult:
        return fxc.PassResult(gm)


@dataclass(frozen=True)
class _Inherits(_OwnPostInit):
    name: ClassVar[str] = "test-inherits"
    extra: int = 0


@pytest.mark.parametrize("make, message", [
    (lambda: _Opts(ratio="x"), "option 'ratio' of pass 'test-options' expects a number; got 'x'"),
    (lambda: _Opts(round_to=2.5), "option 'round_to' of pass 'test-options' expects an integer; got 2.5"),
    (lambda: _Opts(mode="l3"), "option 'mode' of pass 'test-options' must be one of 'l1', 'l2'; got 'l3'"),
    (lambda: _OwnPostInit(ratio="x"), "option 'ratio' of pass 'test-own-post-init' expects a number; got 'x'"),
    (lambda: _OwnPostInit(names=[1]), "option 'names' of pass 'test-own-post-init' expects a string; got 1"),
    (lambda: _Inherits(ratio="x"), "option 'ratio' of pass 'test-inherits' expects a number; got 'x'"),
    (lambda: _Inherits(extra="2"), "option 'extra' of pass 'test-inherits' expects an integer; got '2'"),
    (lambda: fxc.Repeat(n="2"), "option 'n' of pass 'repeat' expects an integer; got '2'"),
])
def test_options_given_in_python_are_checked_like_pipeline_strings(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(fxc.PipelineError) as info:
        make()
    assert str(info.value) == message


def test_python_options_get_the_parser_message_and_are_normalized() -> None:
    with pytest.raises(fxc.PipelineError) as parsed:
        parse_pipeline("test-options{ratio=x}")
    with pytest.raises(fxc.PipelineError) as built:
        _Opts(ratio="x")
    assert str(built.value) == str(parsed.value)
    p = _Opts(ratio=1, exclude=["a", "b"])
    assert p == parse_pipeline("test-options{ratio=1,exclude=[a,b]}")[0]
    assert isinstance(p.ratio, float) and p.exclude == ("a", "b")
    assert _OwnPostInit(ratio=0.25, model=[1, 2]).model == [1, 2]  # not_in_pipeline_string: not checked
    with pytest.raises(fxc.PipelineError, match=r"ratio=2.0 must be in \[0, 1\)"):
        _Inherits(ratio=2)  # the subclass's own check still runs, after the type check


def test_library_passes_check_options_in_python() -> None:
    import torch

    from passes import Distill, PruneChannels

    with pytest.raises(fxc.PipelineError) as info:
        PruneChannels(ratio="x")
    assert str(info.value) == "option 'ratio' of pass 'prune-channels' expects a number; got 'x'"
    teacher, data = torch.nn.Linear(2, 2), [(torch.zeros(1, 2), torch.zeros(1, 2))]
    d = Distill(teacher=teacher, data=data)
    assert d.teacher is teacher and d.data is data
