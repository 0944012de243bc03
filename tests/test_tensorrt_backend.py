"""TensorRT / TensorRT-RTX backend: profile derivation, precision/config translation, real
TensorRT-RTX engine builds on this CPU (FP32 and explicit INT8 Q/DQ), timing cache, and the runner
(which needs a GPU: without one it must say so; with one it must agree with ONNX Runtime)."""

from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as oh
from torch import nn

from fxcompress.backends import tensorrt as tb
from fxcompress.backends.tensorrt import (BuildOptions, EngineBuild, GraphTraits, TensorRTParseError,
                                          TrtRunner, build_engine, derive_profiles, gpu_available,
                                          graph_traits, import_trt, module_available, precision_plan,
                                          translate_config)
from fxcompress.errors import BackendUnavailable, ExportError, InputError, PipelineError

RTX = module_available("tensorrt-rtx")
needs_rtx = pytest.mark.skipif(not RTX, reason="tensorrt_rtx (pip tensorrt-rtx-cu12) is not installed")
#: BuilderFlag names of TensorRT 10 that matter here (precision_plan is a pure function of them)
TRT10_FLAGS = frozenset({"FP16", "BF16", "INT8", "FP8", "TF32"})


def _export(model, inputs, dynamic_batch=False):
    names = [f"x{i}" if i else "x" for i in range(len(inputs))]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(inputs), buf, dynamo=False, opset_version=17, input_names=names,
                          output_names=["y"],
                          dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None)
    return onnx.load_from_string(buf.getvalue())


class ConvNet(nn.Module):
    def __init__(self, channels=16, blocks=2):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks)])
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        for conv in self.body:
            x = torch.relu(conv(x)) + x
        return self.fc(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class QDQ(nn.Module):
    """Explicit INT8 fake quantization for TensorRT: per-tensor activations, per-output-channel
    weights, range -128..127, zero point 0 (what QuantizeInt8(scheme='tensorrt') produces)."""

    def __init__(self, layer, act_scale=0.05):
        super().__init__()
        self.layer, self.act_scale = layer, act_scale
        w = layer.weight.detach()
        scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-8) / 127
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zp", torch.zeros(scale.numel(), dtype=torch.int32))

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, self.act_scale, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(self.layer.weight, self.w_scale, self.w_zp, 0, -128, 127)
        if isinstance(self.layer, nn.Conv2d):
            return nn.functional.conv2d(x, w, self.layer.bias, self.layer.stride, self.layer.padding)
        return nn.functional.linear(x, w, self.layer.bias)


def quantized(net: ConvNet) -> ConvNet:
    q = copy.deepcopy(net)
    q.stem = QDQ(q.stem)
    q.body = nn.ModuleList([QDQ(c) for c in q.body])
    q.fc = QDQ(q.fc)
    return q


def _relu_model(shape):
    return oh.make_model(oh.make_graph([oh.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                                       [oh.make_tensor_value_info("x", T.FLOAT, shape)],
                                       [oh.make_tensor_value_info("y", T.FLOAT, shape)]),
                         opset_imports=[oh.make_opsetid("", 17)])


# --------------------------------------------------------------------------- modules and devices

NO_TRT = "real tensorrt is installed here: the module-missing path cannot be exercised"


def test_import_trt_names_the_pip_package_when_missing():
    if module_available("tensorrt"):
        pytest.skip(NO_TRT)
    with pytest.raises(BackendUnavailable, match=r"pip install tensorrt`.*tensorrt-rtx") as info:
        import_trt("tensorrt")
    err = info.value
    assert isinstance(err, tb.TensorRTUnavailable)
    assert err.reason.startswith("target 'tensorrt' needs the Python module 'tensorrt'")
    assert "fallback=" not in err.reason and err.hint == "or compile with fallback='onnxruntime'"
    assert str(err) == f"{err.reason}; {err.hint}"
    with pytest.raises(PipelineError, match="unknown TensorRT target 'tensorrt-llm'"):
        import_trt("tensorrt-llm")


def _fallback_net():
    torch.manual_seed(0)
    return ConvNet(8, 1).eval(), torch.randn(2, 3, 8, 8)


def test_tensorrt_without_the_module_falls_back_to_onnxruntime_and_says_so(tmp_path):
    """``target="tensorrt", fallback="onnxruntime"`` with no ``tensorrt`` module: the artifact runs
    on ONNX Runtime, and the manifest and the report both record why."""
    if module_available("tensorrt"):
        pytest.skip(NO_TRT)
    import fxcompress as fxc
    from fxcompress.artifact import read_manifest

    net, x = _fallback_net()
    compiled = fxc.compile(net, x, target="tensorrt", fallback="onnxruntime", progress=False)
    prefix = "onnxruntime (fallback from tensorrt: "
    manifest = read_manifest(compiled.save(tmp_path / "out"))
    backend = manifest["backend"]
    assert backend.startswith(prefix) and backend.endswith(")")
    assert "needs the Python module 'tensorrt'" in backend and "pip install tensorrt" in backend
    assert compiled.report.meta["backend"] == backend == compiled.backend
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["meta"]["backend"] == backend
    assert manifest["load_backend"] == "onnxruntime" and manifest["engine"] is None
    assert not (tmp_path / "out" / "model.engine").exists()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-5)
    assert "fallback='onnxruntime'" not in backend  # the record does not advise the fallback just taken


def test_tensorrt_without_the_module_and_no_fallback_raises():
    if module_available("tensorrt"):
        pytest.skip(NO_TRT)
    import fxcompress as fxc

    net, x = _fallback_net()
    with pytest.raises(BackendUnavailable) as info:
        fxc.compile(net, x, target="tensorrt", progress=False)
    msg = str(info.value)
    assert "target 'tensorrt' needs the Python module 'tensorrt', which is not importable here" in msg
    assert "pip install tensorrt`" in msg and "fallback='onnxruntime'" in msg


@needs_rtx
def test_import_trt_rtx():
    trt = import_trt("tensorrt-rtx")
    assert trt.__name__ == "tensorrt_rtx"
    assert "FP16" not in tb.builder_flags(trt) and "INT8" not in tb.builder_flags(trt)


def test_runner_without_gpu_says_what_is_missing():
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable) as info:
        TrtRunner(b"not an engine", "tensorrt-rtx")
    msg = str(info.value)
    assert "needs an NVIDIA GPU" in msg and "torch.cuda.is_available() is False" in msg
    assert "target='tensorrt-rtx'" in msg and "fallback='onnxruntime'" in msg
    assert "fallback=" not in info.value.reason and "fallback='onnxruntime'" in info.value.hint


# --------------------------------------------------------------------------- profiles

def test_derive_profiles_batch_and_named_dims():
    m = _relu_model(["batch", 3, "seq"])
    assert derive_profiles(m, [(4, 3, 10)]) == {"x": ((1, 3, 10), (4, 3, 10), (32, 3, 10))}
    assert derive_profiles(m, {"x": (4, 3, 10)}, min_batch=2, max_batch=8, ranges={"seq": (1, 64)}) == \
        {"x": ((2, 3, 1), (4, 3, 10), (8, 3, 64))}
    assert derive_profiles(_relu_model([2, 3]), [(2, 3)]) == {}


@pytest.mark.parametrize("shapes, kw, match", [
    ([(4, 3)], {}, "rank 2"),
    ([(4, 5, 10)], {}, "fixed to 3"),
    ([(40, 3, 10)], {"max_batch": 8}, "outside the range 1..8"),
    ({"y": (4, 3, 10)}, {}, "no graph input named"),
    ([(4, 3, 10), (1,)], {}, "2 example shapes for 1 graph inputs"),
])
def test_derive_profiles_rejects_bad_examples(shapes, kw, match):
    with pytest.raises(InputError, match=match):
        derive_profiles(_relu_model(["batch", 3, "seq"]), shapes, **kw)


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 64), seq=st.integers(1, 128),
       max_batch=st.one_of(st.none(), st.integers(64, 256)))
def test_derived_profiles_contain_the_example(batch, seq, max_batch):
    m = _relu_model(["batch", 7, "seq"])
    ((lo, opt, hi),) = derive_profiles(m, [(batch, 7, seq)], max_batch=max_batch).values()
    assert opt == (batch, 7, seq)
    assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert lo[0] == 1 and hi[0] == (max_batch if max_batch is not None else max(batch, 32))
    assert lo[1:] == hi[1:] == (7, seq)


def test_build_options_validate_and_round_trip():
    opts = BuildOptions(precision="int8", workspace_bytes=1 << 26, profiles={"x": ([1, 3], [4, 3], [8, 3])},
                        timing_cache="cache.bin", builder_optimization_level=2,
                        compute_capabilities=("8.6", "sm89"))
    assert opts.profiles == {"x": ((1, 3), (4, 3), (8, 3))}
    assert opts.compute_capabilities == ("SM86", "SM89")
    d = opts.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert BuildOptions.from_dict(d) == opts
    for bad, match in [({"precision": "int4"}, "precision"), ({"workspace_bytes": 0}, "workspace_bytes"),
                       ({"builder_optimization_level": 9}, "0..5"),
                       ({"profiles": {"x": ((4,), (2,), (8,))}}, "min <= opt <= max"),
                       ({"warmup": 3}, "unknown TensorRT build option")]:
        with pytest.raises(PipelineError, match=match):
            BuildOptions.from_dict(bad)


def test_build_options_from_compile_derive_profiles_for_dynamic_inputs():
    x = torch.randn(2, 3, 8, 8)
    m = _export(ConvNet(), (x,), dynamic_batch=True)
    opts = BuildOptions.from_compile(precision="fp32", example_inputs=(x,), onnx_model=m, max_batch=16,
                                     workspace_bytes=1 << 24)
    assert opts.profiles == {"x": ((1, 3, 8, 8), (2, 3, 8, 8), (16, 3, 8, 8))}
    assert opts.workspace_bytes == 1 << 24
    static = _export(ConvNet(), (x,))
    assert BuildOptions.from_compile(example_inputs=(x,), onnx_model=static).profiles is None


# --------------------------------------------------------------------------- precision and config

def test_graph_traits():
    x = torch.randn(1, 3, 8, 8)
    traits = graph_traits(_export(quantized(ConvNet()), (x,), dynamic_batch=True))
    assert traits.qdq_types == {"INT8"} and traits.has_int8_qdq and traits.dynamic_inputs == ("x",)
    assert not graph_traits(_export(ConvNet(), (x,))).has_qdq
    assert graph_traits(_export(ConvNet().half(), (x.half(),))).float16


@pytest.mark.parametrize("precision, traits, flags, strongly_typed", [
    ("fp32", GraphTraits(), (), True),
    ("fp16", GraphTraits(), ("FP16",), False),
    ("fp16", GraphTraits(frozenset({"INT8"})), ("FP16", "INT8"), False),
    ("int8", GraphTraits(frozenset({"INT8"})), (), True),
    ("best", GraphTraits(), ("FP16",), False),
    ("best", GraphTraits(frozenset({"INT8"})), ("FP16", "INT8"), False),
])
def test_precision_plan_for_a_module_with_precision_flags(precision, traits, flags, strongly_typed):
    plan = precision_plan(precision, traits, module_flags=TRT10_FLAGS)
    assert (plan.flags, plan.strongly_typed) == (flags, strongly_typed)


@pytest.mark.parametrize("precision, traits, note", [
    ("fp32", GraphTraits(), None),
    ("fp32", GraphTraits(frozenset({"INT8"})), "run quantized although precision='fp32'"),
    ("int8", GraphTraits(frozenset({"INT8"})), "INT8 from the graph's Q/DQ"),
    ("fp16", GraphTraits(float16=True), "FP16 from the graph's float16 tensors"),
    ("best", GraphTraits(), "strongly typed"),
])
def test_precision_plan_for_a_strongly_typed_module(precision, traits, note):
    plan = precision_plan(precision, traits, module_flags={"TF32", "REFIT"}, target="tensorrt-rtx")
    assert plan.strongly_typed and plan.flags == ()
    assert (note is None and plan.notes == ()) or any(note in n for n in plan.notes)


def test_precision_plan_errors():
    with pytest.raises(BackendUnavailable, match="no FP16 builder flag.*convert-fp16"):
        precision_plan("fp16", GraphTraits(), module_flags={"TF32"}, target="tensorrt-rtx")
    for flags in (TRT10_FLAGS, {"TF32"}):
        with pytest.raises(PipelineError, match="needs INT8 QuantizeLinear/DequantizeLinear.*quantize-int8"):
            precision_plan("int8", GraphTraits(), module_flags=flags)
        with pytest.raises(PipelineError, match="needs INT8"):
            precision_plan("int8", GraphTraits(frozenset({"UINT8"})), module_flags=flags)


@needs_rtx
def test_translate_config_on_tensorrt_rtx():
    trt = import_trt("tensorrt-rtx")
    builder = trt.Builder(tb.trt_logger(trt))
    opts = BuildOptions(workspace_bytes=1 << 26, builder_optimization_level=2,
                        compute_capabilities=("SM86", "SM89"), profiles={"x": ((1, 5), (4, 5), (16, 5))})
    config = translate_config(trt, builder, opts, GraphTraits(dynamic_inputs=("x",)))
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 1 << 26
    assert config.builder_optimization_level == 2
    assert config.num_compute_capabilities == 2
    assert [config.get_compute_capability(i) for i in range(2)] == [trt.ComputeCapability.SM86,
                                                                     trt.ComputeCapability.SM89]
    assert config.num_optimization_profiles == 1
    assert config.flags == translate_config(trt, builder, BuildOptions()).flags  # no precision flags added
    with pytest.raises(BackendUnavailable, match="fp16"):
        translate_config(trt, builder, BuildOptions(precision="fp16"))
    with pytest.raises(PipelineError, match="unknown compute capability 'SM99'"):
        translate_config(trt, builder, BuildOptions(compute_capabilities=("SM99",)))


# --------------------------------------------------------------------------- real engine builds

@needs_rtx
@pytest.mark.parametrize("name, factory, shape", [
    ("conv", lambda: ConvNet(16, 2), (1, 3, 16, 16)),
    ("transformer", TinyTransformer, (2, 8, 32)),
])
def test_fp32_engine_builds_on_this_cpu(name, factory, shape):
    x = torch.randn(*shape)
    m = _export(factory(), (x,))
    build = build_engine(m, "tensorrt-rtx", BuildOptions(workspace_bytes=1 << 28))
    assert isinstance(build, EngineBuild) and build.size > 10_000
    assert build.module_name == "tensorrt_rtx"
    assert build.module_version == import_trt("tensorrt-rtx").__version__
    assert build.strongly_typed and build.flags == () and build.num_layers > 0
    d = build.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["bytes"] == build.size and d["options"]["workspace_bytes"] == 1 << 28 and len(d["sha256"]) == 64


@needs_rtx
def test_dynamic_batch_engine_with_derived_profile():
    x = torch.randn(2, 3, 16, 16)
    m = _export(ConvNet(), (x,), dynamic_batch=True)
    with pytest.raises(ExportError, match=r"inputs \['x'\] have dynamic dims but no optimization profile"):
        build_engine(m, "tensorrt-rtx")
    opts = BuildOptions.from_compile(example_inputs=(x,), onnx_model=m, max_batch=8)
    build = build_engine(m, "tensorrt-rtx", opts)
    assert build.options.profiles == {"x": ((1, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))}
    assert build.size > 10_000


@needs_rtx
def test_int8_qdq_engine_is_markedly_smaller_than_fp32():
    torch.manual_seed(0)
    net = ConvNet(channels=128, blocks=4).eval()
    x = torch.randn(1, 3, 16, 16)
    params = sum(p.numel() for p in net.parameters())
    assert params > 500_000
    fp32 = build_engine(_export(net, (x,)), "tensorrt-rtx", BuildOptions(precision="fp32"))
    q = _export(quantized(net), (x,))
    assert graph_traits(q).qdq_types == {"INT8"}
    with pytest.raises(PipelineError, match="needs INT8"):
        build_engine(_export(net, (x,)), "tensorrt-rtx", BuildOptions(precision="int8"))
    int8 = build_engine(q, "tensorrt-rtx", BuildOptions(precision="int8"))
    assert int8.size < 0.7 * fp32.size, (int8.size, fp32.size)
    assert fp32.size > 4 * params * 0.9  # FP32 weights are in the FP32 engine
    assert any("INT8 from the graph's Q/DQ" in n for n in int8.notes)


@needs_rtx
def test_parse_errors_name_every_rejected_node():
    m = oh.make_model(oh.make_graph([oh.make_node("Det", ["x"], ["y"], name="my_det")], "g",
                                    [oh.make_tensor_value_info("x", T.FLOAT, [2, 3, 3])],
                                    [oh.make_tensor_value_info("y", T.FLOAT, [2])]),
                      opset_imports=[oh.make_opsetid("", 17)])
    with pytest.raises(TensorRTParseError) as info:
        build_engine(m, "tensorrt-rtx")
    assert isinstance(info.value, ExportError)
    assert [(i.node, i.op_type) for i in info.value.issues] == [("my_det", "Det")]
    assert "my_det" in str(info.value) and "check-tensorrt" in str(info.value)


@needs_rtx
def test_fp16_request_on_rtx_is_a_clear_error_unless_the_graph_is_fp16():
    """TensorRT-RTX has no FP16 flag: a float16 graph builds as a strongly typed network with no
    precision flags; its engine is smaller than the FP32 one of the same net (measured: 550 KB vs
    560 KB, the 10.6 KB of weights halved; most of the engine is JIT kernel source, see
    test_tensorrt_zoo)."""
    trt = import_trt("tensorrt-rtx")
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    net = ConvNet()
    with pytest.raises(BackendUnavailable, match="convert-fp16"):
        build_engine(_export(net, (x,)), "tensorrt-rtx", BuildOptions(precision="fp16"))
    fp32 = build_engine(_export(net, (x,)), "tensorrt-rtx")
    half = _export(copy.deepcopy(net).half(), (x.half(),))
    assert graph_traits(half).float16
    build = build_engine(half, "tensorrt-rtx", BuildOptions(precision="fp16"))
    assert build.strongly_typed and build.flags == ()
    assert not {"FP16", "BF16", "INT8", "FP8"} & tb.builder_flags(trt)
    d = build.describe()
    assert d["strongly_typed"] is True and d["flags"] == [] and d["options"]["precision"] == "fp16"
    assert any("FP16 from the graph's float16 tensors" in n for n in build.notes)
    assert 0 < build.size < fp32.size, (build.size, fp32.size)


@needs_rtx
def test_timing_cache_is_written_and_reused(tmp_path):
    cache = tmp_path / "sub" / "timing.cache"
    m = _export(ConvNet(), (torch.randn(1, 3, 8, 8),))
    first = build_engine(m, "tensorrt-rtx", BuildOptions(timing_cache=str(cache)))
    assert cache.is_file() and cache.stat().st_size > 0
    assert (first.timing_cache_loaded, first.timing_cache_written) == (False, True)
    blob = cache.read_bytes()
    second = build_engine(m, "tensorrt-rtx", BuildOptions(timing_cache=str(cache)))
    assert (second.timing_cache_loaded, second.timing_cache_written) == (True, True)
    assert cache.read_bytes()[:16] == blob[:16]
    assert any("no-op" in n for n in second.notes)  # TensorRT-RTX documents timing caches as no-ops
    assert second.describe()["timing_cache"] == {"path": str(cache), "loaded": True, "written": True}


@needs_rtx
def test_engine_save(tmp_path):
    build = build_engine(_relu_model([2, 3]), "tensorrt-rtx")
    path = build.save(tmp_path / "model.engine")
    assert tb.load_engine_bytes(path) == build.engine
    from fxcompress.errors import ArtifactError

    with pytest.raises(ArtifactError, match="missing"):
        tb.load_engine_bytes(tmp_path / "nope.engine")


# --------------------------------------------------------------------------- running (GPU only)

NO_GPU = "needs an NVIDIA GPU: a TensorRT engine cannot run on a CPU (torch.cuda.is_available() is False)"


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason=NO_GPU)
@pytest.mark.parametrize("target", ["tensorrt-rtx", "tensorrt"])
def test_engine_runs_and_agrees_with_onnxruntime(target, tmp_path):
    if not module_available(target):
        pytest.skip(f"{target} module is not installed")
    import onnxruntime as ort

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    m = _export(ConvNet(), (x,), dynamic_batch=True)
    build = build_engine(m, target, BuildOptions.from_compile(example_inputs=(x,), onnx_model=m, max_batch=8))
    runner = TrtRunner(build.engine, target, runtime_cache=str(tmp_path / "runtime.cache"))
    assert runner.input_names == ["x"] and runner.output_names == ["y"]
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 2, 8):
        xb = torch.randn(batch, 3, 16, 16)
        got = runner(xb)
        want = torch.from_numpy(session.run(None, {"x": xb.numpy()})[0])
        assert got.device == xb.device and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    got_cuda = runner(x.cuda())
    assert got_cuda.is_cuda
    with pytest.raises(InputError, match="outside the engine's optimization profile"):
        runner(torch.randn(9, 3, 16, 16))
    with pytest.raises(InputError, match="takes 1 input"):
        runner(x, x)
    if target == "tensorrt-rtx":
        assert runner.save_runtime_cache() and (tmp_path / "runtime.cache").stat().st_size > 0
    assert np.isfinite(got_cuda.cpu().numpy()).all()
