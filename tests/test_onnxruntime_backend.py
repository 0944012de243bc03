"""OrtRunner: sessions from proto/bytes/path, providers, options, and input validation errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner, available_providers
from fxcompress.errors import BackendUnavailable, InputError

RTOL, ATOL = 1e-4, 1e-5


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) + bias


class _TwoOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x.sum(1)


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    m = _Net().eval()
    model = export_onnx(fx.symbolic_trace(m), (torch.randn(2, 3, 6, 6), torch.randn(2, 5)))
    return m, model


@pytest.fixture(scope="module")
def runner(net) -> OrtRunner:
    return OrtRunner(net[1], threads=1)


def test_runs_from_proto_bytes_and_path(net, tmp_path) -> None:
    m, model = net
    x, b = torch.randn(3, 3, 6, 6), torch.randn(3, 5)
    with torch.no_grad():
        want = m(x, b)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for source in (model, model.SerializeToString(), path, str(path)):
        out = OrtRunner(source)(x, b)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)
    with pytest.raises(InputError, match="ONNX model file not found"):
        OrtRunner(tmp_path / "missing.onnx")


def test_specs_providers_and_options(runner, net, tmp_path) -> None:
    assert runner.providers == ["CPUExecutionProvider"]
    assert [str(s) for s in runner.input_specs] == ["x: float32[batch, 3, 6, 6]", "bias: float32[batch, 5]"]
    assert [s.name for s in runner.output_specs] == ["output"]
    assert runner.output_specs[0].shape == ("batch", 5)

    opt_path = tmp_path / "opt" / "optimized.onnx"
    plain = OrtRunner(net[1], optimization="disable")
    optimized = OrtRunner(net[1], optimization="all", optimized_model_path=opt_path)
    x, b = torch.randn(2, 3, 6, 6), torch.randn(2, 5)
    with torch.no_grad():
        want = net[0](x, b)
    torch.testing.assert_close(plain(x, b), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(optimized(x, b), want, rtol=RTOL, atol=ATOL)
    assert onnx.load(str(opt_path)).graph.node  # ORT wrote the graph it runs
    with pytest.raises(ValueError, match="optimization must be one of"):
        OrtRunner(net[1], optimization="max")
    with pytest.raises(ValueError, match="threads"):
        OrtRunner(net[1], threads=-2)


def test_unavailable_provider_names_the_available_ones(net) -> None:
    missing = "TensorrtExecutionProvider"
    if missing in available_providers():  # pragma: no cover - a GPU build
        pytest.skip("this onnxruntime build has the TensorRT provider")
    with pytest.raises(BackendUnavailable) as info:
        OrtRunner(net[1], providers=[missing, "CPUExecutionProvider"])
    assert missing in str(info.value) and "CPUExecutionProvider" in str(info.value)
    ok = OrtRunner(net[1], providers=[("CPUExecutionProvider", {})])
    assert ok.providers == ["CPUExecutionProvider"]


def test_numpy_named_and_non_contiguous_inputs(runner, net) -> None:
    m, _ = net
    x = torch.randn(2, 6, 6, 3).permute(0, 3, 1, 2)  # non-contiguous view
    b = torch.randn(2, 5, requires_grad=True)
    with torch.no_grad():
        want = m(x, b)
    torch.testing.assert_close(runner(x, b), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(runner(x.numpy(), b.detach().numpy()), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(runner(bias=b, x=x), want, rtol=RTOL, atol=ATOL)
    arrays = runner.run_numpy(x, b)
    assert isinstance(arrays[0], np.ndarray) and arrays[0].dtype == np.float32
    np.testing.assert_allclose(arrays[0], want.numpy(), rtol=RTOL, atol=ATOL)


def test_several_outputs_come_back_as_a_tuple() -> None:
    x = torch.randn(2, 4)
    out = OrtRunner(export_onnx(fx.symbolic_trace(_TwoOut()), (x,)))(x)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], x * 2)
    torch.testing.assert_close(out[1], x.sum(1))


@pytest.mark.parametrize(("args", "pattern"), [
    ((torch.randn(2, 3, 6, 6),), r"takes 2 input\(s\) \(x: float32\[batch, 3, 6, 6\], bias.*called with 1"),
    ((torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 5)),
     r"input #0 'x': expected dtype float32, got float64; convert it first, e\.g\. x\.to\(torch\.float32\)"),
    ((torch.randn(3, 6, 6), torch.randn(2, 5)), r"input #0 'x': expected rank 4 .* got rank 3"),
    ((torch.randn(2, 3, 7, 6), torch.randn(2, 5)), r"input #0 'x': dimension 2 must be 6"),
    ((torch.randn(2, 3, 6, 6), torch.randn(4, 5)), r"input #1 'bias': dimension 0 \('batch'\) is 4 but input #0 'x'"),
    ((torch.randn(2, 3, 6, 6), [[0.0] * 5] * 2), r"input #1 'bias': expected a torch\.Tensor or numpy array, got list"),
])
def test_input_errors_name_the_input(runner, args, pattern) -> None:
    with pytest.raises(InputError, match=pattern):
        runner(*args)


def test_named_input_errors(runner) -> None:
    with pytest.raises(InputError, match=r"unknown: \['z'\], missing: \['bias'\]"):
        runner(x=torch.randn(2, 3, 6, 6), z=torch.randn(2, 5))
    with pytest.raises(InputError, match="either positionally or by name"):
        runner(torch.randn(2, 3, 6, 6), bias=torch.randn(2, 5))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_any_batch_size_matches_eager(net, runner, batch, seed) -> None:
    m, _ = net
    gen = torch.Generator().manual_seed(seed)
    x, b = torch.randn(batch, 3, 6, 6, generator=gen), torch.randn(batch, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(runner(x, b), m(x, b), rtol=RTOL, atol=ATOL)


def test_a_meta_tensor_is_refused_naming_the_input(runner) -> None:
    with pytest.raises(InputError, match=r"input #0 'x' is a meta tensor \(device 'meta': a shape without data\), "
                                         r"which cannot run; pass a real tensor"):
        runner(torch.empty(2, 3, 6, 6, device="meta"), torch.randn(2, 5))
    with pytest.raises(InputError, match=r"input #1 'bias' is a meta tensor"):
        runner(torch.randn(2, 3, 6, 6), torch.empty(2, 5, device="meta"))


@pytest.mark.parametrize(("device", "providers", "pattern"), [
    ("cuda:0", ["CPUExecutionProvider"],
     (r"input #0 'x' is on device 'cuda:0' but this ONNX Runtime session runs on CPUExecutionProvider; move it to "
      r"the CPU with x\.cpu\(\), or create the runner with providers=\['CUDAExecutionProvider'\]")),
    ("mps", ["CPUExecutionProvider"], r"input #0 'x' is on device 'mps', which ONNX Runtime cannot read; move it"),
    ("xpu:1", ["CUDAExecutionProvider", "CPUExecutionProvider"], r"device 'xpu:1', which ONNX Runtime cannot read"),
])
def test_unsupported_devices_are_refused(device: str, providers: list[str], pattern: str) -> None:
    from fxcompress.backends.onnxruntime import check_device

    with pytest.raises(InputError, match=pattern):
        check_device("input #0 'x'", torch.device(device), providers)


@pytest.mark.parametrize(("device", "providers"), [
    ("cpu", ["CPUExecutionProvider"]),
    ("cuda:0", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cuda:1", ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
])
def test_cpu_and_cuda_with_a_gpu_provider_are_accepted(device: str, providers: list[str]) -> None:
    from fxcompress.backends.onnxruntime import check_device

    assert check_device("input #0 'x'", torch.device(device), providers) is None
