"""CheckTensorRT: static rules on hand-built ONNX graphs, agreement with the real TensorRT-RTX
ONNX parser, and no findings on clean exports of the test zoo."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper as nh
from torch import nn

from fxcompress.backends.tensorrt import build_engine, derive_profiles, module_available
from fxcompress.errors import PassError, PipelineError
from fxcompress.pass_base import PassContext
from passes.onnx.check_tensorrt import (CheckTensorRT, Finding, check_tensorrt, check_tensorrt_report,
                                        operator_matrix)

RTX = module_available("tensorrt-rtx")
needs_rtx = pytest.mark.skipif(not RTX, reason="tensorrt_rtx (pip tensorrt-rtx-cu12) is not installed")
RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- graph builders

def _model(nodes, inputs, outputs, inits=(), opset=17, functions=()):
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], functions=list(functions))
    return model


def _vi(name, dtype, shape):
    return oh.make_tensor_value_info(name, dtype, shape)


def conv_qdq(*, axis=0, zp=0, act_type=T.INT8, w_type=T.INT8, op="Conv", cin=4, cout=8):
    """x -> Q/DQ -> Conv(W: int8 initializer -> DQ(axis)) -> y."""
    if op == "Conv":
        w = RNG.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    else:  # ConvTranspose weights are (C_in, C_out, kH, kW)
        w = RNG.standard_normal((cin, cout, 3, 3)).astype(np.float32)
    reduce = tuple(a for a in range(4) if a != axis)
    scale = (np.abs(w).max(axis=reduce) / 127).astype(np.float32)
    shape = [1, 1, 1, 1]
    shape[axis] = -1
    q = np.round(w / scale.reshape(shape)).clip(-127, 127)
    w_np = np.int8 if w_type == T.INT8 else np.uint8
    w_zp = 0 if w_type == T.INT8 else 128
    a_np = np.int8 if act_type == T.INT8 else np.uint8
    inits = [nh.from_array((q + w_zp).astype(w_np), "Wq"), nh.from_array(scale, "w_scale"),
             nh.from_array(np.full(scale.shape, w_zp, w_np), "w_zp"),
             nh.from_array(np.array(0.05, np.float32), "x_scale"), nh.from_array(np.array(zp, a_np), "x_zp")]
    nodes = [oh.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
             oh.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x"),
             oh.make_node("DequantizeLinear", ["Wq", "w_scale", "w_zp"], ["W"], name="dq_w", axis=axis),
             oh.make_node(op, ["xd", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    out_ch = cout
    model = _model(nodes, [_vi("x", T.FLOAT, [1, cin, 8, 8])], [_vi("y", T.FLOAT, [1, out_ch, None, None])],
                   inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def act_qdq(zp_dtype, zp_value=0, with_zp=True):
    """x -> QuantizeLinear -> DequantizeLinear -> y with a scalar scale."""
    inits = [nh.from_array(np.array(0.1, np.float32), "s")]
    args = ["x", "s"]
    if with_zp:
        inits.append(nh.from_array(np.array(zp_value, zp_dtype), "z"))
        args.append("z")
    nodes = [oh.make_node("QuantizeLinear", args, ["q"], name="q"),
             oh.make_node("DequantizeLinear", ["q", *args[1:]], ["y"], name="dq")]
    return _model(nodes, [_vi("x", T.FLOAT, [2, 3])], [_vi("y", T.FLOAT, [2, 3])], inits)


def int32_bias_dq():
    """The conv form onnxruntime's quantize_static emits: bias as INT32 + DequantizeLinear."""
    m = conv_qdq()
    bias_q = np.arange(8, dtype=np.int32)
    bias_scale = np.full(8, 1e-3, np.float32)
    m.graph.initializer.extend([nh.from_array(bias_q, "Bq"), nh.from_array(bias_scale, "bs"),
                                nh.from_array(np.zeros(8, np.int32), "bz")])
    dq = oh.make_node("DequantizeLinear", ["Bq", "bs", "bz"], ["B"], name="dq_bias", axis=0)
    m.graph.node.insert(3, dq)
    m.graph.node[-1].input.append("B")
    return m


def rules(findings, node=None):
    return sorted({f.rule for f in findings if node is None or f.node == node})


def static(model, **kw):
    return check_tensorrt(model, use_parser=False, **kw)


def parser_findings(model, **kw):
    report = check_tensorrt_report(model, target="tensorrt-rtx", **kw)
    return [f for f in report.findings if f.rule == "parser"], report


# --------------------------------------------------------------------------- data file

def test_operator_matrix_names_its_version_and_source():
    matrix = operator_matrix()
    assert matrix["tensorrt_version"] == "10.15"
    assert "onnx-tensorrt" in matrix["source"] and "operators.md" in matrix["source"]
    assert matrix["opset_min"] == 9 and matrix["opset_max"] == 24
    assert {"Conv", "MatMul", "QuantizeLinear", "LayerNormalization", "LSTM"} <= set(matrix["supported"])
    assert {"Det", "Unique", "MatMulInteger", "QLinearConv"} <= set(matrix["unsupported"])
    assert not set(matrix["supported"]) & set(matrix["unsupported"])
    assert "INT64" not in matrix["supported"]["MatMul"]["types"]
    assert "INT64" in matrix["supported"]["Gather"]["types"]


# --------------------------------------------------------------------------- static rules

def test_unsupported_ops_are_errors_with_the_node_name():
    m = _model([oh.make_node("Relu", ["x"], ["r"], name="relu"),
                oh.make_node("Det", ["r"], ["d"], name="det"),
                oh.make_node("Unique", ["d"], ["y"], name="uniq")],
               [_vi("x", T.FLOAT, [2, 3, 3])], [_vi("y", T.FLOAT, [None])])
    found = [f for f in static(m) if f.rule == "unsupported-op"]
    assert [(f.node, f.severity) for f in found] == [("det", "error"), ("uniq", "error")]
    assert "Det" in found[0].problem and "10.15" in found[0].problem


def test_integer_ops_point_to_the_qdq_form_and_custom_domains_need_plugins():
    m = _model([oh.make_node("MatMulInteger", ["a", "b"], ["c"], name="mmi"),
                oh.make_node("Foo", ["c"], ["y"], name="foo", domain="com.example")],
               [_vi("a", T.INT8, [2, 3]), _vi("b", T.INT8, [3, 2])], [_vi("y", T.INT32, [2, 2])])
    m.opset_import.append(oh.make_opsetid("com.example", 1))
    found = static(m)
    assert [(f.node, f.rule, f.severity) for f in found] == [("mmi", "unsupported-op", "error"),
                                                             ("foo", "unsupported-op", "error")]
    by_node = {f.node: f for f in found}
    assert "QuantizeInt8(scheme='tensorrt')" in by_node["mmi"].fix
    assert "plugin" in by_node["foo"].problem and by_node["foo"].severity == "error"


def test_ops_inside_local_functions_are_checked():
    body = [oh.make_node("Det", ["a"], ["b"], name="inner_det")]
    fn = oh.make_function("local", "Inner", ["a"], ["b"], body, [oh.make_opsetid("", 17)])
    m = _model([oh.make_node("Inner", ["x"], ["y"], name="call", domain="local")],
               [_vi("x", T.FLOAT, [2, 3, 3])], [_vi("y", T.FLOAT, [2])], functions=[fn])
    m.opset_import.append(oh.make_opsetid("local", 1))
    assert [(f.node, f.rule) for f in static(m)] == [("call/inner_det", "unsupported-op")]


def test_non_zero_zero_point_is_an_error_on_every_qdq_node():
    found = static(conv_qdq(zp=3))
    assert [(f.node, f.rule, f.severity) for f in found] == [("q_x", "qdq-zero-point", "error"),
                                                             ("dq_x", "qdq-zero-point", "error")]


def test_uint8_qdq_is_flagged():
    found = static(conv_qdq(act_type=T.UINT8, w_type=T.UINT8))
    assert [(f.node, f.rule, f.severity) for f in found] == [
        ("q_x", "qdq-type", "error"), ("dq_x", "qdq-type", "error"),
        ("dq_w", "qdq-type", "error"), ("dq_w", "qdq-zero-point", "error")]
    assert "UINT8" in next(f.problem for f in found if f.node == "q_x")


def test_quantize_without_zero_point_is_uint8():
    found = static(act_qdq(None, with_zp=False))
    assert [(f.node, f.rule, f.severity) for f in found] == [("q", "qdq-type", "error")]
    assert "UINT8" in found[0].problem and "saturate" in found[0].problem


def test_int32_bias_dequantize_is_flagged():
    found = static(int32_bias_dq())
    assert [(f.node, f.rule, f.severity) for f in found] == [("dq_bias", "int32-bias-dq", "error")]
    assert "QuantizeBias" in found[0].fix


def test_per_channel_axis_follows_the_consumer():
    def codes(model):
        return [(f.node, f.rule, f.severity) for f in static(model)]

    assert codes(conv_qdq(axis=1)) == [("dq_w", "weight-axis", "warning")]
    assert codes(conv_qdq(axis=0)) == []
    assert codes(conv_qdq(axis=1, op="ConvTranspose")) == []
    assert codes(conv_qdq(axis=0, op="ConvTranspose")) == [("dq_w", "weight-axis", "warning")]


def _linear_qdq(axis, batch_shape):
    class QLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 8)
            w = self.fc.weight.detach()
            self.register_buffer("scale", w.abs().amax(dim=1 - axis) / 127)
            self.register_buffer("zp", torch.zeros(self.scale.numel(), dtype=torch.int32))

        def forward(self, x):
            x = torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
            w = torch.fake_quantize_per_channel_affine(self.fc.weight, self.scale, self.zp, axis, -128, 127)
            return nn.functional.linear(x, w, self.fc.bias)

    return _export(QLinear(), (torch.randn(*batch_shape, 16),))


@pytest.mark.parametrize("batch_shape", [(2,), (2, 5)], ids=["gemm", "matmul-via-transpose"])
def test_linear_weight_axis_through_gemm_and_transpose(batch_shape):
    good = _linear_qdq(0, batch_shape)
    bad = _linear_qdq(1, batch_shape)
    ops = {n.op_type for n in bad.graph.node}
    assert ("Gemm" in ops) if len(batch_shape) == 1 else ({"Transpose", "MatMul"} <= ops)
    assert static(good) == []
    found = static(bad)
    assert [(f.rule, f.severity) for f in found] == [("weight-axis", "warning")]
    assert next(n for n in bad.graph.node if n.name == found[0].node).op_type == "DequantizeLinear"


def test_scales_must_be_positive_build_time_constants():
    m = act_qdq(np.int8)
    m.graph.initializer[0].CopyFrom(nh.from_array(np.array(-0.1, np.float32), "s"))
    assert [(f.node, f.rule, f.severity) for f in static(m)] == [("q", "qdq-constant", "error"),
                                                                 ("dq", "qdq-constant", "error")]
    dyn = _model([oh.make_node("ReduceMax", ["x"], ["m"], name="amax", keepdims=0),
                  oh.make_node("QuantizeLinear", ["x", "m", "z"], ["q"], name="q"),
                  oh.make_node("DequantizeLinear", ["q", "m", "z"], ["y"], name="dq")],
                 [_vi("x", T.FLOAT, [2, 3])], [_vi("y", T.FLOAT, [2, 3])],
                 [nh.from_array(np.array(0, np.int8), "z")])
    assert [(f.node, f.rule) for f in static(dyn)] == [("q", "qdq-constant"), ("dq", "qdq-constant")]


def test_dtype_rules_are_precise():
    int64_mm = _model([oh.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                      [_vi("a", T.INT64, [2, 3]), _vi("b", T.INT64, [3, 2])], [_vi("y", T.INT64, [2, 2])])
    found = static(int64_mm)
    assert [(f.node, f.rule) for f in found] == [("mm", "dtype"), ("mm", "dtype")]
    assert "INT64" in found[0].problem and "FLOAT" in found[0].fix
    int64_add = _model([oh.make_node("Add", ["a", "c"], ["y"], name="add")], [_vi("a", T.INT64, [2, 3])],
                       [_vi("y", T.INT64, [2, 3])], [nh.from_array(np.full((2, 3), 2 ** 40, np.int64), "c")])
    assert static(int64_add) == []  # TensorRT >= 10 has native INT64, even beyond the int32 range
    int16 = _model([oh.make_node("Cast", ["x"], ["y"], name="cast", to=T.FLOAT)], [_vi("x", T.INT16, [2])],
                   [_vi("y", T.FLOAT, [2])])
    assert [(f.node, f.rule, f.severity) for f in static(int16)] == [("x", "dtype", "error")]


def test_dynamic_dims_need_a_profile():
    """No shapes known: a warning (a build from example inputs derives the profile), whose fix names
    the CLI flag and the Python option; profiles given without this input: an error."""
    m = _model([oh.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", T.FLOAT, ["batch", 5])],
               [_vi("y", T.FLOAT, ["batch", 5])])
    found = static(m)
    assert [(f.node, f.rule, f.severity) for f in found] == [("input:x", "dynamic-shape", "warning")]
    assert "0:batch" in found[0].problem
    assert "--input-shape" in found[0].fix and "BuildOptions(profiles=" in found[0].fix
    missing = static(m, profiles={"z": ((1, 5), (4, 5), (16, 5))})
    assert [(f.node, f.rule, f.severity) for f in missing] == [("input:x", "dynamic-shape", "error")]
    assert "(z) have none for it" in missing[0].problem
    assert static(m, profiles={"x": ((1, 5), (4, 5), (16, 5))}) == []
    bad = static(m, profiles={"x": ((1, 6), (4, 6), (16, 6))})
    assert rules(bad) == ["dynamic-shape"] and "fixed to 5" in bad[0].problem
    assert static(m, profiles=derive_profiles(m, [(4, 5)])) == []


def test_opset_outside_the_matrix():
    m = _model([oh.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", T.FLOAT, [2])],
               [_vi("y", T.FLOAT, [2])], opset=7)
    assert [(f.node, f.rule, f.severity) for f in static(m)] == [(None, "opset", "error")]


def test_onnxruntime_quantize_static_output_is_flagged(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    (tmp_path / "m.onnx").write_bytes(_export(Net(), (torch.randn(1, 3, 8, 8),)).SerializeToString())

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.random.default_rng(i).standard_normal((1, 3, 8, 8), np.float32)}
                                 for i in range(4)])

        def get_next(self):
            return next(self.batches, None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "q.onnx"))
    found = static(q)
    assert {f.severity for f in found} == {"error"}
    by_node = {n.name: rules(found, n.name) for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    # UINT8 on every activation Q/DQ, a non-zero zero point where the calibrated range crosses zero
    # (input, logits; not the ReLU output), INT32 bias DQs, nothing on the INT8 per-channel weights
    assert by_node == {
        "conv.bias_DequantizeLinear": ["int32-bias-dq"], "fc.bias_DequantizeLinear": ["int32-bias-dq"],
        "conv.weight_DequantizeLinear": [], "fc.weight_DequantizeLinear": [],
        "x_QuantizeLinear": ["qdq-type", "qdq-zero-point"], "x_DequantizeLinear": ["qdq-type", "qdq-zero-point"],
        "/Relu_output_0_QuantizeLinear": ["qdq-type"], "/Relu_output_0_DequantizeLinear": ["qdq-type"],
        "/Flatten_output_0_QuantizeLinear": ["qdq-type"], "/Flatten_output_0_DequantizeLinear": ["qdq-type"],
        "8_QuantizeLinear": ["qdq-type", "qdq-zero-point"], "8_DequantizeLinear": ["qdq-type", "qdq-zero-point"],
    }
    if RTX:
        parser, _ = parser_findings(q)
        assert [(f.node, f.severity) for f in parser] == [("conv.bias_DequantizeLinear", "error")]


# --------------------------------------------------------------------------- agreement with the real parser

@needs_rtx
@pytest.mark.parametrize("case, node, rule", [
    ("unsupported-op", "det", "unsupported-op"),
    ("zero-point", "q_x", "qdq-zero-point"),
    ("uint8-weights", "dq_w", "qdq-type"),
    ("uint8-asymmetric-activation", "q", "qdq-zero-point"),
    ("int32-bias", "dq_bias", "int32-bias-dq"),
    ("int64-matmul", "mm", "dtype"),
])
def test_parser_rejects_what_the_static_rules_flag(case, node, rule):
    model = {
        "unsupported-op": lambda: _model([oh.make_node("Det", ["x"], ["y"], name="det")],
                                         [_vi("x", T.FLOAT, [2, 3, 3])], [_vi("y", T.FLOAT, [2])]),
        "zero-point": lambda: conv_qdq(zp=3),
        "uint8-weights": lambda: conv_qdq(w_type=T.UINT8),
        "uint8-asymmetric-activation": lambda: act_qdq(np.uint8, 128),
        "int32-bias": int32_bias_dq,
        "int64-matmul": lambda: _model([oh.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                                       [_vi("a", T.INT64, [2, 3]), _vi("b", T.INT64, [3, 2])],
                                       [_vi("y", T.INT64, [2, 2])]),
    }[case]()
    assert rule in rules(static(model), node)
    parser, report = parser_findings(model)
    assert report.parser.startswith("tensorrt_rtx ")
    assert [f.node for f in parser] == [node]
    assert parser[0].severity == "error"
    assert "cudaError" not in parser[0].problem
    static_fix = next(f.fix for f in static(model) if f.node == node)
    assert parser[0].fix == static_fix


@needs_rtx
def test_parser_reports_every_unsupported_node_not_just_the_first():
    m = _model([oh.make_node("Det", ["x"], ["d"], name="det"),
                oh.make_node("Relu", ["d"], ["r"], name="relu"),
                oh.make_node("Unique", ["r"], ["y"], name="uniq")],
               [_vi("x", T.FLOAT, [2, 3, 3])], [_vi("y", T.FLOAT, [None])])
    parser, _ = parser_findings(m)
    assert [f.node for f in parser] == ["det", "uniq"]
    assert "no importer for operator Det" in parser[0].problem


@needs_rtx
def test_parser_accepts_what_tensorrt_handles_badly():
    """Honest about the parser: it accepts these, the static rules still flag them and say why."""
    uint8_zp0 = act_qdq(np.uint8, 0)
    parser, report = parser_findings(uint8_zp0)
    assert parser == []
    assert any("UINT8" in w and "Defaulting to INT8" in w for w in report.parser_warnings)
    assert rules(static(uint8_zp0), "q") == ["qdq-type"]

    no_zp = act_qdq(None, with_zp=False)
    assert parser_findings(no_zp)[0] == []
    assert rules(static(no_zp), "q") == ["qdq-type"]

    axis1 = conv_qdq(axis=1)
    assert parser_findings(axis1)[0] == []
    assert rules(static(axis1)) == ["weight-axis"]
    assert static(axis1)[0].severity == "warning"
    assert build_engine(axis1, "tensorrt-rtx").size > 0  # it even builds

    clip = _model([oh.make_node("Clip", ["x"], ["y"], name="clip")], [_vi("x", T.INT64, [2, 3])],
                  [_vi("y", T.INT64, [2, 3])])
    assert parser_findings(clip)[0] == []  # the parser takes more than the documented types here,
    assert [(f.rule, f.severity) for f in static(clip)] == [("dtype", "warning")]  # hence only a warning

    dynamic = _model([oh.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", T.FLOAT, ["n", 5])],
                     [_vi("y", T.FLOAT, ["n", 5])])
    assert parser_findings(dynamic)[0] == []  # parsing is fine; the build needs the profile
    from fxcompress.errors import ExportError

    with pytest.raises(ExportError, match="no optimization profile"):
        build_engine(dynamic, "tensorrt-rtx")


def test_without_parser_the_report_says_why():
    report = check_tensorrt_report(act_qdq(np.int8), use_parser=False)
    assert report.findings == [] and report.parser == "" and report.parser_skipped == "use_parser=False"


# --------------------------------------------------------------------------- clean exports

def _export(model, inputs, dynamic_batch=False):
    names = [f"x{i}" if i else "x" for i in range(len(inputs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(inputs), buf, dynamo=False, opset_version=17, input_names=names,
                          dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None)
    return onnx.load_from_string(buf.getvalue())


class ConvBnResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.c1(x)))
        return self.fc((y + self.c2(y)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.ln(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 4.0, dim=-1)
        return x + self.o(att @ self.v(h))


@pytest.mark.parametrize("name, model, shape", [
    ("conv-bn-residual-linear", ConvBnResidual, (2, 3, 8, 8)),
    ("attention-matmuls", Attention, (2, 5, 16)),
])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_clean_exports_have_no_findings(name, model, shape, dynamic):
    x = torch.randn(*shape)
    m = _export(model(), (x,), dynamic_batch=dynamic)
    profiles = derive_profiles(m, [x.shape]) if dynamic else None
    report = check_tensorrt_report(m, profiles=profiles)
    assert report.findings == []
    assert report.parser.startswith("tensorrt_rtx ") if RTX else report.parser_skipped


def _zoo():
    try:
        from zoo import ZOO
    except ImportError:
        return []
    return sorted(ZOO)


@pytest.mark.parametrize("name", _zoo() or [pytest.param("none", marks=pytest.mark.skip("no tests/zoo.py"))])
def test_zoo_exports_have_no_findings(name):
    from zoo import ZOO

    model, inputs = ZOO[name]()
    m = _export(model, inputs, dynamic_batch=True)
    report = check_tensorrt_report(m, profiles=derive_profiles(m, [x.shape for x in inputs]))
    assert [str(f) for f in report.findings] == []


# --------------------------------------------------------------------------- the pass

def _gs(model):
    import onnx_graphsurgeon as gs

    return gs.import_onnx(model)


def test_pass_reports_findings_and_leaves_the_graph_alone():
    model = conv_qdq(zp=3)
    import onnx_graphsurgeon as gs

    graph = _gs(model)
    before = onnx.printer.to_text(gs.export_onnx(graph))
    result = CheckTensorRT(use_parser=False).run(graph, PassContext())
    assert result.graph is graph
    assert onnx.printer.to_text(gs.export_onnx(result.graph)) == before
    findings = result.stats["findings"]
    assert [f["rule"] for f in findings] == ["qdq-zero-point", "qdq-zero-point"]
    assert json.loads(json.dumps(findings)) == findings
    assert result.stats["errors"] == 2 and result.stats["warnings"] == 0
    assert [(d.severity, d.node) for d in result.diagnostics] == [("error", "q_x"), ("error", "dq_x")]
    assert "Fix:" in result.diagnostics[0].message
    assert Finding(**findings[0]).rule == "qdq-zero-point"
    assert result.stats["parser"] == "not run: use_parser=False"


def test_pass_derives_profiles_from_example_inputs_and_strict_raises():
    x = torch.randn(2, 3, 8, 8)
    m = _export(ConvBnResidual(), (x,), dynamic_batch=True)
    result = CheckTensorRT(use_parser=False, strict=True).run(_gs(m), PassContext())
    found = result.stats["findings"]
    assert [(f["rule"], f["severity"]) for f in found] == [("dynamic-shape", "warning")]
    assert result.stats["errors"] == 0  # so strict=True does not stop the pipeline on it
    assert CheckTensorRT(use_parser=False).run(_gs(m), PassContext((x,))).stats["findings"] == []
    with pytest.raises(PassError, match="qdq-zero-point|zero point"):
        CheckTensorRT(use_parser=False, strict=True).run(_gs(conv_qdq(zp=3)), PassContext())


@needs_rtx
def test_pass_uses_the_parser_of_the_compile_target():
    result = CheckTensorRT().run(_gs(conv_qdq(zp=3)), PassContext(target="tensorrt-rtx"))
    assert result.stats["parser"].startswith("tensorrt_rtx ")
    assert [(f["node"], f["rule"], f["severity"]) for f in result.stats["findings"]] == [
        ("q_x", "qdq-zero-point", "error"), ("dq_x", "qdq-zero-point", "error"), ("q_x", "parser", "error")]


def test_pass_is_registered_and_round_trips_as_a_pipeline_string():
    from fxcompress.options import format_pass
    from fxcompress.registry import parse_pipeline

    (p,) = parse_pipeline("check-tensorrt{use-parser=false,strict=true}")
    assert isinstance(p, CheckTensorRT) and p.use_parser is False and p.strict is True
    assert format_pass(p) == "check-tensorrt{use-parser=false,strict=true}"
    assert CheckTensorRT.exact is True


def test_the_target_option_names_exactly_the_tensorrt_targets() -> None:
    import typing

    from fxcompress.backends.tensorrt import TARGETS
    from fxcompress.options import option_types

    assert typing.get_args(option_types(CheckTensorRT)["target"]) == ("", *TARGETS)
    with pytest.raises(PipelineError, match="option 'target' of pass 'check-tensorrt' must be one of"):
        CheckTensorRT(target="tensorrt-llm")
