"""Canonical graph text (.fxg): exact lines, determinism across processes, no values, ONNX, diff, networkx."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from fxcompress.graph_text import diff, read_fxg, to_networkx, to_text, write_fxg

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]


class Block(nn.Module):
    """ResNet basic block (conv-bn-relu-conv-bn + identity) followed by matmul self-attention and a head."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.norm = nn.LayerNorm(channels)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        t = self.norm(y.flatten(2).transpose(1, 2))
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * 0.5, dim=-1)
        t = torch.matmul(att, v).mean(dim=1)
        return self.fc(self.drop(t)).view(-1, self.fc.out_features)


def build(channels: int = 8, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    return Block(channels).eval(), (torch.randn(2, 3, 8, 8),)


def traced(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    """fxcompress.trace when it exists, else symbolic_trace + ShapeProp (same meta either way)."""
    try:
        from fxcompress.trace import trace
    except ImportError:
        from fxcompress.verify import propagate_shapes

        return propagate_shapes(torch.fx.symbolic_trace(model), inputs)
    return trace(model, inputs)


def export(model: nn.Module, inputs: tuple) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def block_gm() -> torch.fx.GraphModule:
    return traced(*build())


def test_fx_lines_show_modules_functions_params_and_shapes(block_gm):
    lines = to_text(block_gm).splitlines()
    assert lines[0] == "# fxg 1 fx"
    assert len(lines) == 1 + len(block_gm.graph.nodes)
    expected = [
        "placeholder   %x -> f32[2,3,8,8]",
        "call_module   %conv1 = conv1:Conv2d(3->8, k=3x3, s=1, p=1, g=1, no-bias) (%x) "
        "{weight: f32[8,3,3,3]} -> f32[2,8,8,8]",
        "call_module   %bn1 = bn1:BatchNorm2d(8, eps=1e-05) (%conv1) {weight: f32[8], bias: f32[8], "
        "running_mean: f32[8], running_var: f32[8], num_batches_tracked: i64[]} -> f32[2,8,8,8]",
        "call_function %relu = torch.relu (%bn1) -> f32[2,8,8,8]",
        "call_function %add = operator.add (%bn2, %relu) -> f32[2,8,8,8]",
        "call_method   %flatten = Tensor.flatten (%relu_1, 2) -> f32[2,8,64]",
        "call_module   %norm = norm:LayerNorm(8, eps=1e-05) (%transpose) {weight: f32[8], bias: f32[8]} "
        "-> f32[2,64,8]",
        "call_module   %qkv = qkv:Linear(8->24) (%norm) {weight: f32[24,8], bias: f32[24]} -> f32[2,64,24]",
        "call_method   %chunk = Tensor.chunk (%qkv, 3, dim=-1) -> (f32[2,64,8], f32[2,64,8], f32[2,64,8])",
        "call_function %getitem = operator.getitem (%chunk, 0) -> f32[2,64,8]",
        "call_function %matmul = torch.matmul (%getitem, %transpose_1) -> f32[2,64,64]",
        "call_function %mul = operator.mul (%matmul, 0.5) -> f32[2,64,64]",
        "call_function %softmax = torch.softmax (%mul, dim=-1) -> f32[2,64,64]",
        "call_module   %drop = drop:Dropout(p=0.1) (%mean) -> f32[2,8]",
        "call_module   %fc = fc:Linear(8->4) (%drop) {weight: f32[4,8], bias: f32[4]} -> f32[2,4]",
        "call_method   %view = Tensor.view (%fc, -1, 4) -> f32[2,4]",
        "output        %output (%view) -> f32[2,4]",
    ]
    for line in expected:
        assert line in lines, f"missing line {line!r} in:\n" + "\n".join(lines)


def test_fx_graph_and_graph_module_give_the_same_text(block_gm):
    assert to_text(block_gm.graph) == to_text(block_gm)


PIPELINE = "eliminate-dead-code,remove-dropout,onnx-fold-constants,onnx-cleanup"


def compiled_texts(model: nn.Module, inputs: tuple) -> str:
    """Every snapshot of ``fxc.compile(..., target="onnx")``: trace, FX passes, the project's ONNX
    export and ONNX passes, then the final ONNX model."""
    import fxcompress as fxc

    compiled = fxc.compile(model, inputs, PIPELINE, target="onnx", progress=False)
    return "".join(s.text for s in compiled.snapshots) + to_text(compiled.onnx_model)


_SUBPROCESS = """
import sys
sys.path.insert(0, {tests!r})
from test_graph_text import build, compiled_texts, traced
from fxcompress.graph_text import to_text
model, inputs = build()
sys.stdout.write(to_text(traced(model, inputs)))
sys.stdout.write(compiled_texts(model, inputs))
"""


def test_text_is_byte_identical_across_processes_and_hash_seeds():
    texts = []
    for seed in ("1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _SUBPROCESS.format(tests=str(HERE))], env=env,
                              capture_output=True, check=True)
        texts.append(done.stdout)
    assert texts[0] == texts[1]
    model, inputs = build()
    here = (to_text(traced(model, inputs)) + compiled_texts(model, inputs)).encode()
    assert texts[0] == here
    assert b"# fxg 1 fx" in here and here.count(b"# fxg 1 onnx") == 4


def test_text_never_shows_values_but_shows_shapes():
    model, inputs = build(seed=0)
    other, _ = build(seed=1)
    with torch.no_grad():
        other.bn1.running_mean.add_(3.0)
        other.fc.bias.mul_(-7.0)
    assert not torch.equal(model.conv1.weight, other.conv1.weight)
    base = to_text(traced(model, inputs))
    assert to_text(traced(other, inputs)) == base

    wider, _ = build(channels=16)
    changed = to_text(traced(wider, inputs))
    assert changed != base
    delta = diff(base, changed)
    assert "-call_module   %conv1 = conv1:Conv2d(3->8," in delta
    assert "+call_module   %conv1 = conv1:Conv2d(3->16," in delta


def test_onnx_text_is_deterministic_shows_conv_shapes_and_no_values():
    model, inputs = build()
    proto = export(model, inputs)
    text = to_text(proto)
    assert text == to_text(export(*build()))
    lines = text.splitlines()
    assert lines[:3] == ["# fxg 1 onnx", "# opset ai.onnx=17", "input %x : f32[batch,3,8,8]"]
    assert lines[-1] == "output %logits : f32[batch,4]"
    convs = [line for line in lines if "= Conv(%" in line]
    assert len(convs) == 2
    assert convs[0].startswith("/conv1/Conv = Conv(%x, %")
    assert ":f32[8,3,3,3]" in convs[0]
    assert convs[0].endswith("{dilations=[1,1], group=1, kernel_shape=[3,3], pads=[1,1,1,1], strides=[1,1]} "
                             "-> %/conv1/Conv_output_0 : f32[batch,8,8,8]")
    assert any(line.startswith("/fc/Gemm = Gemm(") and ":f32[4,8]" in line for line in lines)

    other, _ = build(seed=3)
    assert to_text(export(other, inputs)) == text
    assert to_text(export(build(channels=16)[0], inputs)) != text
    assert len(proto.graph.value_info) == 0, "to_text must run shape inference on a copy, not the model"


def test_onnx_graphsurgeon_graph_gives_the_same_text_and_is_not_mutated():
    import onnx_graphsurgeon as gs

    proto = export(*build())
    graph = gs.import_onnx(proto)
    before = [(n.name, n.op) for n in graph.nodes]
    assert to_text(graph) == to_text(proto)
    assert [(n.name, n.op) for n in graph.nodes] == before


def test_onnx_qdq_scales_show_dtype_only():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    scale = numpy_helper.from_array(np.array(0.0123, dtype=np.float32), "x_scale")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "x_zero")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["y"], name="dq")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph(nodes, "qdq", [x], [y], [scale, zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert to_text(model).splitlines() == [
        "# fxg 1 onnx",
        "# opset ai.onnx=17",
        "input %x : f32[n,4]",
        "q = QuantizeLinear(%x, %x_scale:f32[], %x_zero:i8[]) -> %xq : i8[n,4]",
        "dq = DequantizeLinear(%xq, %x_scale:f32[], %x_zero:i8[]) -> %y : f32[n,4]",
        "output %y : f32[n,4]",
    ]


def test_diff_is_unified_and_empty_when_equal():
    a = "# fxg 1 fx\nplaceholder   %x\ncall_function %relu = torch.relu (%x)\n"
    b = a.replace("torch.relu", "torch.sigmoid")
    assert diff(a, a) == ""
    assert diff(a, b, "golden", "actual").splitlines() == [
        "--- golden",
        "+++ actual",
        "@@ -1,3 +1,3 @@",
        " # fxg 1 fx",
        " placeholder   %x",
        "-call_function %relu = torch.relu (%x)",
        "+call_function %relu = torch.sigmoid (%x)",
    ]


def test_networkx_matches_fx_graph(block_gm):
    g = to_networkx(block_gm)
    nodes = list(block_gm.graph.nodes)
    assert g.number_of_nodes() == len(nodes)
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in nodes)
    assert g.nodes["conv1"] == {"op": "call_module", "target": "conv1", "kind": "Conv2d",
                                "shape": (2, 8, 8, 8), "dtype": "f32"}
    assert g.nodes["relu"]["target"] == "torch.relu"
    assert g.has_edge("conv1", "bn1") and g.has_edge("relu", "add")
    assert g.nodes["chunk"]["shape"] == ((2, 64, 8),) * 3


def test_networkx_of_onnx_follows_tensors():
    proto = export(*build())
    g = to_networkx(proto)
    assert g.number_of_nodes() == len(proto.graph.node)
    assert g.nodes["/conv1/Conv"]["op"] == "Conv"
    assert g.nodes["/conv1/Conv"]["shape"] == ("batch", 8, 8, 8)
    assert g.edges["/conv1/Conv", "/Relu"]["tensors"] == ["/conv1/Conv_output_0"]


def test_write_and_read_fxg(tmp_path):
    path = write_fxg(tmp_path / "sub" / "g.fxg", "# fxg 1 fx\nplaceholder   %x → é")
    assert path.read_bytes() == "# fxg 1 fx\nplaceholder   %x → é\n".encode("utf-8")
    assert read_fxg(path) == "# fxg 1 fx\nplaceholder   %x → é\n"


def test_to_text_rejects_an_untraced_module():
    with pytest.raises(TypeError, match="trace nn.Modules first"):
        to_text(nn.Linear(2, 2))


def test_golden_resnet_block_fx_and_onnx(golden, block_gm):
    golden.check(block_gm, "text_block_fx")
    golden.check(export(*build()), "text_block_onnx")
