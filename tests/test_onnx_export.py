"""GraphModule -> ONNX export: numerics in ONNX Runtime, dynamic batch, names, FX provenance,
fake-quant -> QuantizeLinear/DequantizeLinear, and clear errors."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import fx, nn

from fxcompress.backends.onnx_export import export_onnx, fx_node_of, fx_node_outputs
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.errors import ExportError, InputError
from fxcompress.backends.onnxruntime import run_onnx
from fxcompress.onnx_graph import FX_NODE_KEY, expose_outputs, to_graph, to_model
from fxcompress.trace import trace

RTOL, ATOL = 1e-4, 1e-5
MAPPED_OPS = {"Conv", "Gemm", "MatMul", "Add"}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.detach(), rtol=RTOL, atol=ATOL)


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)  # type: ignore[arg-type]


def _bigger_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    return tuple(torch.randn((x.shape[0] + 3, *x.shape[1:]), generator=gen) for x in inputs)


# ----------------------------------------------------------------------------- the zoo


def test_zoo_exports_match_eager_and_map_to_fx_nodes(zoo_case) -> None:
    gm = trace(zoo_case.model, zoo_case.inputs)
    model = export_onnx(gm, zoo_case.inputs)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)

    runner = OrtRunner(model)
    with torch.no_grad():
        for out, ref in zip(_as_tuple(runner(*zoo_case.inputs)), _as_tuple(zoo_case.model(*zoo_case.inputs)),
                            strict=True):
            _close(out, ref)
        bigger = _bigger_batch(zoo_case.inputs)
        for out, ref in zip(_as_tuple(runner(*bigger)), _as_tuple(zoo_case.model(*bigger)), strict=True):
            assert out.shape[0] == bigger[0].shape[0]
            _close(out, ref)

    assert [i.name for i in model.graph.input] == [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert model.graph.output[0].name == "output"

    fx_names = {n.name for n in gm.graph.nodes}
    heavy = [n for n in model.graph.node if n.op_type in MAPPED_OPS]
    assert heavy, "the zoo model should export Conv/Gemm/MatMul/Add nodes"
    for node in heavy:
        owner = fx_node_of(node)
        assert owner in fx_names, f"{node.name} ({node.op_type}) maps to {owner!r}, not an FX node"
        assert {p.key: p.value for p in node.metadata_props}[FX_NODE_KEY] == owner


class _Values(fx.Interpreter):
    """Every node's output, cloned (in-place ops such as ReLU(inplace=True) would rewrite it)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        self.values[n.name] = out.clone() if isinstance(out, torch.Tensor) else out
        return out


def test_fx_node_outputs_hold_the_fx_node_values() -> None:
    """What ``compare`` relies on: each mapped ONNX tensor equals the FX node's own output."""
    from zoo import ZOO

    model_, inputs = ZOO["resnet_basic"]()
    gm = trace(model_, inputs)
    model = export_onnx(gm, inputs)
    mapping = fx_node_outputs(model)
    recorder = _Values(gm)
    with torch.no_grad():
        recorder.run(*inputs)
    values = recorder.values
    checked = 0
    singles = {fx: names[0] for fx, names in mapping.items() if len(names) == 1}
    outs = run_onnx(expose_outputs(model, list(singles.values())), inputs,
                    output_names=list(singles.values()))
    for (fx_name, _), got in zip(singles.items(), outs):
        want = values[fx_name]
        assert isinstance(want, torch.Tensor)
        np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL, err_msg=fx_name)
        checked += 1
    convs = [n.name for n in gm.graph.nodes if n.op == "call_module" and "conv" in n.name]
    assert set(convs) <= set(singles) and checked >= len(convs) + 5


def test_provenance_survives_graphsurgeon_round_trip() -> None:
    from zoo import ZOO

    model_, inputs = ZOO["audio_conv1d"]()
    model = export_onnx(trace(model_, inputs), inputs)
    before = {n.name: fx_node_of(n) for n in model.graph.node}
    graph = to_graph(model)
    assert {n.name: fx_node_of(n) for n in graph.nodes} == before
    again = to_model(graph)
    assert {n.name: {p.key: p.value for p in n.metadata_props}.get(FX_NODE_KEY) for n in again.graph.node} == before


# ----------------------------------------------------------------------------- Q/DQ


class _FakeQuant(nn.Module):
    def __init__(self, qmin: int = -128, qmax: int = 127) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.qmin, self.qmax = qmin, qmax
        w = self.conv.weight.detach()
        self.register_buffer("w_scale", w.abs().amax(dim=(1, 2, 3)) / 127)
        self.register_buffer("w_zero", torch.zeros(8, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, 0.05, 0 if self.qmin < 0 else 128, self.qmin, self.qmax)
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, self.w_scale, self.w_zero, 0, -128, 127)
        y = torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1))
        return self.fc(y.mean((2, 3)))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_fake_quant_exports_as_qdq_with_int8_zero_points_and_axis() -> None:
    torch.manual_seed(0)
    m = _FakeQuant().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fx.symbolic_trace(m)
    model = export_onnx(gm, (x,))
    inits = _inits(model)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(q) == 2 and len(dq) == 2

    weight_q = next(n for n in q if n.input[0] == "conv.weight")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in weight_q.attribute}
    assert attrs.get("axis") == 0
    zp = inits[weight_q.input[2]]
    assert zp.dtype == np.int8 and zp.shape == (8,) and not zp.any()
    np.testing.assert_allclose(inits[weight_q.input[1]], m.w_scale.numpy())
    assert fx_node_of(weight_q) == "fake_quantize_per_channel_affine"

    weight_dq = next(n for n in dq if n.input[0] == weight_q.output[0])
    assert {a.name: onnx.helper.get_attribute_value(a) for a in weight_dq.attribute}.get("axis") == 0

    act_q = next(n for n in q if n is not weight_q)
    assert not any(a.name == "axis" for a in act_q.attribute)
    act_params = run_onnx(expose_outputs(model, list(act_q.input[1:])), (x,), output_names=list(act_q.input[1:]))
    np.testing.assert_allclose(act_params[0], 0.05)
    assert act_params[1].dtype == np.int8 and int(act_params[1]) == 0

    with torch.no_grad():
        _close(OrtRunner(model)(x), m(x))


def test_uint8_fake_quant_exports_uint8_zero_point() -> None:
    m = _FakeQuant(qmin=0, qmax=255).eval()
    x = torch.randn(1, 3, 8, 8)
    model = export_onnx(fx.symbolic_trace(m), (x,))
    act_q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    zp = run_onnx(expose_outputs(model, [act_q.input[2]]), (x,), output_names=[act_q.input[2]])[0]
    assert zp.dtype == np.uint8 and int(zp) == 128
    with torch.no_grad():
        _close(OrtRunner(model)(x), m(x))


# ----------------------------------------------------------------------------- names and axes


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.a(x + y)
        return h, self.b(y), h


def test_names_multiple_and_repeated_outputs() -> None:
    m = _TwoHeads().eval()
    x, y = torch.randn(2, 6), torch.randn(2, 6)
    model = export_onnx(fx.symbolic_trace(m), (x, y))
    assert [i.name for i in model.graph.input] == ["x", "y"]
    assert [o.name for o in model.graph.output] == ["output", "output_1", "output_2"]
    outs = OrtRunner(model)(x, y)
    with torch.no_grad():
        for got, want in zip(outs, m(x, y), strict=True):
            _close(got, want)

    named = export_onnx(fx.symbolic_trace(m), (x, y), input_names=["left", "right"],
                        output_names=["h", "b", "h_again"])
    assert [i.name for i in named.graph.input] == ["left", "right"]
    assert [o.name for o in named.graph.output] == ["h", "b", "h_again"]
    with torch.no_grad():
        for got, want in zip(OrtRunner(named)(right=y, left=x), m(x, y), strict=True):
            _close(got, want)
    with pytest.raises(ExportError, match="3 distinct names"):
        export_onnx(fx.symbolic_trace(m), (x, y), output_names=["only_one"])
    with pytest.raises(ExportError, match="input_names"):
        export_onnx(fx.symbolic_trace(m), (x, y), input_names=["a"])


def test_static_and_custom_dynamic_axes() -> None:
    from zoo import ZOO

    model_, inputs = ZOO["audio_conv1d"]()
    gm = trace(model_, inputs)
    static = export_onnx(gm, inputs, dynamic_axes=None)
    dims = static.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == list(inputs[0].shape)
    with pytest.raises(InputError, match="dimension 0 must be 2"):
        OrtRunner(static)(torch.randn(5, *inputs[0].shape[1:]))

    name = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    custom = export_onnx(gm, inputs, dynamic_axes={name: {0: "n", 2: "time"}, "output": {0: "n"}})
    dims = custom.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "n" and dims[2].dim_param == "time"
    assert custom.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "n"
    longer = torch.randn(3, inputs[0].shape[1], inputs[0].shape[2] * 2)
    with torch.no_grad():
        _close(OrtRunner(custom)(longer), model_(longer))
    with pytest.raises(ExportError, match="neither inputs"):
        export_onnx(gm, inputs, dynamic_axes={"nope": {0: "n"}})
    with pytest.raises(ExportError, match="out of range"):
        export_onnx(gm, inputs, dynamic_axes={name: {5: "n"}})


# ----------------------------------------------------------------------------- errors, purity


class _Spectral(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(self.conv(x)).abs()


class _Bessel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i1(x)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Bessel()
        self.conv = nn.Conv1d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(x)) + 1


def test_unexportable_op_names_the_fx_node_and_module() -> None:
    x = torch.randn(1, 2, 16)
    with pytest.raises(ExportError) as info:
        export_onnx(fx.symbolic_trace(_Spectral()), (x,))
    msg = str(info.value)
    assert "'fft_rfft'" in msg and "aten::fft_rfft" in msg
    assert isinstance(info.value.__cause__, torch.onnx.errors.OnnxExporterError)

    with pytest.raises(ExportError) as info:
        export_onnx(fx.symbolic_trace(_Outer()), (x,))
    msg = str(info.value)
    assert "'special_i1'" in msg and "module 'block' (_Bessel)" in msg


def test_bad_arguments_are_export_errors() -> None:
    gm = fx.symbolic_trace(_Spectral())
    with pytest.raises(ExportError, match="opset 12"):
        export_onnx(gm, (torch.randn(1, 2, 16),), opset=12)
    with pytest.raises(ExportError, match="takes 1 inputs"):
        export_onnx(gm, (torch.randn(1, 2, 16), torch.randn(1)))
    with pytest.raises(ExportError, match="GraphModule"):
        export_onnx(_Spectral(), (torch.randn(1, 2, 16),))  # type: ignore[arg-type]


def test_export_does_not_mutate_the_graph_module() -> None:
    from zoo import ZOO

    model_, inputs = ZOO["conv_dropout_identity"]()
    gm = trace(model_, inputs)
    gm.train()
    code, state = gm.code, copy.deepcopy(gm.state_dict())
    model = export_onnx(gm, inputs)
    assert gm.training and all(m.training for m in gm.modules())
    assert gm.code == code
    for key, value in gm.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not any(n.op_type == "Dropout" for n in model.graph.node)
    with torch.no_grad():
        _close(OrtRunner(model)(*inputs), model_.eval()(*inputs))


def test_opset_option() -> None:
    from zoo import ZOO

    model_, inputs = ZOO["transformer_block"]()
    model = export_onnx(trace(model_, inputs), inputs, opset=18)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    with torch.no_grad():
        _close(OrtRunner(model)(*inputs), model_(*inputs))


class _Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, double: bool = False, scale: float | None = None) -> torch.Tensor:
        y = self.fc(x)
        if double:
            y = y * 2
        if scale is not None:
            y = y * scale
        return y


@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
def test_model_traced_with_concrete_args_exports_and_runs_in_onnxruntime(target: str) -> None:
    import fxcompress as fxc

    model, x = _Flagged().eval(), torch.randn(2, 4)
    compiled = fxc.compile(model, (x,), [], target=target, concrete_args={"double": True, "scale": None},
                           progress=False)
    assert [i.name for i in compiled.onnx_model.graph.input] == ["x"]
    other = torch.randn(5, 4)
    out = run_onnx(compiled.onnx_model, [other])[0]
    _close(torch.from_numpy(out), model(other, True, None))
    if target == "onnxruntime":
        _close(compiled(other), model(other, True, None))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.fc(x) * scale


def test_placeholders_with_defaults_need_no_example_input() -> None:
    model, x = _Scaled().eval(), torch.randn(2, 4)
    gm = fx.symbolic_trace(model)
    assert [n.args for n in gm.graph.nodes if n.op == "placeholder"] == [(), (2.0,)]
    proto = export_onnx(gm, (x,))
    assert [i.name for i in proto.graph.input] == ["x"]
    _close(torch.from_numpy(run_onnx(proto, [x])[0]), model(x))
    with pytest.raises(ExportError, match=r"the graph takes 2 inputs \['x', 'scale'\] but 0 example inputs"):
        export_onnx(gm, ())
