"""fxcompress.trace: zoo models trace faithfully, the user's model is untouched, untraceable code
gets a TraceError naming module and line or becomes an opaque leaf."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fxcompress.errors import InputError, TraceError
from fxcompress.trace import trace
from zoo import ZOO

THIS_FILE = Path(__file__).resolve()


def _line_of(marker: str) -> int:
    for i, line in enumerate(THIS_FILE.read_text().splitlines(), start=1):
        if marker in line and "_line_of" not in line:
            return i
    raise AssertionError(marker)


class Block(nn.Module):
    def __init__(self, ch: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # MARK-sum-branch
            return self.conv(x)
        return -x


class Iterates(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([row * 2 for row in x])  # MARK-iterate


class Net(nn.Module):
    """stem -> layer1 (plain conv) -> layer2 = [Block, conv] -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(Block(), nn.Conv2d(4, 4, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TopLevelBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # MARK-top-branch
            return self.fc(x)
        return x


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, double: bool = False) -> Tensor:
        y = self.fc(x)
        if double:
            return y * 2
        return y


def _x(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _node_values(gm: torch.fx.GraphModule, inputs: tuple[Tensor, ...]) -> dict[str, object]:
    values: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            values[n.name] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the zoo -------------------------------------------------------------------------------------

def test_zoo_traces_and_reproduces_eager(zoo_case) -> None:
    gm = trace(zoo_case.model, zoo_case.inputs)
    with torch.no_grad():
        expected = zoo_case.model(*zoo_case.inputs)
        got = gm(*zoo_case.inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not gm.training
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert tuple(out.meta["tensor_meta"].shape) == tuple(expected.shape)
    for node, inp in zip((n for n in gm.graph.nodes if n.op == "placeholder"), zoo_case.inputs):
        assert tuple(node.meta["tensor_meta"].shape) == tuple(inp.shape)
    values = _node_values(gm, zoo_case.inputs)
    for node in gm.graph.nodes:
        if isinstance(values.get(node.name), Tensor):
            assert tuple(node.meta["tensor_meta"].shape) == tuple(values[node.name].shape), node.name
            assert node.meta["tensor_meta"].dtype == values[node.name].dtype, node.name


def test_zoo_models_are_seeded_eval_small_with_real_batchnorm_stats() -> None:
    for name, factory in ZOO.items():
        (m1, x1), (m2, x2) = factory(), factory()
        assert not any(m.training for m in m1.modules()), name
        assert all(x.shape[0] == 2 for x in x1), name
        torch.testing.assert_close(x1, x2)
        for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
            assert torch.equal(a, b), (name, k)
        assert sum(p.numel() for p in m1.parameters()) < 50_000, name
        for bn in (m for m in m1.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var)), name
            assert bn.running_mean.abs().max() > 0, name


def test_zoo_tracing_does_not_change_global_rng() -> None:
    state = torch.get_rng_state()
    ZOO["resnet_basic"]()
    assert torch.equal(state, torch.get_rng_state())


def test_leaf_mha_and_lstm_are_recorded_in_graph_order() -> None:
    model, inputs = ZOO["leaf_mha_lstm"]()
    gm = trace(model, inputs, frontend="fx")
    assert gm.meta["opaque_modules"] == {"mha": "leaf by default", "lstm": "leaf by default"}
    assert list(gm.meta["opaque_modules"]) == ["mha", "lstm"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "mha" in targets and "lstm" in targets
    assert not any(t.startswith(("mha.", "lstm.")) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


def test_auto_frontend_exports_and_inlines_default_leaves() -> None:
    """MultiheadAttention and LSTM hold parameters: ``auto`` exports them instead of leaving them opaque."""
    model, inputs = ZOO["leaf_mha_lstm"]()
    gm = trace(model, inputs)
    assert gm.meta["opaque_modules"] == {}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "mha" not in targets and "lstm" not in targets
    attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert {"mha.in_proj_weight", "mha.out_proj.weight"} <= attrs and any(str(a).startswith("lstm.") for a in attrs)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)
        wide = tuple(torch.cat([x, x, x]) for x in inputs)  # the inlined graphs keep the batch dynamic
        torch.testing.assert_close(gm(*wide), model(*wide), rtol=1e-5, atol=1e-6)


def test_zoo_without_opaque_parts_records_none() -> None:
    model, inputs = ZOO["transformer_block"]()
    gm = trace(model, inputs)
    assert gm.meta["opaque_modules"] == {}
    ops = {getattr(n.target, "__name__", n.target) for n in gm.graph.nodes}
    assert {"matmul", "softmax", "transpose", "reshape"} <= ops


# --- the user's model is never touched -----------------------------------------------------------

def test_user_model_is_not_mutated_in_train_mode() -> None:
    model, inputs = ZOO["resnet_basic"]()
    model.train()
    model.layers[0].eval()
    before = _state(model)
    flags = [m.training for m in model.modules()]
    gm = trace(model, inputs)
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not gm.training and not any(m.training for m in gm.modules())
    gm_ptrs = {p.data_ptr() for p in gm.parameters()}
    assert gm_ptrs.isdisjoint({p.data_ptr() for p in model.parameters()})


def test_train_true_keeps_train_mode_on_the_copy_only() -> None:
    model, inputs = ZOO["conv_dropout_identity"]()
    gm = trace(model, inputs, train=True)
    assert gm.training and gm.get_submodule("features.1").training
    assert not model.training


# --- untraceable code ----------------------------------------------------------------------------

def test_submodule_branch_raises_with_module_path_and_line_when_asked() -> None:
    with pytest.raises(TraceError) as info:
        trace(Net().eval(), _x(2, 3, 5, 5), on_untraceable="error")
    msg = str(info.value)
    assert "'layer2.0' (Block)" in msg
    assert f"{THIS_FILE}:{_line_of('MARK-sum-branch')}" in msg
    assert "if x.sum() > 0:" in msg
    assert "leaf_modules=['layer2.0']" in msg and "concrete_args" in msg
    assert info.value.module_path == "layer2.0"
    assert isinstance(info.value.__cause__, Exception)


def test_submodule_branch_becomes_opaque_leaf_and_outputs_match_both_branches() -> None:
    model = Net().eval()
    gm = trace(model, _x(2, 3, 5, 5))
    opaque = gm.meta["opaque_modules"]
    assert list(opaque) == ["layer2.0"]
    assert opaque["layer2.0"].startswith("untraceable:")
    assert f"{THIS_FILE.name}:{_line_of('MARK-sum-branch')}" in opaque["layer2.0"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]
    with torch.no_grad():
        for sign in (1.0, -1.0):
            x = sign * (_x(2, 3, 5, 5).abs() + 0.1)
            torch.testing.assert_close(gm(x), model(x))


def test_innermost_failing_module_is_made_opaque() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Conv2d(4, 4, 1)
            self.inner = nn.Sequential(nn.ReLU(), Block())

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(self.pre(x)) + 1

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Wrapper()
            self.b = Wrapper()

        def forward(self, x: Tensor) -> Tensor:
            return self.b(self.a(x))

    model = Outer().eval()
    gm = trace(model, _x(2, 4, 3, 3))
    assert list(gm.meta["opaque_modules"]) == ["a.inner.1", "b.inner.1"]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["a.pre", "a.inner.0", "a.inner.1", "b.pre", "b.inner.0", "b.inner.1"]
    x = _x(2, 4, 3, 3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_iterating_a_proxy_is_reported_and_made_opaque() -> None:
    model = nn.Sequential(nn.Linear(4, 4), Iterates(), nn.ReLU()).eval()
    with pytest.raises(TraceError) as info:
        trace(model, _x(2, 4), on_untraceable="error")
    assert "'1' (Iterates)" in str(info.value)
    assert f"{THIS_FILE}:{_line_of('MARK-iterate')}" in str(info.value)
    gm = trace(model, _x(2, 4))
    assert list(gm.meta["opaque_modules"]) == ["1"]
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(3, 4)), model(_x(3, 4)))


def test_untraceable_call_is_reported() -> None:
    class Alloc(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x + torch.zeros(int(x.shape[0]), 1)  # MARK-untraceable-call

    model = nn.Sequential(nn.Linear(4, 4), Alloc()).eval()
    with pytest.raises(TraceError) as info:
        trace(model, _x(2, 4), on_untraceable="error")
    assert "'1' (Alloc)" in str(info.value)
    assert f":{_line_of('MARK-untraceable-call')}" in str(info.value)
    assert list(trace(model, _x(2, 4)).meta["opaque_modules"]) == ["1"]


@pytest.mark.parametrize("mode", ["leaf", "error"])
def test_top_level_branch_is_always_a_trace_error(mode: str) -> None:
    with pytest.raises(TraceError) as info:
        trace(TopLevelBranch().eval(), _x(2, 4), on_untraceable=mode)
    msg = str(info.value)
    assert "top-level forward of TopLevelBranch" in msg
    assert f"{THIS_FILE}:{_line_of('MARK-top-branch')}" in msg
    assert info.value.module_path == ""


def test_leaf_modules_by_type_and_by_name() -> None:
    model = Net().eval()
    by_type = trace(model, _x(2, 3, 5, 5), leaf_modules=[Block], on_untraceable="error")
    assert by_type.meta["opaque_modules"] == {"layer2.0": "leaf_modules"}
    by_name = trace(model, _x(2, 3, 5, 5), leaf_modules=("layer2.0", "layer1"), on_untraceable="error")
    assert by_name.meta["opaque_modules"] == {"layer1": "leaf_modules", "layer2.0": "leaf_modules"}
    assert [n.target for n in by_name.graph.nodes if n.op == "call_module"] == \
        ["stem", "layer1", "layer2.0", "layer2.1", "fc"]


def test_torch_nn_types_as_leaf_modules_are_not_reported_opaque() -> None:
    model, inputs = ZOO["audio_conv1d"]()
    gm = trace(model, inputs, leaf_modules=[nn.Conv1d])
    assert gm.meta["opaque_modules"] == {}


def test_concrete_args_specialize_a_python_branch() -> None:
    model = Flagged().eval()
    with pytest.raises(TraceError):
        trace(model, _x(2, 4), frontend="fx")
    auto = trace(model, _x(2, 4))  # torch.export captures the default branch (double=False)
    assert auto.meta["frontend"] == "export"
    with torch.no_grad():
        torch.testing.assert_close(auto(_x(3, 4)), model(_x(3, 4)))
    gm = trace(model, _x(2, 4), concrete_args={"double": True})
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(2, 4)), model(_x(2, 4), True))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert "_assert" not in gm.code and "double" not in gm.code
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert tuple(out.meta["tensor_meta"].shape) == (2, 4)


class Options(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor, scale: float = 1.0, bias: Tensor | None = None, mode: str = "relu") -> Tensor:
        y = self.fc(x) * scale
        if bias is not None:
            y = y + bias
        return torch.relu(y) if mode == "relu" else torch.tanh(y)


def test_concrete_args_of_any_plain_value_leave_only_tensor_inputs() -> None:
    model = Options().eval()
    gm = trace(model, _x(2, 4), concrete_args={"scale": 3.0, "bias": None, "mode": "tanh"})
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert not any("assert" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(_x(2, 4)), model(_x(2, 4), 3.0, None, "tanh"))


def test_trace_is_deterministic() -> None:
    a, b = trace(Net().eval(), _x(2, 3, 5, 5)), trace(Net().eval(), _x(2, 3, 5, 5))
    assert a.code == b.code
    assert a.meta["opaque_modules"] == b.meta["opaque_modules"]


def test_nodes_remember_the_user_source_line() -> None:
    model, inputs = ZOO["transformer_block"]()
    gm = trace(model, inputs)
    softmax = next(n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "softmax")
    filename, line = softmax.meta["source_location"].rsplit(":", 1)
    assert Path(filename).name == "zoo.py"
    assert "softmax" in Path(filename).read_text().splitlines()[int(line) - 1]


# --- bad arguments -------------------------------------------------------------------------------

def test_lone_tensor_and_list_inputs_are_accepted() -> None:
    model, (x,) = ZOO["audio_conv1d"]()
    for inputs in (x, [x], (x,)):
        gm = trace(model, inputs)
        torch.testing.assert_close(gm(x), model(x))


def test_bad_inputs_get_clear_errors() -> None:
    model, (x,) = ZOO["audio_conv1d"]()
    with pytest.raises(InputError, match=r"example_inputs\[1\] is a int.*concrete_args"):
        trace(model, (x, 3))
    with pytest.raises(InputError, match=r"takes 1 required tensor argument\(s\) \(x\) but .* has 2"):
        trace(model, (x, x))
    with pytest.raises(InputError, match="example_inputs must be a tuple"):
        trace(model, {"x": x})
    with pytest.raises(InputError, match="on_untraceable"):
        trace(model, x, on_untraceable="skip")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no submodule named 'feature'.*features"):
        trace(model, x, leaf_modules=["feature"])
    with pytest.raises(InputError, match="torch.nn.Module"):
        trace(lambda t: t, x)  # type: ignore[arg-type]


def test_shape_error_names_the_node_and_the_inputs() -> None:
    model, _ = ZOO["resnet_basic"]()
    with pytest.raises(TraceError) as info:
        trace(model, _x(2, 4, 16, 16))
    msg = str(info.value)
    assert "node 'conv1' (module 'conv1': Conv2d)" in msg
    assert "(2, 4, 16, 16)" in msg
    assert info.value.node == "conv1"


def test_model_that_cannot_be_copied_gets_trace_error() -> None:
    model = nn.Linear(4, 4)
    model.lock = threading.Lock()
    with pytest.raises(TraceError, match="deep-copy Linear"):
        trace(model, _x(2, 4))


def test_compiled_report_lists_opaque_modules_with_their_reasons() -> None:
    import fxcompress as fxc

    compiled = fxc.compile(Net().eval(), _x(2, 3, 5, 5), [], target="fx", leaf_modules=["layer1"], progress=False)
    assert list(compiled.report.meta["opaque_modules"]) == ["layer1", "layer2.0"]
    text = " ".join(str(compiled.report).split())
    where = f"{THIS_FILE}:{_line_of('MARK-sum-branch')} in forward"
    assert ("opaque_modules: layer1 (leaf_modules), layer2.0 (untraceable: TraceError: symbolically traced "
            f"variables cannot be used as inputs to control flow (at {where}") in text
    plain = fxc.compile(nn.Linear(4, 2), _x(2, 4), [], target="fx", progress=False)
    assert "opaque_modules" not in str(plain.report)


class _TransposedLinear(nn.Module):
    """Hugging Face's ``Conv1D``: a weight stored [in, out], applied with ``addmm``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.weight.size(-1),))


class _Projections(nn.Module):
    def __init__(self, peek: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.out, self.peek = _TransposedLinear(6, 8), _TransposedLinear(8, 3), peek

    def forward(self, x: Tensor) -> Tensor:
        y = self.out(torch.relu(self.proj(x)))
        return y + self.out.weight.sum() if self.peek else y  # peek: the weight is read outside its layer too


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_addmm_layers_are_captured_as_linear_sharing_the_weight(frontend: str) -> None:
    model, x = _Projections().eval(), torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    gm = trace(model, (x,), frontend=frontend)
    for path in ("proj", "out"):
        layer = gm.get_submodule(path)
        assert type(layer) is nn.Linear and (layer.in_features, layer.out_features) == \
            tuple(getattr(model, path).weight.shape)
        torch.testing.assert_close(layer.weight, getattr(model, path).weight.t(), rtol=0, atol=0)
        assert not layer.weight.is_contiguous()  # the transposed view of one storage, not a copy
    assert not any(n.target is torch.addmm for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert type(model.proj) is _TransposedLinear  # the user's model is untouched


def test_an_addmm_layer_whose_weight_is_read_elsewhere_stays_as_it_is() -> None:
    model, x = _Projections(peek=True).eval(), torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    gm = trace(model, (x,), frontend="fx")
    assert type(gm.get_submodule("proj")) is nn.Linear
    assert not isinstance(gm.get_submodule("out"), nn.Linear)
    assert sum(n.target is torch.addmm for n in gm.graph.nodes) == 1
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
