"""QuantizeInt8 on the zoo: Q/DQ placement per scheme (structure + goldens), ONNX lowering,
ONNX Runtime integer kernels and agreement with the FX fake-quant graph."""

from __future__ import annotations

import collections
import os
import re
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from fxcompress.errors import PassError, PipelineError
from fxcompress.graph_text import to_text
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes import FoldBatchNorm, QuantizeInt8
from passes.quantize.fake_quant import dequantize
from zoo import ZOO, ZOO_NAMES

FQ = torch.fake_quantize_per_tensor_affine
INT_KERNELS = ("QLinearConv", "QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
               "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger")
FLOAT_COMPUTE = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "ConvTranspose")


def require_tensorrt_rtx() -> None:
    """Skip without ``tensorrt_rtx``, except in CI (``CI=true``), where that is a failure."""
    from fxcompress.backends.tensorrt import module_available

    if not module_available("tensorrt-rtx"):
        reason = "tensorrt_rtx is not importable: install the test extra (pip install tensorrt-rtx-cu12)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true: {reason}; CI must build TensorRT-RTX engines", pytrace=False)
        pytest.skip(reason)


def prepared(name: str, target: str = "onnxruntime", batches: int = 4
             ) -> tuple[GraphModule, tuple[torch.Tensor, ...], fxc.PassContext]:
    model, ex = ZOO[name]()
    gen = torch.Generator().manual_seed(0)
    calib = [tuple(torch.randn(e.shape, generator=gen) for e in ex) for _ in range(batches)]
    ctx = fxc.PassContext(ex, calibration=calib, target=target)
    gm = FoldBatchNorm().run(trace(model, ex), ctx).graph
    gm.recompile()  # run() on the same graph, not a copy: the node names the placement goldens pin
    return gm, ex, ctx


def quantized(name: str, target: str = "onnxruntime", **options: Any) -> tuple[GraphModule, tuple, Any]:
    gm, ex, ctx = prepared(name, target)
    result = QuantizeInt8(**options).run(gm, ctx)
    result.graph.recompile()  # as in prepared(): the manager would recompile
    return result.graph, ex, result


def fq_nodes(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.target is FQ]


def compute_nodes(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (
        torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.linear)]


def ort_ops(model: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    path = tmp_path / "optimized.onnx"
    OrtRunner(model, threads=1, optimized_model_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("scheme", ["onnxruntime", "tensorrt"])
def test_every_conv_and_linear_gets_int8_weights_and_quantized_input(scheme: str) -> None:
    gm, _, result = quantized("resnet_basic", scheme)
    convs = compute_nodes(gm)
    assert len(convs) == 7  # 6 convs + fc
    for node in convs:
        x, w = node.args[0], node.args[1]
        assert x.target is FQ, node.name
        assert w.target is dequantize, node.name
        w_q = getattr(gm, w.args[0].target)
        assert w_q.dtype == torch.int8
    assert result.stats["float_layers"] == {}
    assert result.stats["scheme"] == scheme
    assert not any(p.dtype == torch.float32 and p.dim() == 4 for p in gm.parameters())


def test_tensorrt_scheme_is_symmetric_and_leaves_conv_outputs_alone() -> None:
    gm, _, result = quantized("resnet_basic", "tensorrt")
    fqs = fq_nodes(gm)
    assert all(n.args[2] == 0 and n.args[3:] == (-128, 127) for n in fqs)
    convs = set(compute_nodes(gm))
    after_conv = [n for n in fqs if n.args[0] in convs]
    assert [n.args[0].name for n in after_conv] == ["layers_1_downsample_2"]  # the shortcut conv only
    assert all("add" in str(u.target) for n in after_conv for u in n.users)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 2
    for add in adds:  # conv output fused into the add, residual input quantized
        kinds = sorted("fq" if a.target is FQ else "conv" if a in convs else "other" for a in add.args)
        assert kinds == ["conv", "fq"], add.name
    ranges = [getattr(gm, n.args[0].target) for n in gm.graph.nodes if n.target is dequantize]
    assert max(int(r.abs().max()) for r in ranges) == 127
    assert result.stats["activations"] == "int8" and result.stats["weight_range"] == [-127, 127]


def test_onnxruntime_scheme_quantizes_outputs_after_relu_with_uint8() -> None:
    gm, _, result = quantized("resnet_basic", "onnxruntime")
    fqs = fq_nodes(gm)
    assert all(n.args[3:] == (0, 255) for n in fqs)
    after_relu = [n for n in fqs if n.args[0].op == "call_module" and "relu" in str(n.args[0].target)]
    assert after_relu and all(n.args[2] == 0 for n in after_relu)  # zero point 0: ORT folds the ReLU
    ranges = [getattr(gm, n.args[0].target) for n in gm.graph.nodes if n.target is dequantize]
    assert max(int(r.abs().max()) for r in ranges) == 64  # reduce_range: 7-bit weights


def test_passthrough_ops_share_the_scale_of_their_input() -> None:
    gm, _, _ = quantized("resnet_basic", "onnxruntime")
    flat = next(n for n in gm.graph.nodes if n.target is torch.flatten)
    before, after = flat.args[0], next(iter(flat.users))
    assert before.target is FQ and after.target is FQ
    assert before.args[1:] == after.args[1:]


def _stable_text(graph: Any) -> str:
    """Graph text without calibration-dependent numbers (scales, zero points)."""
    text = to_text(graph)
    text = re.sub(r"(fake_quantize_per_tensor_affine \(%[\w.]+), [-0-9.e]+, -?\d+,", r"\1, <scale>, <zp>,", text)
    return text


@pytest.mark.parametrize("name", ["resnet_basic", "inverted_residual", "transformer_block"])
@pytest.mark.parametrize("scheme", ["onnxruntime", "tensorrt"])
def test_placement_goldens(golden: Any, name: str, scheme: str) -> None:
    gm, ex, _ = quantized(name, scheme)
    golden.check(_stable_text(gm), f"quant_{name}_{scheme}")
    golden.check(to_text(export_onnx(gm, ex)), f"quant_{name}_{scheme}_onnx")


@pytest.mark.parametrize("scheme", ["onnxruntime", "tensorrt"])
def test_onnx_has_int8_weight_initializers_and_qdq(scheme: str) -> None:
    gm, ex, _ = quantized("inverted_residual", scheme)
    model = export_onnx(gm, ex)
    inits = {i.name: i for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(dq) == len(compute_nodes(gm))
    for n in dq:
        assert inits[n.input[0]].data_type == onnx.TensorProto.INT8
        assert any(a.name == "axis" and a.i == 0 for a in n.attribute)
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4 for i in inits.values())


def test_onnxruntime_runs_integer_kernels_and_no_float_conv(tmp_path: Path) -> None:
    gm, ex, _ = quantized("resnet_bottleneck", "onnxruntime")
    ops = ort_ops(export_onnx(gm, ex), tmp_path)
    assert ops["QLinearConv"] == 12 and ops["QLinearAdd"] == 3 and ops["QGemm"] == 1
    assert not any(ops[op] for op in FLOAT_COMPUTE), ops


@pytest.mark.parametrize("scheme", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_ort_int8_agrees_with_fx_fake_quant(name: str, scheme: str) -> None:
    """ONNX Runtime also runs the tensorrt-scheme Q/DQ graph (with float kernels)."""
    gm, ex, result = quantized(name, scheme)
    proto = export_onnx(gm, ex)
    assert result.stats["int8_layers"] and any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    ort_out = _first(OrtRunner(proto, threads=1)(*ex))
    with torch.no_grad():
        fx_out = _first(gm(*ex))
    assert cosine(ort_out, fx_out) > 0.999


def test_fake_quant_graph_stays_close_to_fp32() -> None:
    model, ex = ZOO["resnet_bottleneck"]()
    gm, ex, _ = quantized("resnet_bottleneck", "onnxruntime")
    with torch.no_grad():
        assert cosine(gm(*ex), model(*ex)) > 0.99


def test_int8_onnx_is_more_than_3x_smaller() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    ex = (torch.randn(2, 3, 8, 8),)
    gm = trace(model, ex)
    fp32 = export_onnx(gm, ex).ByteSize()
    small = run_pass(QuantizeInt8(), gm, ex, calibration=[ex], target="onnxruntime").graph
    int8 = export_onnx(small, ex).ByteSize()
    assert fp32 / int8 > 3.0


def test_missing_calibration_names_the_argument() -> None:
    gm, ex, _ = prepared("resnet_basic")
    with pytest.raises(PassError, match="calibration="):
        QuantizeInt8().run(gm, fxc.PassContext(ex))


def test_bad_options_are_pipeline_errors() -> None:
    with pytest.raises(PipelineError, match="observer"):
        QuantizeInt8(observer="magic")
    with pytest.raises(PipelineError, match="symmetric"):
        QuantizeInt8(scheme="tensorrt", activations="uint8").resolve("onnxruntime")


def test_skip_and_first_last_report_why_layers_stay_float() -> None:
    gm, _, result = quantized("resnet_basic", "onnxruntime", skip=("layers.1.*",), keep_first_last_fp=True)
    reasons = result.stats["float_layers"]
    assert "skip pattern 'layers.1.*'" in reasons["layers_1_conv1"]
    assert reasons["conv1"].startswith("keep_first_last_fp") and reasons["fc"].startswith("keep_first_last_fp")
    assert "layers_0_conv1" in result.stats["int8_layers"]
    assert isinstance(gm.get_submodule("fc"), torch.nn.Linear)
    assert any(d.node == "fc" and "module 'fc'" in d.message for d in result.diagnostics)
    assert result.stats["float_layer_modules"]["layers_1_conv1"] == "layers.1.conv1"


def test_skip_by_module_type() -> None:
    _, _, result = quantized("transformer_block", "onnxruntime", skip=("Linear",))
    assert len(result.stats["float_layers"]) == 4 and result.stats["int8_layers"] == ["matmul", "matmul_1"]


def test_unfolded_batchnorm_is_reported_as_blocking_fusion() -> None:
    model, ex = ZOO["resnet_basic"]()
    ctx = fxc.PassContext(ex, calibration=[ex], target="onnxruntime")
    result = QuantizeInt8().run(trace(model, ex), ctx)
    reasons = result.stats["float_layers"]
    assert "would block fusion" in reasons["conv1"] and "fold-batchnorm" in reasons["conv1"]
    assert result.stats["int8_layers"] == ["fc"]


@pytest.mark.parametrize("observer", ["minmax", "moving-average", "percentile", "mse", "entropy"])
def test_every_observer_calibrates_a_usable_graph(observer: str) -> None:
    model, _ = ZOO["inverted_residual"]()
    gm, ex, _ = quantized("inverted_residual", "onnxruntime", observer=observer)
    with torch.no_grad():
        assert cosine(gm(*ex), model(*ex)) > 0.98


def test_per_tensor_weights() -> None:
    gm, ex, _ = quantized("resnet_basic", "tensorrt", per_channel=False)
    scales = [getattr(gm, n.args[1].target) for n in gm.graph.nodes if n.target is dequantize]
    assert all(s.dim() == 0 for s in scales)
    model = export_onnx(gm, ex)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and not n.input[0].startswith("/")]
    assert dq and not any(a.name == "axis" for n in dq for a in n.attribute)


def test_user_model_and_calibration_are_not_mutated() -> None:
    model, ex = ZOO["resnet_basic"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [(ex[0].clone(), torch.tensor([1, 2]))]
    ctx = fxc.PassContext(ex, calibration=calib, target="onnxruntime")
    gm = FoldBatchNorm().run(trace(model, ex), ctx).graph
    QuantizeInt8().run(gm, ctx)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(calib[0][0], ex[0])


@pytest.mark.parametrize("name", ["resnet_basic", "inverted_residual", "transformer_block"])
def test_tensorrt_scheme_passes_the_tensorrt_check(name: str) -> None:
    from fxcompress.backends.tensorrt import derive_profiles
    from passes.onnx.check_tensorrt import check_tensorrt

    gm, ex, _ = quantized(name, "tensorrt")
    model = export_onnx(gm, ex)
    findings = check_tensorrt(model, profiles=derive_profiles(model, [tuple(t.shape) for t in ex]))
    assert findings == [], [str(f) for f in findings]


def _deconv_net() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.ConvTranspose2d(8, 8, 2, stride=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    return model, (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


def test_conv_transpose_per_channel_axis_1_for_tensorrt() -> None:
    model, ex = _deconv_net()
    result = run_pass(QuantizeInt8(), trace(model, ex), ex, calibration=[ex], target="tensorrt")
    gm = result.graph
    deconv = next(n for n in gm.graph.nodes if n.target is torch.conv_transpose2d)
    assert deconv.args[1].target is dequantize and deconv.args[1].args[2] == 1
    assert result.stats["float_layers"] == {}
    with torch.no_grad():
        assert cosine(gm(*ex), model(*ex)) > 0.999
    assert cosine(OrtRunner(export_onnx(gm, ex))(*ex), gm(*ex)) > 0.999


def test_conv_transpose_stays_float_for_onnxruntime_with_a_reason() -> None:
    model, ex = _deconv_net()
    ctx = fxc.PassContext(ex, calibration=[ex], target="onnxruntime")
    result = QuantizeInt8().run(trace(model, ex), ctx)
    assert "no INT8 ConvTranspose kernel" in result.stats["float_layers"]["_2"]
    assert result.stats["int8_layers"] == ["_0", "_4"]


def test_tensorrt_rtx_builds_a_markedly_smaller_int8_engine() -> None:
    require_tensorrt_rtx()
    from fxcompress.backends import tensorrt as trt

    convs = [torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(64, 128, 3, padding=1),
             torch.nn.ReLU(), torch.nn.Conv2d(128, 256, 3, padding=1), torch.nn.ReLU()]
    model = torch.nn.Sequential(*convs, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(256, 10)).eval()
    ex = (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)
    int8 = run_pass(QuantizeInt8(), trace(model, ex), ex, calibration=[ex], target="tensorrt-rtx").graph
    sizes = {}
    for precision, gm in (("fp32", trace(model, ex)), ("int8", int8)):
        proto = export_onnx(gm, ex)
        build = trt.build_engine(proto, "tensorrt-rtx", trt.BuildOptions.from_compile(
            precision=precision, example_inputs=ex, onnx_model=proto))
        sizes[precision] = len(build.engine)
    assert sizes["int8"] < 0.6 * sizes["fp32"], sizes


def test_compile_onnxruntime_pipeline_string_end_to_end() -> None:
    model, ex = ZOO["resnet_bottleneck"]()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(ex[0].shape, generator=gen), torch.tensor([0, 1])) for _ in range(3)]
    c = fxc.compile(model, ex, passes="fold-batchnorm,quantize-int8", calibration=calib, target="onnxruntime",
                    progress=False)
    row = c.report.find("quantize-int8")[0]
    assert row.stats["scheme"] == "onnxruntime" and row.stats["float_layers"] == {}
    assert len(row.stats["int8_layers"]) == 13
    with torch.no_grad():
        assert cosine(c(*ex), c.graph_module(*ex)) > 0.999
        assert cosine(c(*ex), model(*ex)) > 0.99


def test_compile_for_tensorrt_rtx_derives_the_tensorrt_scheme() -> None:
    require_tensorrt_rtx()
    model, ex = ZOO["resnet_basic"]()
    c = fxc.compile(model, ex, passes=[FoldBatchNorm(), QuantizeInt8()], calibration=[ex], target="tensorrt-rtx",
                    precision="int8", fallback="onnxruntime", progress=False)
    assert c.report.find("quantize-int8")[0].stats["scheme"] == "tensorrt"
    assert c.engine and c.engine_info["bytes"] == len(c.engine)  # built ahead of time on the CPU
    info = c.engine_info
    assert info["target"] == "tensorrt-rtx" and info["options"]["precision"] == "int8"
    assert info["strongly_typed"] and info["flags"] == []  # explicit quantization: no INT8 builder flag
    assert any("INT8 from the graph's Q/DQ nodes" in note for note in info["notes"]), info["notes"]
    inits = {i.name: i for i in c.onnx_model.graph.initializer}
    zps = [n.input[2] for n in c.onnx_model.graph.node if n.op_type == "QuantizeLinear"]
    consts = {n.output[0]: n for n in c.onnx_model.graph.node if n.op_type == "Constant"}
    for zp in zps:
        value = onnx.numpy_helper.to_array(consts[zp].attribute[0].t) if zp in consts else \
            onnx.numpy_helper.to_array(inits[zp])
        assert value.dtype.name == "int8" and not value.any()


@pytest.mark.parametrize("batches", [0, 4])
def test_calibration_is_split_across_ranks(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """As rank 1 of 2 under torchrun, quantize-int8 observes batches 1, 3, 5, ... (of the first
    ``calibration_batches``), not all of them (the observers are all-reduced afterwards)."""
    import passes.distributed as distributed
    import passes.quantize.ptq as ptq

    gm, ex, _ = prepared("resnet_basic")
    calib = [(torch.full_like(ex[0], float(i)) + torch.randn(ex[0].shape) * 0.01,) for i in range(8)]
    reduced: list[int] = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(ptq, "world_size", lambda: 2)
    monkeypatch.setattr(ptq, "all_reduce_observers", lambda obs: reduced.append(len(obs)))
    spec = QuantizeInt8(observer="minmax", calibration_batches=batches).resolve("onnxruntime")[1]
    quant = QuantizeInt8(observer="minmax", calibration_batches=batches)
    ctx = fxc.PassContext(ex, calibration=calib, target="onnxruntime")
    got = quant.calibrate(gm, ctx, quant.plan(gm, ctx, "onnxruntime"), spec)
    monkeypatch.undo()
    mine = [calib[i] for i in ((1, 3) if batches else (1, 3, 5, 7))]
    alone = QuantizeInt8(observer="minmax", calibration_batches=0)
    ctx_mine = fxc.PassContext(ex, calibration=mine, target="onnxruntime")
    want = alone.calibrate(gm, ctx_mine, alone.plan(gm, ctx_mine, "onnxruntime"), spec)
    assert reduced == [len(got)] and got == want
    everything = alone.calibrate(gm, ctx, alone.plan(gm, ctx, "onnxruntime"), spec)
    assert got["x"] != everything["x"]  # the input range differs: this rank did not see batch 0


def test_calibration_of_the_wrong_rank_names_argument_input_and_shapes() -> None:
    """The audit's case: a (4, 3, 8) batch for a model traced on (1, 3, 16, 16) is named before
    calibration runs, not reported as the convolution's RuntimeError."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    example = (torch.randn(1, 3, 16, 16),)
    with pytest.raises(PassError) as err:
        fxc.compile(model, example, "quantize-int8", calibration=[torch.randn(2, 3, 16, 16), torch.randn(4, 3, 8)],
                    target="fx", progress=False)
    msg = str(err.value)
    assert "calibration= batch 1, input 'input'" in msg
    assert "(3, 16, 16)" in msg and "(4, 3, 8)" in msg
    assert not isinstance(err.value.__cause__, RuntimeError)
    calibrated = fxc.compile(model, example, "quantize-int8", calibration=[torch.randn(3, 3, 16, 16)], target="fx",
                             progress=False)
    assert calibrated(*example).shape == (1, 4, 14, 14)
