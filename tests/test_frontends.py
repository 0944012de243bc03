"""The torch.export front end: Hugging Face models and torch's own transformer compiled end to end,
the canonical graph (standard modules under the user's paths, torch-level ops), agreement with
symbolic tracing on the zoo, and clear errors where neither front end captures a model."""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import Tensor, nn

import fxcompress as fxc
from fxcompress import ops
from fxcompress.errors import InputError, OpaqueModuleWarning, TraceError
from fxcompress.trace import trace
from zoo import ZOO, ZOO_NAMES

transformers = pytest.importorskip("transformers")

SEQ = 8
#: eager vs ONNX Runtime (fp32, different kernels and fusions)
ATOL_ORT = 1e-4


def _ids(batch: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (batch, SEQ), generator=g), torch.ones(batch, SEQ, dtype=torch.long)


def _image(batch: int = 1, seed: int = 0) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _build(factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def bert() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return _build(lambda: transformers.BertModel(cfg)), _ids()


def distilbert() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                        max_position_embeddings=64)
    return _build(lambda: transformers.DistilBertModel(cfg)), _ids()


def vit() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_labels=10)
    return _build(lambda: transformers.ViTForImageClassification(cfg)), (_image(),)


def gpt2() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, use_cache=False)
    return _build(lambda: transformers.GPT2LMHeadModel(cfg)), _ids()[:1]


def hf_resnet() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    return _build(lambda: transformers.ResNetForImageClassification(cfg)), (_image(),)


def hf_mobilenet_v2() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=10)
    return _build(lambda: transformers.MobileNetV2ForImageClassification(cfg)), (_image(),)


def hf_convnext() -> tuple[nn.Module, tuple[Tensor, ...]]:
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=10)
    return _build(lambda: transformers.ConvNextForImageClassification(cfg)), (_image(),)


def torch_encoder() -> tuple[nn.Module, tuple[Tensor, ...]]:
    layer = lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)  # noqa: E731
    model = _build(lambda: nn.TransformerEncoder(layer(), 2, enable_nested_tensor=False))
    return model, (torch.randn(1, SEQ, 32, generator=torch.Generator().manual_seed(0)),)


HF = {"bert": bert, "distilbert": distilbert, "vit": vit, "gpt2": gpt2, "hf_resnet": hf_resnet,
      "hf_mobilenet_v2": hf_mobilenet_v2, "hf_convnext": hf_convnext, "torch_encoder": torch_encoder}


def _first(out):
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "keys"):
        return next(iter(out.values()))
    return out[0]


def _quiet_compile(*args, **kwargs) -> fxc.Compiled:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(padding_idx|advanced indexing|Constant folding).*")
        return fxc.compile(*args, **kwargs)


@pytest.mark.parametrize("name", list(HF))
def test_models_symbolic_tracing_cannot_see_compile_to_onnxruntime(name: str) -> None:
    model, inputs = HF[name]()
    compiled = _quiet_compile(model, inputs, "", target="onnxruntime")
    assert compiled.report.meta["opaque_modules"] == {}
    assert compiled.report.meta["frontend"] in ("export", "fx")
    with torch.no_grad():
        expected = _first(model(*inputs))
        wide = tuple(torch.cat([t, t]) for t in inputs)
        wide_expected = _first(model(*wide))
    torch.testing.assert_close(_first(compiled(*inputs)), expected, rtol=1e-4, atol=ATOL_ORT)
    torch.testing.assert_close(_first(compiled(*wide)), wide_expected, rtol=1e-4, atol=ATOL_ORT)  # dynamic batch
    std = [type(m) for m in compiled.graph_module.modules() if type(m) in (nn.Linear, nn.Conv2d, nn.LayerNorm,
                                                                            nn.BatchNorm2d, nn.Embedding)]
    assert std, "no parametrized op was lifted to a standard module"


def test_top_level_untraceable_models_use_export_and_keep_user_paths() -> None:
    model, inputs = bert()
    with pytest.raises(TraceError):
        trace(model, inputs, frontend="fx")
    gm = trace(model, inputs)
    assert gm.meta["frontend"] == "export"
    linears = {n.target for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)}
    assert linears == {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    kinds = {ops.kind(n, gm) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")}
    assert {"linear", "normalization", "embedding", "attention", "reshape", "permute"} <= kinds
    assert not any(isinstance(n.target, torch._ops.OpOverload) and n.target in (
        torch.ops.aten.linear.default, torch.ops.aten.layer_norm.default, torch.ops.aten.embedding.default)
        for n in gm.graph.nodes), "parametrized aten ops must be lifted to modules"


def test_quantize_dynamic_makes_every_bert_linear_int8() -> None:
    model, inputs = bert()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    n_embedding = sum(isinstance(m, nn.Embedding) for m in model.modules())
    fp32 = _quiet_compile(model, inputs, "", target="onnxruntime")
    int8 = _quiet_compile(model, inputs, "quantize-dynamic", target="onnxruntime")
    op_types = [n.op_type for n in int8.onnx_model.graph.node]
    int8_weights = [i for i in int8.onnx_model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == n_linear + n_embedding, (n_linear, n_embedding, op_types)
    assert "MatMul" not in op_types or op_types.count("MatMul") <= 2 * 2  # attention's two matmuls per layer at most
    from onnx import numpy_helper

    def weight_bytes(m: onnx.ModelProto) -> int:
        return sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer)

    fp32_bytes, int8_bytes = weight_bytes(fp32.onnx_model), weight_bytes(int8.onnx_model)
    assert int8_bytes < 0.35 * fp32_bytes, (int8_bytes, fp32_bytes)  # embeddings too; biases, norms, scales stay float
    with torch.no_grad():
        ref = _first(model(*inputs))
    out = _first(int8(*inputs))
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, float(cos)


class _LogitsOf(nn.Module):
    """A user's wrapper: symbolic tracing reads ``.logits`` off the ModelOutput of a submodule that
    ``auto`` has to export and inline."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.m(input_ids=ids).logits


@pytest.mark.parametrize("wrapped", [False, True], ids=["gpt2", "wrapped-gpt2"])
def test_gpt2_conv1d_projections_are_linear_layers_that_quantize(wrapped: bool) -> None:
    """GPT-2's projections are ``Conv1D`` (``addmm`` with a transposed weight): captured as ``nn.Linear``
    at the same paths, every one of them (and the LM head) is quantized by ``quantize-dynamic``."""
    model, inputs = gpt2()
    conv1d = {name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(conv1d) == 2 * 4
    if wrapped:
        model, inputs, conv1d = _LogitsOf(model), inputs[:1], {f"m.{name}" for name in conv1d}
    gm = trace(model, inputs)
    assert gm.meta["opaque_modules"] == {}
    linears = {n.target for n in gm.graph.nodes
               if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)}
    assert conv1d <= linears
    with torch.no_grad():
        expected = _first(model(*inputs))
        torch.testing.assert_close(_first(gm(*inputs)), expected, rtol=1e-5, atol=1e-5)
    int8 = _quiet_compile(model, inputs, "quantize-dynamic", target="onnxruntime")
    head = "m.lm_head" if wrapped else "lm_head"
    assert set(int8.report[1].stats["int8_layers"]) == {path.replace(".", "_") for path in conv1d | {head}}
    cos = torch.nn.functional.cosine_similarity(_first(int8(*inputs)).flatten(), expected.flatten(), dim=0)
    assert cos > 0.99, float(cos)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_export_frontend_agrees_with_symbolic_tracing_on_the_zoo(name: str) -> None:
    model, inputs = ZOO[name]()
    fx_gm = trace(model, inputs, frontend="fx")
    ex_gm = trace(model, inputs, frontend="export")
    assert ex_gm.meta["frontend"] == "export"

    def parametrized(gm: torch.fx.GraphModule) -> list[tuple[str, str, list[tuple[str, tuple[int, ...]]]]]:
        out = []
        for n in gm.graph.nodes:
            if n.op == "call_module":
                mod = gm.get_submodule(n.target)
                params = [(k, tuple(p.shape)) for k, p in mod.named_parameters()]
                if params:
                    out.append((str(n.target), type(mod).__name__, params))
        return out

    fx_mods, ex_mods = parametrized(fx_gm), parametrized(ex_gm)
    opaque = set(fx_gm.meta["opaque_modules"])
    assert [m for m in fx_mods if m[0] not in opaque] == ex_mods
    with torch.no_grad():
        torch.testing.assert_close(ex_gm(*inputs), fx_gm(*inputs), rtol=1e-5, atol=1e-6)


def test_canonical_graph_goldens(golden) -> None:
    for name in ("bert", "vit"):
        model, inputs = HF[name]()
        golden.check(trace(model, inputs), f"canonical_{name}")


@pytest.mark.parametrize("passes", [
    "eliminate-dead-code,remove-dropout,remove-identity,fold-constants,fold-batchnorm",
    "quantize-int8", "convert-fp16", "prune-magnitude", "prune-nm", "prune-channels{ratio=0.5}",
    "quant-sensitivity{k=1},quantize-dynamic", "distill{epochs=1}",
])
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_every_pass_runs_and_verifies_on_transformers(name: str, passes: str) -> None:
    model, inputs = HF[name]()
    data = [tuple(torch.cat([t, t]) for t in inputs)] * 2
    compiled = _quiet_compile(model, inputs, passes, target="onnxruntime", calibration=data, train_data=data)
    rows = [r for r in compiled.report.rows if r.name not in ("input", "export-onnx")]
    assert all(r.status in ("ok", "unchanged") for r in rows), [(r.name, r.status, r.diagnostics) for r in rows]
    final = compiled.report.rows[-1].error
    floor = 0.8 if "prune" in passes else 0.95  # random weights, no recovery: pruning half is lossy
    assert final is not None and final["cosine"] > floor, final
    with torch.no_grad():
        fx_out = _first(compiled.graph_module(*inputs))
    np.testing.assert_allclose(_first(compiled(*inputs)).numpy(), fx_out.numpy(), rtol=1e-3, atol=2e-3)


def test_prune_channels_shrinks_bert_mlp() -> None:
    model, inputs = bert()
    compiled = _quiet_compile(model, inputs, "prune-channels{ratio=0.5}", target="fx")
    gm = compiled.graph_module
    for i in range(2):
        dense = gm.get_submodule(f"encoder.layer.{i}.intermediate.dense")
        assert dense.out_features == 32  # 64 -> 32: the MLP's intermediate channels
        assert gm.get_submodule(f"encoder.layer.{i}.output.dense").in_features == 32
        assert gm.get_submodule(f"encoder.layer.{i}.attention.output.dense").out_features == 32  # hidden size kept
        q = gm.get_submodule(f"encoder.layer.{i}.attention.self.query")
        assert q.out_features % 8 == 0  # whole heads of head_dim 8 or none
    assert gm.get_submodule("embeddings.LayerNorm").normalized_shape == (32,)


def test_unexportable_model_names_both_front_ends() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            y = self.fc(x)
            if y.sum() > 0:
                return y.relu()
            return y

    with pytest.raises(TraceError) as info:
        trace(DataDependent().eval(), torch.randn(2, 4))
    msg = str(info.value)
    assert "torch.fx:" in msg and "torch.export:" in msg and "fix:" in msg
    assert "DataDependent" in msg


def test_kv_cache_output_names_use_cache() -> None:
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, use_cache=True)
    model = _build(lambda: transformers.GPT2LMHeadModel(cfg))
    with pytest.raises(TraceError) as info:
        trace(model, _ids()[:1], frontend="export")
    assert "use_cache=False" in str(info.value)


def test_opaque_modules_over_a_tenth_of_the_parameters_warn() -> None:
    model, inputs = ZOO["resnet_basic"]()
    with pytest.warns(OpaqueModuleWarning, match=r"layers\.1.*% of the parameters"):
        compiled = fxc.compile(model, inputs, "", target="fx", leaf_modules=["layers.1"])
    first = compiled.report.rows[0]
    assert any(d["severity"] == "warning" and "layers.1" in d["message"] for d in first.diagnostics)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpaqueModuleWarning)
        fxc.compile(model, inputs, "", target="fx")


def test_frontend_argument_is_checked() -> None:
    model, inputs = ZOO["resnet_basic"]()
    with pytest.raises(InputError, match="frontend must be one of"):
        trace(model, inputs, frontend="dynamo")  # type: ignore[arg-type]


def test_sequence_axis_can_be_dynamic() -> None:
    model, inputs = bert()
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    compiled = _quiet_compile(model, inputs, "", target="onnxruntime", dynamic_axes=axes)
    longer = tuple(torch.cat([t, t], dim=1) for t in inputs)
    with torch.no_grad():
        expected = _first(model(*longer))
    torch.testing.assert_close(_first(compiled(*longer)), expected, rtol=1e-4, atol=ATOL_ORT)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_exported_transformers_build_tensorrt_rtx_engines(name: str) -> None:
    """Real TensorRT-RTX engines (built on this CPU) for the exported graphs, FP32 and INT8 Q/DQ."""
    from fxcompress.backends.tensorrt import module_available

    if not module_available("tensorrt-rtx"):
        reason = "tensorrt_rtx is not importable: install the test extra (pip install tensorrt-rtx-cu12)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    model, inputs = HF[name]()
    data = [tuple(torch.cat([t, t]) for t in inputs)] * 2
    fp32 = _quiet_compile(model, inputs, "", target="tensorrt-rtx", verify=False)
    int8 = _quiet_compile(model, inputs, "quantize-int8", calibration=data, target="tensorrt-rtx",
                          precision="int8", verify=False)
    for compiled in (fp32, int8):
        assert compiled.engine and len(compiled.engine) > 1000
        assert compiled.engine_info["module"] == "tensorrt_rtx"
    ops_int8 = {n.op_type for n in int8.onnx_model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops_int8


def test_a_pass_that_rewrites_nothing_says_why() -> None:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x)

    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(OpaqueModuleWarning):
        compiled = fxc.compile(Wrap().eval(), (x,), "fold-batchnorm,quantize-dynamic", target="fx",
                               leaf_modules=["body"])
    for row in compiled.report.rows[1:]:
        assert row.status == "unchanged"
        assert any("opaque modules 'body' (100% of the parameters)" in d["message"] for d in row.diagnostics), row
    plain = fxc.compile(ZOO["transformer_block"]()[0], ZOO["transformer_block"]()[1], "fold-batchnorm", target="fx")
    assert [d["message"] for d in plain.report.rows[1].diagnostics] == ["'fold-batchnorm' found nothing to rewrite"]
