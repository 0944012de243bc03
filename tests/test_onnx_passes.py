"""ONNX passes on onnx-graphsurgeon graphs: they shrink graphs where expected, keep outputs
identical in ONNX Runtime and output names intact, and never lose INT8 weights (Q/DQ)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import run_onnx
from fxcompress.onnx_graph import to_graph, to_model
from fxcompress.pass_base import OnnxPass, PassContext, PassResult
from fxcompress.trace import trace
from passes.onnx.cleanup import OnnxCleanup, OnnxRemoveIdentity
from passes.onnx.fold_constants import OnnxFoldConstants

RTOL, ATOL = 1e-4, 1e-5


def _apply(p: OnnxPass, model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    result = p.run(to_graph(model), PassContext())
    out = to_model(result.graph, like=model)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray], *, exact: bool) -> None:
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    for x, y in zip(run_onnx(a, feed), run_onnx(b, feed), strict=True):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _noop_model() -> onnx.ModelProto:
    """x -> Identity -> Relu -> Dropout -> Cast(float) -> Reshape(same) -> Transpose(id) -> Add
    -> Reshape(changes shape) -> Identity -> y; every marked no-op can go, the rest must stay."""
    shape_same = numpy_helper.from_array(np.array([-1, 4, 6], np.int64), "shape_same")
    shape_flat = numpy_helper.from_array(np.array([0, 24], np.int64), "shape_flat")
    one = numpy_helper.from_array(np.ones((4, 6), np.float32), "one")
    nodes = [
        helper.make_node("Identity", ["x"], ["a"], name="/id0/Identity"),
        helper.make_node("Relu", ["a"], ["b"], name="/relu/Relu"),
        helper.make_node("Dropout", ["b"], ["c"], name="/drop/Dropout"),
        helper.make_node("Cast", ["c"], ["d"], to=TensorProto.FLOAT, name="/cast/Cast"),
        helper.make_node("Reshape", ["d", "shape_same"], ["e"], name="/view/Reshape"),
        helper.make_node("Transpose", ["e"], ["f"], perm=[0, 1, 2], name="/t/Transpose"),
        helper.make_node("Add", ["f", "one"], ["g"], name="/add/Add"),
        helper.make_node("Reshape", ["g", "shape_flat"], ["h"], name="/flat/Reshape"),
        helper.make_node("Identity", ["h"], ["y"], name="/id1/Identity"),
        helper.make_node("Cast", ["g"], ["z"], to=TensorProto.DOUBLE, name="/cast2/Cast"),
    ]
    return _model(nodes, [_f32("x", ["batch", 4, 6])],
                  [_f32("y", ["batch", 24]), helper.make_tensor_value_info("z", TensorProto.DOUBLE, ["batch", 4, 6])],
                  [shape_same, shape_flat, one])


def test_remove_identity_drops_exactly_the_noops_and_keeps_output_names() -> None:
    model = _noop_model()
    out, result = _apply(OnnxRemoveIdentity(), model)
    assert result.stats["removed"] == {"Cast": 1, "Dropout": 1, "Identity": 2, "Reshape": 1, "Transpose": 1}
    assert _ops(out) == Counter({"Relu": 1, "Add": 1, "Reshape": 1, "Cast": 1})
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert {n.name for n in out.graph.node} == {"/relu/Relu", "/add/Add", "/flat/Reshape", "/cast2/Cast"}
    feed = {"x": np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)}
    _same_outputs(model, out, feed, exact=True)


def test_remove_identity_keeps_input_to_output_identity_and_used_dropout_mask() -> None:
    nodes = [
        helper.make_node("Identity", ["x"], ["y"], name="Identity_0"),
        helper.make_node("Dropout", ["x"], ["d", "mask"], name="/drop/Dropout"),
        helper.make_node("Cast", ["mask"], ["m"], to=TensorProto.FLOAT, name="/cast/Cast"),
        helper.make_node("Add", ["d", "m"], ["w"], name="/add/Add"),
    ]
    model = _model(nodes, [_f32("x", [2, 3])], [_f32("y", [2, 3]), _f32("w", [2, 3])])
    out, result = _apply(OnnxRemoveIdentity(), model)
    assert _ops(out) == _ops(model)
    assert [d.node for d in result.diagnostics] == ["Identity_0"]
    _same_outputs(model, out, {"x": np.ones((2, 3), np.float32)}, exact=True)


def test_reshape_with_unknown_or_changed_shape_is_kept() -> None:
    shape = numpy_helper.from_array(np.array([-1, 6], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="/r/Reshape")]
    changes = _model(nodes, [_f32("x", ["batch", 2, 3])], [_f32("y", ["batch", 6])], [shape])
    out, _ = _apply(OnnxRemoveIdentity(), changes)
    assert _ops(out) == Counter({"Reshape": 1})
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    np.testing.assert_array_equal(run_onnx(out, {"x": x})[0], x.reshape(2, 6))
    same_rank = _model(nodes, [_f32("x", ["batch", "n"])], [_f32("y", ["batch", 6])], [shape])
    out, _ = _apply(OnnxRemoveIdentity(), same_rank)
    assert _ops(out) == Counter({"Reshape": 1}), "'n' is not known to be 6: the Reshape must stay"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(run_onnx(out, {"x": x})[0], x.reshape(2, 6))


def test_cleanup_removes_dead_nodes_and_sorts() -> None:
    nodes = [  # deliberately out of order, with a dead branch
        helper.make_node("Relu", ["a"], ["y"], name="/relu/Relu"),
        helper.make_node("Neg", ["x"], ["a"], name="/neg/Neg"),
        helper.make_node("Exp", ["x"], ["dead"], name="/exp/Exp"),
        helper.make_node("Sqrt", ["dead"], ["dead2"], name="/sqrt/Sqrt"),
    ]
    graph = helper.make_graph(nodes, "g", [_f32("x", [2])], [_f32("y", [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out, result = _apply(OnnxCleanup(), model)
    assert [n.op_type for n in out.graph.node] == ["Neg", "Relu"]
    assert result.stats == {"nodes_before": 4, "nodes_after": 2, "removed": {"Exp": 1, "Sqrt": 1}}
    np.testing.assert_array_equal(run_onnx(out, {"x": np.array([1.0, -2.0], np.float32)})[0], [0.0, 2.0])


@pytest.mark.parametrize("name", ["transformer_block", "leaf_mha_lstm"])
def test_passes_shrink_exported_zoo_graphs_and_keep_outputs(name: str) -> None:
    from zoo import ZOO

    model_, inputs = ZOO[name]()
    exported = export_onnx(trace(model_, inputs), inputs)
    feed = {i.name: x.numpy() for i, x in zip(exported.graph.input, inputs)}
    model = exported
    for p in (OnnxFoldConstants(), OnnxRemoveIdentity(), OnnxCleanup()):
        previous = model
        model, _ = _apply(p, model)
        _same_outputs(previous, model, feed, exact=True)
    before, after = _ops(exported), _ops(model)
    assert before["Constant"] > 0 and after["Constant"] == 0
    assert sum(after.values()) < sum(before.values())
    for op in ("MatMul", "Softmax", "LayerNormalization"):
        assert after[op] == before[op], op
    bigger = {k: np.concatenate([v, v, v]) for k, v in feed.items()}
    _same_outputs(exported, model, bigger, exact=True)  # the dynamic batch survived folding


# ----------------------------------------------------------------------------- Q/DQ


class _QuantNet(nn.Module):
    """Per-channel INT8 weight fake-quant on a conv and a linear, per-tensor on activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        for prefix, w in (("conv", self.conv.weight), ("fc", self.fc.weight)):
            amax = w.detach().abs().reshape(w.shape[0], -1).amax(1)
            self.register_buffer(f"{prefix}_scale", amax / 127)
            self.register_buffer(f"{prefix}_zero", torch.zeros(w.shape[0], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, 0.04, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(self.conv.weight, self.conv_scale, self.conv_zero, 0, -128, 127)
        y = torch.relu(nn.functional.conv2d(x, w, self.conv.bias, padding=1)).mean((2, 3))
        y = torch.fake_quantize_per_tensor_affine(y, 0.02, 0, -128, 127)
        v = torch.fake_quantize_per_channel_affine(self.fc.weight, self.fc_scale, self.fc_zero, 0, -128, 127)
        return nn.functional.linear(y, v, self.fc.bias)


def _weight_dq(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """For each DequantizeLinear feeding a Conv/Gemm weight: (int values, scale, axis), keyed by
    the consuming op, whatever the form (Q on a float weight, or an INT8 initializer)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        src = dq.input[0]
        if src in inits:
            q_values = inits[src]
        else:
            q = producers[src]
            assert q.op_type == "QuantizeLinear"
            q_values = run_onnx(_with_output(model, src), {"x": np.zeros((1, 3, 6, 6), np.float32)},
                                output_names=[src])[0]
        axis = next((helper.get_attribute_value(a) for a in dq.attribute if a.name == "axis"), None)
        found[node.op_type] = (q_values, inits[dq.input[1]], axis)
    return found


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    from fxcompress.onnx_graph import expose_outputs

    return expose_outputs(model, [name])


@pytest.fixture(scope="module")
def quant_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    m = _QuantNet().eval()
    return export_onnx(fx.symbolic_trace(m), (torch.randn(2, 3, 6, 6),))


def test_fold_constants_stores_int8_weights_and_keeps_every_dequantize(quant_model) -> None:
    before = _weight_dq(quant_model)
    model, result = _apply(OnnxFoldConstants(), quant_model)
    after = _weight_dq(model)
    assert _ops(model)["DequantizeLinear"] == _ops(quant_model)["DequantizeLinear"] == 4
    assert _ops(model)["QuantizeLinear"] == 2  # activations only
    assert sorted(result.stats["weights_stored_quantized"]) == ["conv.weight", "fc.weight"]
    inits = {t.name: t for t in model.graph.initializer}
    assert "conv.weight" not in inits and "fc.weight" not in inits  # no float copy left behind
    for op in ("Conv", "Gemm"):
        q_before, scale_before, axis_before = before[op]
        q_after, scale_after, axis_after = after[op]
        assert q_after.dtype == np.int8 and axis_after == axis_before == 0
        np.testing.assert_array_equal(q_after, q_before)
        np.testing.assert_array_equal(scale_after, scale_before)
    feed = {"x": np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32)}
    _same_outputs(quant_model, model, feed, exact=True)
    assert model.ByteSize() < quant_model.ByteSize()


def test_fold_constants_can_keep_float_weights_with_q(quant_model) -> None:
    model, result = _apply(OnnxFoldConstants(fold_weight_quantize=False), quant_model)
    assert _ops(model)["QuantizeLinear"] == 4 and _ops(model)["DequantizeLinear"] == 4
    assert result.stats["weights_stored_quantized"] == []
    inits = {t.name for t in model.graph.initializer}
    assert {"conv.weight", "fc.weight"} <= inits
    feed = {"x": np.random.default_rng(3).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    _same_outputs(quant_model, model, feed, exact=True)


def test_qdq_survives_the_whole_onnx_pass_chain(quant_model) -> None:
    model = quant_model
    for p in (OnnxFoldConstants(), OnnxRemoveIdentity(), OnnxCleanup()):
        model, _ = _apply(p, model)
    assert _ops(model)["DequantizeLinear"] == 4
    assert set(_weight_dq(model)) == {"Conv", "Gemm"}
    feed = {"x": np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    _same_outputs(quant_model, model, feed, exact=True)


def test_passes_are_registered_with_their_names() -> None:
    from fxcompress.registry import get

    assert get("onnx-cleanup") is OnnxCleanup
    assert get("onnx-fold-constants") is OnnxFoldConstants
    assert get("onnx-remove-identity") is OnnxRemoveIdentity
    assert str(OnnxFoldConstants(fold_weight_quantize=False)) == "onnx-fold-constants{fold-weight-quantize=false}"
    assert all(p.exact and p.stage == "onnx" for p in (OnnxCleanup, OnnxFoldConstants, OnnxRemoveIdentity))
