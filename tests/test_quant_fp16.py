"""ConvertFP16: half weights/activations, keep-in-fp32 ops, float32 at the boundary, ORT agreement."""

from __future__ import annotations

import onnx
import pytest
import torch

from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes import ConvertFP16, FoldBatchNorm
from zoo import ZOO


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _rel_max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max())


def _node_dtypes(gm: torch.fx.GraphModule, *args: torch.Tensor) -> dict[str, torch.dtype]:
    """The dtype each node's tensor output has when the graph actually runs."""
    dtypes: dict[str, torch.dtype] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                dtypes[n.name] = out.dtype
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return dtypes


def _converted(name: str, **options: object) -> tuple[torch.nn.Module, torch.fx.GraphModule, tuple, dict]:
    model, ex = ZOO[name]()
    gm = run_pass(FoldBatchNorm(), trace(model, ex), ex).graph
    result = run_pass(ConvertFP16(**options), gm, ex)
    return model, result.graph, ex, result.stats


@pytest.mark.parametrize("name", ["resnet_basic", "inverted_residual", "transformer_block", "dense_block"])
def test_fp16_graph_keeps_float32_boundary_and_accuracy(name: str) -> None:
    model, gm, ex, _ = _converted(name)
    with torch.no_grad():
        out, ref = gm(*ex), model(*ex)
    assert out.dtype == torch.float32
    assert _cos(out, ref) > 0.999
    assert _rel_max_err(out, ref) < 3e-3  # a few fp16 ulps (2^-10) of the output's range
    proto = export_onnx(gm, ex)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    ort_out = OrtRunner(proto, threads=1)(*ex)
    assert ort_out.dtype == torch.float32
    assert _cos(ort_out, out) > 0.999
    assert _rel_max_err(ort_out, out) < 3e-3


def test_weights_are_half_and_the_file_shrinks() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    ex = (torch.randn(2, 3, 8, 8),)
    gm = trace(model, ex)
    fp32 = export_onnx(gm, ex)
    result = run_pass(ConvertFP16(), gm, ex)
    assert all(p.dtype == torch.float16 for p in result.graph.parameters())
    fp16 = export_onnx(result.graph, ex)
    weights = [i for i in fp16.graph.initializer if len(i.dims) >= 2]
    assert len(weights) == 3 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    assert fp16.ByteSize() < 0.55 * fp32.ByteSize()
    assert result.stats["casts"] == 2  # input to half, output to float


def test_softmax_and_layernorm_stay_float32() -> None:
    _, gm, ex, stats = _converted("transformer_block")
    assert {"softmax", "norm1", "norm2"} <= set(stats["kept_fp32"])
    for node in gm.graph.nodes:
        if node.name in ("softmax", "norm2"):
            src = node.args[0]
            assert src.op == "call_method" and src.target == "to" and src.args[1] == torch.float32
    assert gm.get_submodule("norm1").weight.dtype == torch.float32
    assert gm.get_submodule("attn.qkv").weight.dtype == torch.float16
    ran = _node_dtypes(gm, *ex)
    assert {n: ran[n] for n in stats["kept_fp32"]} == {n: torch.float32 for n in stats["kept_fp32"]}
    assert {n: ran[n] for n in stats["fp16_modules"]} == {n: torch.float16 for n in stats["fp16_modules"]}
    assert ran["output"] == torch.float32


def test_keep_list_is_configurable() -> None:
    model, gm, ex, stats = _converted("transformer_block", keep_fp32=("Linear",))
    assert gm.get_submodule("attn.qkv").weight.dtype == torch.float32
    assert gm.get_submodule("mlp.0").weight.dtype == torch.float32
    assert stats["kept_fp32"] == ["norm1", "attn_qkv", "attn_proj", "norm2", "mlp_0", "mlp_2"]
    # every weight-bearing module kept: nothing runs in half, so no casts and no fp16 error at all
    assert stats["fp16_modules"] == [] and stats["casts"] == 0
    assert set(_node_dtypes(gm, *ex).values()) == {torch.float32}
    with torch.no_grad():
        assert torch.allclose(gm(*ex), model(*ex), rtol=0, atol=1e-6)
