"""ONNX Runtime backend: a session runner that takes and returns torch tensors, and one-shot
runs (``run_onnx``, ``run_model``) of a graph as written, for verification.

``OrtRunner`` wraps an ``onnxruntime.InferenceSession`` with graph optimizations on (they fuse
Conv+BN, Q/DQ into integer kernels, ...), the CPU provider by default and any installed provider
on request. Inputs are checked against the session's declared inputs (count, dtype, rank, static
dimensions, and one size per named dynamic dimension such as ``batch``) before ONNX Runtime sees
them, so a mistake gives an ``InputError`` naming the input instead of an ORT stack trace; so
does a tensor on a device the session cannot take (meta, or CUDA without a GPU provider).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from ..errors import BackendUnavailable, InputError
from ..onnx_graph import ModelLike, load_model, needs_external_data, to_numpy, with_external_data

_OPT_LEVELS = ("disable", "basic", "extended", "all")

_ORT_TO_NUMPY: dict[str, Any] = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16, "tensor(int32)": np.int32, "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class TensorSpec:
    """A session input or output: name, numpy dtype (None if not a plain tensor type) and shape,
    where a dimension is an int (static), a str (named dynamic) or None (unknown)."""

    name: str
    dtype: Any
    shape: tuple[int | str | None, ...]
    type_str: str

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        dt = np.dtype(self.dtype).name if self.dtype is not None else self.type_str
        return f"{self.name}: {dt}[{dims}]"


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _resolve_providers(providers: Sequence[Any] | None) -> list[Any]:
    available = available_providers()
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    resolved: list[Any] = []
    for p in providers:
        name = p[0] if isinstance(p, tuple) else p
        if not isinstance(name, str):
            raise InputError(f"an execution provider is a name or (name, options), got {p!r}")
        if name not in available:
            raise BackendUnavailable(
                f"ONNX Runtime execution provider {name!r} is not available in this onnxruntime "
                f"build; available: {', '.join(available)}. Install the onnxruntime package that "
                f"ships it (e.g. onnxruntime-gpu for CUDAExecutionProvider) or pick an available one.")
        resolved.append(p)
    if not resolved:
        raise BackendUnavailable(f"no execution provider given; available: {', '.join(available)}")
    return resolved


def make_session(
    model: ModelLike,
    *,
    providers: Sequence[Any] | None = None,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | Path | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (proto, bytes or path)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from e
    if optimization not in _OPT_LEVELS:
        raise InputError(f"optimization must be one of {', '.join(_OPT_LEVELS)}, got {optimization!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise InputError(f"threads must be a non-negative int (0 = ONNX Runtime default), got {threads!r}")
    resolved = _resolve_providers(providers)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    if optimized_model_path is not None:
        Path(optimized_model_path).parent.mkdir(parents=True, exist_ok=True)
        opts.optimized_model_filepath = str(optimized_model_path)
    external: list[Any] = []
    if isinstance(model, onnx.ModelProto):
        source, names, external = session_source(model)
        if names:
            opts.add_external_initializers(names, external)
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    else:
        path = Path(model)
        if not path.is_file():
            raise InputError(f"ONNX model file not found: {path}")
        source = str(path)
    session = ort.InferenceSession(source, sess_options=opts, providers=resolved)
    session.fxcompress_initializers = external  # ONNX Runtime reads them in place: they live as long as it
    return session


def _spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, (int, str)) or d is None else None for d in (arg.shape or ()))
    return TensorSpec(arg.name, _ORT_TO_NUMPY.get(arg.type), shape, arg.type)


class OrtRunner:
    """Run an ONNX model in ONNX Runtime with torch tensors in and out.

    ``OrtRunner(model)(x)`` returns a torch tensor (a tuple when the model has several outputs).
    ``providers``: execution providers in priority order (default CPU only); one that this
    onnxruntime build lacks raises ``BackendUnavailable`` listing those it has. ``threads``: intra-op
    thread count. ``optimization``: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"``.
    ``optimized_model_path``: where ORT writes the graph it actually runs (to inspect fusions).
    """

    def __init__(
        self,
        model: ModelLike,
        *,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        optimization: str = "all",
        optimized_model_path: str | Path | None = None,
    ) -> None:
        self.session = make_session(model, providers=providers, threads=threads,
                                    optimization=optimization, optimized_model_path=optimized_model_path)
        self.input_specs: tuple[TensorSpec, ...] = tuple(_spec(a) for a in self.session.get_inputs())
        self.output_specs: tuple[TensorSpec, ...] = tuple(_spec(a) for a in self.session.get_outputs())
        self._providers = tuple(self.session.get_providers())

    @property
    def providers(self) -> list[str]:
        """Providers the session actually uses, in priority order."""
        return list(self._providers)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.output_specs]

    def __repr__(self) -> str:
        ins = "; ".join(map(str, self.input_specs))
        outs = "; ".join(map(str, self.output_specs))
        return f"OrtRunner(inputs=[{ins}], outputs=[{outs}], providers={self.providers})"

    def feed(self, *tensors: Any, **named: Any) -> dict[str, np.ndarray]:
        """Validate inputs (positional in input order, or by name) and return ORT's feed dict."""
        specs = self.input_specs
        names = [s.name for s in specs]
        if tensors and named:
            raise InputError("pass the inputs either positionally or by name, not both")
        if named:
            unknown = sorted(set(named) - set(names))
            missing = [n for n in names if n not in named]
            if unknown or missing:
                raise InputError(
                    f"model inputs are {names}; unknown: {unknown or 'none'}, missing: {missing or 'none'}")
            tensors = tuple(named[n] for n in names)
        if len(tensors) != len(specs):
            expected = ", ".join(map(str, specs))
            raise InputError(
                f"the model takes {len(specs)} input(s) ({expected}) but was called with {len(tensors)}; "
                f"pass exactly one tensor per input, in this order")
        dims_seen: dict[str, tuple[int, str]] = {}
        feed: dict[str, np.ndarray] = {}
        for i, (spec, value) in enumerate(zip(specs, tensors)):
            feed[spec.name] = self._check(i, spec, value, dims_seen)
        return feed

    def _check(self, i: int, spec: TensorSpec, value: Any,
               dims_seen: dict[str, tuple[int, str]]) -> np.ndarray:
        where = f"input #{i} {spec.name!r}"
        if isinstance(value, torch.Tensor):
            check_device(where, value.device, self._providers)
            array = np.ascontiguousarray(value.detach().to("cpu").numpy())
        elif isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value)
        else:
            raise InputError(f"{where}: expected a torch.Tensor or numpy array, got {type(value).__name__}")
        if spec.dtype is not None and array.dtype != np.dtype(spec.dtype):
            want = np.dtype(spec.dtype).name
            hint = f"convert it first, e.g. x.to(torch.{_torch_name(want)})"
            raise InputError(f"{where}: expected dtype {want}, got {array.dtype.name}; {hint}")
        if array.ndim != spec.rank:
            raise InputError(
                f"{where}: expected rank {spec.rank} with shape {_fmt(spec.shape)}, got rank {array.ndim} "
                f"with shape {tuple(array.shape)}; reshape the input (e.g. add the batch dimension)")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want >= 0 and want != got:
                raise InputError(
                    f"{where}: dimension {axis} must be {want} (the model was exported with a static "
                    f"shape {_fmt(spec.shape)}), got shape {tuple(array.shape)}; resize the input, or "
                    f"export with this axis in dynamic_axes")
            if isinstance(want, str) and want:
                if want in dims_seen and dims_seen[want][0] != got:
                    size, other = dims_seen[want]
                    raise InputError(
                        f"{where}: dimension {axis} ({want!r}) is {got} but {other} has {want!r} = {size}; "
                        f"inputs sharing a named dimension must agree")
                dims_seen.setdefault(want, (got, where))
        return array

    def __call__(self, *tensors: Any, **named: Any) -> Any:
        """Run the session; returns a torch tensor, or a tuple of them for several outputs."""
        outputs = self.session.run(None, self.feed(*tensors, **named))
        result = tuple(torch.from_numpy(np.asarray(o)) for o in outputs)
        return result[0] if len(result) == 1 else result

    def run_numpy(self, *tensors: Any, **named: Any) -> list[np.ndarray]:
        """Like calling the runner, but returns ORT's numpy arrays."""
        return list(self.session.run(None, self.feed(*tensors, **named)))


#: execution providers that run on an NVIDIA GPU, so a CUDA tensor is a meaningful input for them
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")


def check_device(where: str, device: Any, providers: Sequence[str]) -> None:
    """Refuse an input ONNX Runtime cannot take from this device: a meta tensor (no data), a CUDA
    tensor for a session without a GPU provider, or any other device. CPU tensors, and CUDA tensors
    for a CUDA/TensorRT provider, are accepted (the feed is copied through host memory and the
    outputs come back as CPU tensors)."""
    kind = device.type
    if kind == "cpu" or (kind == "cuda" and any(p in CUDA_PROVIDERS for p in providers)):
        return
    if kind == "meta":
        raise InputError(f"{where} is a meta tensor (device 'meta': a shape without data), which cannot run; "
                         "pass a real tensor, e.g. torch.randn(shape) on the CPU, or materialize the data first")
    if kind == "cuda":
        raise InputError(f"{where} is on device '{device}' but this ONNX Runtime session runs on "
                         f"{', '.join(providers)}; move it to the CPU with x.cpu(), or create the runner with "
                         "providers=['CUDAExecutionProvider'] (needs the onnxruntime-gpu package)")
    raise InputError(f"{where} is on device '{device}', which ONNX Runtime cannot read; move it to the CPU with "
                     "x.cpu()")


def _fmt(shape: tuple[int | str | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _torch_name(numpy_name: str) -> str:
    return {"float32": "float32", "float64": "float64", "float16": "float16", "bool_": "bool",
            "bool": "bool"}.get(numpy_name, numpy_name)


def session_source(model: onnx.ModelProto) -> tuple[bytes, list[str], list[Any]]:
    """What ``onnxruntime.InferenceSession`` is built from: the serialized model, and (for a model
    over ``EXTERNAL_DATA_THRESHOLD``) the names and ``OrtValue``s of the initializers left out of it,
    for ``SessionOptions.add_external_initializers`` (no serialized copy of the weights, no 2 GB limit)."""
    if not needs_external_data(model):
        return model.SerializeToString(), [], []
    import onnxruntime as ort
    from onnx import numpy_helper

    lean = with_external_data(model, "in-memory")
    names, values = [], []
    for init, full in zip(lean.graph.initializer, model.graph.initializer):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.append(init.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(full)))
    return lean.SerializeToString(), names, values


def run_onnx(
    model: ModelLike,
    inputs: "Sequence[torch.Tensor | np.ndarray] | Mapping[str, Any]",
    *,
    output_names: Sequence[str] | None = None,
    optimization: str = "disable",
) -> list[np.ndarray]:
    """Run ``model`` once on the CPU in ONNX Runtime and return its outputs as numpy arrays.

    ``inputs`` are positional (graph input order) or a mapping by input name. Graph
    optimizations are off by default so the result reflects the graph as written (what an exact
    pass must preserve); ``output_names`` selects outputs (intermediate tensors need
    ``expose_outputs`` first).
    """
    proto = load_model(model)
    session = make_session(proto, optimization=optimization)
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping):
        feed = {k: to_numpy(v) for k, v in inputs.items()}
    else:
        if len(inputs) != len(names):
            raise InputError(f"run_onnx: the model takes {len(names)} inputs {names}, got {len(inputs)}")
        feed = {k: to_numpy(v) for k, v in zip(names, inputs)}
    return list(session.run(list(output_names) if output_names is not None else None, feed))


def run_model(
    model: ModelLike,
    inputs: "Sequence[torch.Tensor | np.ndarray] | Mapping[str, Any]",
    *,
    optimization: str = "disable",
) -> "torch.Tensor | tuple[torch.Tensor, ...]":
    """``run_onnx`` returning torch tensors shaped like a module's result: one tensor for a
    single output, else a tuple (what the pipeline compares against the FX graph)."""
    outs = tuple(torch.from_numpy(np.asarray(o)) for o in run_onnx(model, inputs, optimization=optimization))
    return outs[0] if len(outs) == 1 else outs
