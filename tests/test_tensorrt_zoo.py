"""Real TensorRT-RTX engines, built on this CPU, for every model of the test zoo: FP32, and INT8
with explicit Q/DQ (``fold-batchnorm,quantize-int8``, the tensorrt scheme, calibrated on a few
random batches). Each engine is saved in the artifact and its manifest records module, version
and build options. In CI (``CI=true``) a missing ``tensorrt_rtx`` fails these tests; elsewhere
they skip.

Engine size. A TensorRT-RTX engine is compiled just in time on the end user's GPU, so it embeds
the CUDA C source of every generated (fused pointwise / quantize) kernel, each with the same
~65-145 KB preamble. Measured on resnet_basic (TensorRT-RTX 1.7.1): the FP32 engine (343 KB) is
91% kernel source (4 generated kernels) plus 30 KB of weights and metadata; the INT8 engine
(1.00 MB) is 98% kernel source (14 generated kernels: the activation quantizers add fused
kernels) plus 18 KB. Weights are already stored as INT8 initializers (quantize-int8 writes them,
asserted below), engine size does not depend on profiling verbosity, optimization level or
compute capability, and the engine keeps no float copy of them. So an INT8 engine is
smaller than its FP32 engine only when the weights outweigh that fixed per-kernel source:
measured on the zoo's ResNet widened (FP32 weight bytes per quantized layer -> INT8/FP32 engine
size): 12 KB -> 2.53, 45 KB -> 1.70, 176 KB -> 0.86, 394 KB -> 0.56, 699 KB -> 0.43. The zoo
models hold at most 31 KB of weights in all, so the size relation is asserted only above
``MIN_WEIGHT_BYTES_PER_LAYER``, on a widened ResNet.

``verify=False``: pass verification is tested elsewhere; here it would only double the time.
Measured builds (TensorRT-RTX 1.7.1, this 2-core CPU): 0.1-0.35 s per engine; the test's time is
tracing, calibration and export.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from zoo import ZOO, ZOO_NAMES, BasicBlock, TinyResNet, _build

import fxcompress as fxc
from fxcompress.artifact import read_manifest
from fxcompress.backends.tensorrt import constant_tensors, gpu_available, import_trt, module_available
from fxcompress.errors import BackendUnavailable
from fxcompress.onnx_graph import fx_node_of

#: above this average of FP32 weight bytes per quantized layer, INT8 engines are markedly smaller
MIN_WEIGHT_BYTES_PER_LAYER = 256 * 1024
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_PASS_THROUGH = ("Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten")


@pytest.fixture(scope="module")
def rtx():
    """The ``tensorrt_rtx`` module: a failure in CI when it is missing, a skip elsewhere."""
    if not module_available("tensorrt-rtx"):
        reason = ("tensorrt_rtx is not importable: install the test extra (pip install tensorrt-rtx-cu12) "
                  "to build real TensorRT-RTX engines on a CPU")
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true: {reason}; CI must build the zoo's engines", pytrace=False)
        pytest.skip(reason)
    return import_trt("tensorrt-rtx")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core CI machine: one torch thread is ~3x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _calibration(inputs: tuple[torch.Tensor, ...], batches: int = 3) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(0)
    return [tuple(torch.randn(t.shape, generator=gen) for t in inputs) for _ in range(batches)]


def _compile_both(model, inputs):
    """(fp32, int8) artifacts for TensorRT-RTX."""
    fp32 = fxc.compile(model, inputs, target="tensorrt-rtx", progress=False, verify=False)
    int8 = fxc.compile(model, inputs, "fold-batchnorm,quantize-int8", calibration=_calibration(inputs),
                       target="tensorrt-rtx", precision="int8", progress=False, verify=False)
    return fp32, int8


def _root(model: onnx.ModelProto, name: str) -> tuple[str, onnx.NodeProto | None]:
    """The tensor ``name`` comes from, looking through layout-only nodes (a weight's Transpose),
    and the node producing it (None for a graph input or initializer)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        name = node.input[0]
        node = producers.get(name)
    return name, node


def weight_storage(model: onnx.ModelProto) -> dict[str, list[str]]:
    """FX node -> how each of its Conv/Gemm/MatMul weights (input 1) is stored: ``"int8"`` (an INT8
    constant read by DequantizeLinear), ``"qdq"`` (a run-time quantized tensor: activation x
    activation MatMul), ``"float"`` (a float constant), ``"float-qdq"`` (a float constant
    quantized at run time) or ``"activation"``."""
    constants = constant_tensors(model)
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        name, src = _root(model, node.input[1])
        if src is not None and src.op_type == "DequantizeLinear":
            q, q_src = _root(model, src.input[0])
            if q in constants:
                kind = "int8" if constants[q].data_type == onnx.TensorProto.INT8 else "other"
            elif q_src is not None and q_src.op_type == "QuantizeLinear":
                kind = "float-qdq" if _root(model, q_src.input[0])[0] in constants else "qdq"
            else:
                kind = "other"
        else:
            kind = "float" if name in constants else "activation"
        out.setdefault(fx_node_of(node) or node.name, []).append(kind)
    return out


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _check_engine_record(compiled, rtx, tmp_path, precision: str) -> dict:
    out = compiled.save(tmp_path / precision)
    manifest = read_manifest(out)
    engine = (out / "model.engine").read_bytes()
    info = manifest["engine"]
    assert engine == compiled.engine and len(engine) > 100_000
    assert info["module"] == "tensorrt_rtx" and info["version"] == rtx.__version__
    assert info["target"] == "tensorrt-rtx" and info["bytes"] == len(engine)
    assert info["options"]["precision"] == precision and info["strongly_typed"] is True and info["flags"] == []
    assert info["options"]["profiles"] == {  # dynamic batch: derived from the example inputs
        spec["name"]: [[1, *spec["shape"][1:]], spec["shape"], [32, *spec["shape"][1:]]]
        for spec in compiled.inputs}
    assert info["build_seconds"] > 0 and info["num_layers"] > 0
    assert "model.engine" in manifest["files"] and manifest["backend"] == "tensorrt-rtx"
    return info


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_builds_fp32_and_int8_engines(name, rtx, tmp_path):
    model, inputs = ZOO[name]()
    fp32, int8 = _compile_both(model, inputs)
    info32 = _check_engine_record(fp32, rtx, tmp_path, "fp32")
    info8 = _check_engine_record(int8, rtx, tmp_path, "int8")
    assert any("INT8 from the graph's Q/DQ" in n for n in info8["notes"])
    assert info8["num_layers"] > info32["num_layers"]  # the Q/DQ layers are in the network

    row = int8.report.find("quantize-int8")[0].stats
    assert row["scheme"] == "tensorrt" and row["int8_layers"]
    storage = weight_storage(int8.onnx_model)
    assert all(k != "float-qdq" for kinds in storage.values() for k in kinds), storage
    quantized = [k for kinds in storage.values() for k in kinds if k in ("int8", "qdq")]
    assert len(quantized) == len(row["int8_layers"]) and "int8" in quantized, (storage, row["int8_layers"])
    opaque = set(int8.report.meta["opaque_modules"])
    float_layers = {fx for fx, kinds in storage.items() if "float" in kinds}
    assert float_layers <= opaque | set(row["float_layers"]), float_layers  # only what the pass left float
    assert _weight_bytes(int8.onnx_model) < _weight_bytes(fp32.onnx_model)

    if not gpu_available():
        with pytest.raises(BackendUnavailable, match="needs an NVIDIA GPU"):
            int8(*inputs)


def test_int8_engine_is_markedly_smaller_above_the_weight_threshold(rtx):
    """A ResNet of the zoo's shape, widened until its FP32 weights average ~394 KB per quantized
    layer (> ``MIN_WEIGHT_BYTES_PER_LAYER``): the INT8 engine is well under the FP32 one (measured
    0.56x), since the weights now outweigh the JIT kernel source the Q/DQ add."""
    model, inputs = _build(lambda: TinyResNet([BasicBlock(96, 96), BasicBlock(96, 192, stride=2)], 96, 192),
                           (2, 3, 16, 16), seed=1)
    fp32, int8 = _compile_both(model, inputs)
    layers = len(int8.report.find("quantize-int8")[0].stats["int8_layers"])
    per_layer = _weight_bytes(fp32.onnx_model) / layers
    assert per_layer > MIN_WEIGHT_BYTES_PER_LAYER, per_layer
    assert len(int8.engine) < 0.7 * len(fp32.engine), (len(int8.engine), len(fp32.engine))
    assert all(set(k) == {"int8"} for k in weight_storage(int8.onnx_model).values())
    assert np.isclose(_weight_bytes(int8.onnx_model), _weight_bytes(fp32.onnx_model) / 4, rtol=0.05)
