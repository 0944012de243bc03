"""Per-layer fidelity across stages (``fxcompress.compare`` and ``fxcompress compare``): a corrupted
ONNX weight is found at its layer, clean graphs have no divergent layer, FX nodes map to the
original's modules (also through BatchNorm folding), and TensorRT says why it did not run."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from zoo import ZOO

import fxcompress as fxc
from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.tensorrt import gpu_available
from fxcompress.compare import Comparison, Tolerance, compare, load_inputs
from fxcompress.compare.backends import Backends
from fxcompress.errors import InputError
from fxcompress.onnx_graph import fx_node_of
from fxcompress.trace import trace

TESTS = Path(__file__).resolve().parent
CORRUPT_NODE = "layers_0_conv2"


class Case(NamedTuple):
    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    gm: torch.fx.GraphModule
    onnx_model: onnx.ModelProto


def corrupt_conv(model: onnx.ModelProto, fx_node: str, scale: float = 1.5) -> onnx.ModelProto:
    """A copy of ``model`` with output channel 3 of the Conv exported from ``fx_node`` scaled."""
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    conv = next(n for n in bad.graph.node if n.op_type == "Conv" and fx_node_of(n) == fx_node)
    init = next(i for i in bad.graph.initializer if i.name == conv.input[1])
    weight = numpy_helper.to_array(init).copy()
    weight[3] *= scale
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    return bad


@pytest.fixture(scope="module")
def case() -> Case:
    model, inputs = ZOO["resnet_basic"]()
    gm = trace(model, inputs)
    return Case(model, inputs, gm, export_onnx(gm, inputs))


@pytest.fixture(scope="module")
def clean(case: Case) -> Comparison:
    return compare(case.model, case.gm, case.onnx_model, case.inputs)


@pytest.fixture(scope="module")
def corrupted(case: Case) -> Comparison:
    return compare(case.model, case.gm, corrupt_conv(case.onnx_model, CORRUPT_NODE), case.inputs,
                   target="tensorrt-rtx")


# ----------------------------------------------------------------------------- ONNX Runtime vs FX


def test_corrupted_weight_is_the_first_divergent_layer(corrupted: Comparison) -> None:
    first = corrupted.first_divergent("ort")
    assert first is not None and first.node == CORRUPT_NODE and first.kind == "Conv2d"
    m = first.metrics["ort"]
    assert m.drift and m.max_abs > corrupted.tolerance.abs_limit(m.ref_max)
    assert m.against == "/layers_0_conv2/conv2/Conv_output_0"
    before = [r for r in corrupted.rows if r.index < first.index]
    assert [r.node for r in before] == ["conv1", "bn1", "relu", "layers_0_conv1", "layers_0_bn1",
                                        "layers_0_relu"]
    for row in before:
        assert not row.metrics["ort"].drift and row.metrics["ort"].max_abs < 1e-5, row
    assert corrupted.rows[-1].node == "output" and corrupted.rows[-1].metrics["ort"].drift
    # the weights themselves are flagged, and the passes did nothing wrong
    assert any("layers.0.conv2.weight" in n for n in corrupted.notes)
    assert corrupted.first_divergent("fx") is None


def test_clean_graph_has_no_divergent_layer(clean: Comparison, case: Case) -> None:
    assert clean.stages["fx"] == clean.stages["ort"] == "ran"
    assert clean.first_divergent("ort") is None and clean.first_divergent("fx") is None
    layers = [n.name for n in case.gm.graph.nodes if n.op not in ("placeholder", "output")]
    assert [r.node for r in clean.rows] == layers + ["output"]
    assert all("ort" in r.metrics and r.metrics["ort"].max_abs < 1e-5 and r.metrics["ort"].cosine > 0.999999
               for r in clean.rows)
    assert clean.notes == []
    data = json.loads(json.dumps(clean.to_dict()))
    assert data["first_divergent"] == {"fx": None, "ort": None, "trt": None}
    assert len(data["rows"]) == len(clean.rows)


def test_table_marks_the_first_divergent_row(corrupted: Comparison) -> None:
    text = corrupted.render()
    line = next(ln for ln in text.splitlines() if f" {CORRUPT_NODE} " in ln)
    assert "<< first" in line
    assert sum("<< first" in ln for ln in text.splitlines()) == 1
    assert "FX vs original" in text and "ORT vs FX" in text
    summary = "\n".join(corrupted.summary())
    assert f"ORT vs FX: first divergent layer: {CORRUPT_NODE} (Conv2d)" in summary


# ----------------------------------------------------------------------------- FX vs the original model


def test_fx_call_modules_map_to_module_paths(clean: Comparison, case: Case) -> None:
    rows = {r.node: r for r in clean.rows}
    for node in case.gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = rows[node.name].metrics["fx"]
        assert m.against.startswith(f"module {node.target}") and m.max_abs == 0.0, (node.name, m)
    # a module called twice maps call by call
    assert rows["layers_0_relu"].metrics["fx"].against == "module layers.0.relu call #1"
    assert rows["layers_0_relu_1"].metrics["fx"].against == "module layers.0.relu call #2"


def test_fx_divergence_points_at_the_changed_module(case: Case) -> None:
    gm = copy.deepcopy(case.gm)
    with torch.no_grad():
        gm.get_submodule("layers.1.conv1").weight.mul_(1.2)
    result = compare(case.model, gm, None, case.inputs)
    first = result.first_divergent("fx")
    assert first is not None and first.node == "layers_1_conv1"
    assert all(r.metrics["fx"].max_abs == 0.0 for r in result.rows if r.index < first.index)
    assert result.stages["ort"].startswith("omitted")
    original_weight = case.model.layers[1].conv1.weight
    assert not torch.equal(original_weight, gm.get_submodule("layers.1.conv1").weight)


def test_folded_batchnorm_maps_to_the_absorbed_module() -> None:
    model, inputs = ZOO["resnet_basic"]()
    compiled = fxc.compile(model, inputs, "fold-batchnorm", target="onnxruntime", progress=False)
    result = compare(model, compiled.graph_module, compiled.onnx_model, inputs)
    rows = {r.node: r for r in result.rows}
    assert "layers_0_bn1" not in rows
    assert rows["layers_0_conv1"].metrics["fx"].against == "module layers.0.bn1 (layers_0_bn1 absorbed)"
    assert rows["add"].metrics["fx"].against == "original trace %add"
    assert result.first_divergent("fx") is None and result.first_divergent("ort") is None
    assert all("fx" in r.metrics for r in result.rows)


def test_a_renamed_replacement_is_not_taken_for_an_absorbed_node(case: Case) -> None:
    """A node replaced by one of another name (as quantization does) is not "absorbed": the node
    before it keeps its own module as counterpart."""
    gm = copy.deepcopy(case.gm)
    bn2 = next(n for n in gm.graph.nodes if n.name == "layers_0_bn2")
    with gm.graph.inserting_after(bn2):
        renamed = gm.graph.call_module("layers.0.bn2", bn2.args)
    bn2.replace_all_uses_with(renamed)
    gm.graph.erase_node(bn2)
    gm.recompile()
    result = compare(case.model, gm, None, case.inputs)
    rows = {r.node: r for r in result.rows}
    assert rows["layers_0_conv2"].metrics["fx"].against == "module layers.0.conv2"
    assert rows[renamed.name].metrics["fx"].against == "module layers.0.bn2"
    assert result.first_divergent("fx") is None
    assert all(r.metrics["fx"].max_abs == 0.0 for r in result.rows if "fx" in r.metrics)


def test_int8_graph_within_the_documented_int8_tolerance() -> None:
    """Q/DQ outputs get one quantization step of slack (their scale, read from the graph), and an
    INT8 graph stays within ``abs=5e-2`` of its FX graph in ONNX Runtime."""
    model, inputs = ZOO["resnet_basic"]()
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(4)]
    compiled = fxc.compile(model, inputs, "fold-batchnorm,quantize-int8", calibration=calibration,
                           progress=False)
    dq = [n for n in compiled.onnx_model.graph.node if n.op_type == "DequantizeLinear"]
    steps = Backends.of(compiled.onnx_model).steps
    assert len(dq) >= 8 and all(steps.get(n.output[0], 0.0) > 0 for n in dq)
    result = compare(model, compiled.graph_module, compiled.onnx_model, inputs,
                     tolerance=Tolerance(max_abs_rel=5e-2))
    assert result.first_divergent("ort") is None
    assert min(r.metrics["ort"].cosine for r in result.rows if "ort" in r.metrics) > 0.9999
    # quantization itself moves the FX graph away from the float original, a little
    out = result.rows[-1].metrics["fx"]
    assert out.max_abs > 1e-3 and out.cosine > 0.99


# ----------------------------------------------------------------------------- TensorRT, shapes, no FX graph


@pytest.mark.skipif(gpu_available(), reason="a GPU is present: TensorRT runs")
def test_tensorrt_column_says_why_it_did_not_run(corrupted: Comparison, clean: Comparison) -> None:
    assert corrupted.stages["trt"].startswith("not run: ") and "GPU" in corrupted.stages["trt"]
    assert clean.stages["trt"].startswith("not run: ") and "target" in clean.stages["trt"]
    assert corrupted.first_divergent("trt") is None
    assert not any("trt" in r.metrics for r in corrupted.rows)
    header = next(ln for ln in corrupted.render().splitlines() if "not run" in ln)
    assert "running a tensorrt-rtx engine needs an NVIDIA GPU" in header


def _trt_target() -> str | None:
    from fxcompress.backends.tensorrt import module_available

    return next((t for t in ("tensorrt-rtx", "tensorrt") if module_available(t)), None)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs an NVIDIA GPU: TensorRT engines run only on a GPU "
                    "(torch.cuda.is_available() is False)")
@pytest.mark.skipif(_trt_target() is None, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_tensorrt_per_layer_agrees_with_onnxruntime_on_a_corrupted_graph(case: Case) -> None:
    """The per-layer TensorRT path (``run_trt``): an engine of the exposed graph gives every
    layer's value; with one corrupted weight ORT diverges from FX at that layer, and TensorRT
    (same corrupted graph) agrees with ORT on every layer and on the engine's output."""
    from fxcompress.backends.tensorrt import BuildOptions, build_engine

    target = _trt_target()
    bad = corrupt_conv(case.onnx_model, CORRUPT_NODE)
    engine = build_engine(bad, target, BuildOptions.from_compile(example_inputs=case.inputs,
                                                                onnx_model=bad)).engine
    result = compare(case.model, case.gm, bad, case.inputs, engine=engine, target=target)
    assert result.stages["trt"] == "ran"
    first = result.first_divergent("ort")
    assert first is not None and first.node == CORRUPT_NODE
    assert result.first_divergent("trt") is None
    with_trt = [r for r in result.rows if "trt" in r.metrics]
    assert {r.node for r in with_trt} == {r.node for r in result.rows if "ort" in r.metrics}
    assert all(r.metrics["trt"].cosine > 0.9999 for r in with_trt)
    assert with_trt[-1].node == "output"


def test_per_layer_tensorrt_rtx_engine_builds_without_a_gpu() -> None:
    """The build half of the TRT column runs here: every FX layer's ONNX tensor of an INT8 Q/DQ
    graph is marked as an engine output and TensorRT-RTX builds it (strongly typed, INT8 notes)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu12)")
    from fxcompress.compare import layer_engine

    model, inputs = ZOO["resnet_basic"]()
    compiled = fxc.compile(model, inputs, "fold-batchnorm,quantize-int8", calibration=[inputs],
                           target="tensorrt-rtx", progress=False, verify=False)
    ops = {n.op_type for n in compiled.onnx_model.graph.node}
    names = [t for ts in Backends.of(compiled.onnx_model).layers.values() for t in ts]
    assert "DequantizeLinear" in ops and len(names) > 20
    build = layer_engine(compiled.onnx_model, names, inputs, "tensorrt-rtx", precision="int8")
    assert build.size > 0 and build.strongly_typed
    assert any("INT8 from the graph's Q/DQ" in n for n in build.notes)
    assert build.options.profiles is not None and set(build.options.profiles) == {"x"}


class _Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.permute(*self.dims))


def test_tensors_of_different_layout_are_skipped_with_a_note() -> None:
    x = (torch.randn(2, 3, 4, 5),)
    gm = trace(_Permute((0, 2, 3, 1)), x)
    other = export_onnx(trace(_Permute((0, 3, 1, 2)), x), x)
    result = compare(None, gm, other, x)
    assert result.stages["fx"].startswith("omitted")
    for row in result.rows:
        assert "ort" not in row.metrics
        assert row.notes["ort"].startswith("shapes differ: 2x4x5x3 vs 2x5x3x4"), row.notes
    assert result.first_divergent("ort") is None
    assert "skipped: shape" in result.render()


def test_onnx_only_lists_layers_without_fx_columns(case: Case) -> None:
    result = compare(None, None, case.onnx_model, case.inputs)
    assert result.stages["fx"].startswith("omitted") and result.stages["ort"].startswith("omitted")
    assert [r.node for r in result.rows][:3] == ["conv1", "bn1", "relu"]
    assert result.rows[0].kind == "Conv" and result.rows[0].shape == (2, 8, 16, 16)
    assert result.rows[-1].node == "output"
    text = result.render()
    header = text.split("┡")[0]
    assert "FX vs original" not in header and "ORT vs FX" not in header and "TRT vs ORT" in header
    assert "FX vs original: omitted: no FX graph given" in result.summary()


# ----------------------------------------------------------------------------- tolerance and inputs


def test_tolerance_parse_and_rules() -> None:
    assert Tolerance.parse("cosine=0.99, abs=1e-2") == Tolerance(min_cosine=0.99, max_abs_rel=1e-2)
    assert Tolerance.parse("0.05").max_abs_rel == 0.05
    with pytest.raises(InputError, match="unknown key 'cos'"):
        Tolerance.parse("cos=0.9")
    with pytest.raises(InputError, match="not a number"):
        Tolerance.parse("abs=big")
    tol = Tolerance()
    assert tol.abs_limit(0.5) == pytest.approx(1e-3) and tol.abs_limit(50.0) == pytest.approx(5e-2)
    assert tol.drifts(2e-3, 1.0, 1.0) and not tol.drifts(2e-3, 1.0, 10.0)
    assert tol.drifts(1e-4, 0.99, 1.0)
    assert not tol.drifts(1e-7, 0.0, 1e-6)  # near-zero tensors: the cosine means nothing
    assert not tol.drifts(0.02, 1.0, 2.0, step=0.02) and tol.drifts(0.03, 1.0, 2.0, step=0.02)
    assert Tolerance(quant_steps=0).drifts(0.02, 1.0, 2.0, step=0.02)
    assert tol.drifts(float("nan"), float("nan"), 1.0)


def test_load_inputs_npy_and_npz(tmp_path: Path) -> None:
    one = [{"name": "x", "dtype": "float32"}]
    two = [{"name": "a", "dtype": "float32"}, {"name": "b", "dtype": "int64"}]
    np.save(tmp_path / "x.npy", np.ones((2, 3)))
    (x,) = load_inputs(tmp_path / "x.npy", one)
    assert x.dtype == torch.float32 and x.shape == (2, 3)
    np.savez(tmp_path / "ab.npz", b=np.arange(4), a=np.zeros((1, 2)))
    a, b = load_inputs(tmp_path / "ab.npz", two)
    assert a.shape == (1, 2) and b.dtype == torch.int64 and b.tolist() == [0, 1, 2, 3]
    with pytest.raises(InputError, match="holds one array but the model takes 2 inputs"):
        load_inputs(tmp_path / "x.npy", two)
    np.savez(tmp_path / "a.npz", a=np.zeros(1))
    with pytest.raises(InputError, match=r"lacks input\(s\) \['b'\]"):
        load_inputs(tmp_path / "a.npz", two)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(InputError, match="not a .npy/.npz numpy file"):
        load_inputs(tmp_path / "junk.npy", one)
    with pytest.raises(InputError, match="does not exist"):
        load_inputs(tmp_path / "none.npy", one)


# ----------------------------------------------------------------------------- the command line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fxcompress.cli", *args], cwd=TESTS, capture_output=True,
                          text=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved artifact of resnet_basic (fold-batchnorm) whose ONNX has one corrupted Conv weight;
    its source factory is recorded as the CLI records it."""
    d = tmp_path_factory.mktemp("compare")
    model, inputs = ZOO["resnet_basic"]()
    compiled = fxc.compile(model, inputs, "fold-batchnorm", target="onnxruntime", progress=False)
    compiled.onnx_model = corrupt_conv(compiled.onnx_model, CORRUPT_NODE)
    compiled.source = {"factory": "zoo:resnet_basic", "input_shape": None}
    compiled.save(d / "out")
    np.save(d / "x.npy", inputs[0].numpy())
    return d


def test_cli_names_the_first_divergent_layer(artifact: Path) -> None:
    proc = run_cli("compare", str(artifact / "out"), "--inputs", str(artifact / "x.npy"), "--original",
                   "zoo:resnet_basic", "--tolerance", "cosine=0.999,abs=1e-3", "--json", str(artifact / "cmp.json"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "per-layer error across stages" in out and "FX vs original" in out and "ORT vs FX" in out
    row = next(ln for ln in out.splitlines() if f" {CORRUPT_NODE} " in ln)
    assert "Conv2d" in row and "<< first" in row
    assert f"ORT vs FX: first divergent layer: {CORRUPT_NODE} (Conv2d)" in out
    assert "FX vs original: no divergent layer" in out
    assert "TRT vs ORT: not run:" in out
    data = json.loads((artifact / "cmp.json").read_text())
    assert data["first_divergent"]["ort"] == CORRUPT_NODE and data["first_divergent"]["fx"] is None
    assert "layers_0_bn1" not in [r["node"] for r in data["rows"]]


def test_cli_missing_inputs_file_is_one_line(artifact: Path) -> None:
    proc = run_cli("compare", str(artifact / "out"), "--inputs", str(artifact / "missing.npy"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --inputs: inputs file ") and "missing.npy does not exist" in lines[0]


def test_load_inputs_checks_the_recorded_shapes(tmp_path: Path) -> None:
    """Rank and per-sample shape must match the manifest's ``shape``; the batch size may differ."""
    spec = [{"name": "x", "dtype": "float32", "shape": [1, 3, 16, 16]}]
    np.save(tmp_path / "ok.npy", np.zeros((4, 3, 16, 16)))
    (x,) = load_inputs(tmp_path / "ok.npy", spec)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    np.save(tmp_path / "rank.npy", np.zeros((3, 16, 16)))
    with pytest.raises(InputError, match=r"input 'x' has shape \(3, 16, 16\).*\(1, 3, 16, 16\).*\(3, 16, 16\)"):
        load_inputs(tmp_path / "rank.npy", spec)
    np.save(tmp_path / "hw.npy", np.zeros((1, 3, 8, 8)))
    with pytest.raises(InputError, match=r"input 'x' has shape \(1, 3, 8, 8\)"):
        load_inputs(tmp_path / "hw.npy", spec)
    two = [{"name": "a", "dtype": "float32", "shape": [2, 5]}, {"name": "b", "dtype": "int64", "shape": [2]}]
    np.savez(tmp_path / "ab.npz", a=np.zeros((2, 5)), b=np.zeros((2, 1)))
    with pytest.raises(InputError, match=r"input 'b' has shape \(2, 1\).*compiled for \(2,\)"):
        load_inputs(tmp_path / "ab.npz", two)


def test_cli_wrongly_shaped_inputs_is_a_one_line_input_error(artifact: Path) -> None:
    np.save(artifact / "bad.npy", np.zeros((1, 3, 8), dtype=np.float32))
    proc = run_cli("compare", str(artifact / "out"), "--inputs", str(artifact / "bad.npy"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: --inputs: ") and "has shape (1, 3, 8)" in lines[0]
    assert "RuntimeError" not in proc.stderr
