"""TensorRT and TensorRT-RTX: build a serialized engine from ONNX, and run it on torch CUDA tensors.

Two targets share this code, as both modules have the same Builder / OnnxParser / IBuilderConfig API:

* ``target="tensorrt"`` imports ``tensorrt`` (pip ``tensorrt``). Building and running need a GPU.
* ``target="tensorrt-rtx"`` imports ``tensorrt_rtx`` (pip ``tensorrt-rtx-cu12``). It builds engines
  ahead of time on a CPU (portable across RTX GPUs); running one needs a GPU.

Precision (``BuildOptions.precision``) maps onto the builder like this; we quantize explicitly
(Q/DQ in the graph), never with calibrators:

============  ==========================================  ===========================================
precision     module with FP16/INT8 flags (TensorRT 10)   strongly typed only (TensorRT-RTX, TRT 11)
============  ==========================================  ===========================================
``fp32``      strongly typed network, no flags            same
``fp16``      weakly typed, ``FP16`` (+``INT8`` if Q/DQ)  graph must already hold float16 tensors (run
                                                          ``convert-fp16`` first), else BackendUnavailable
``int8``      graph must hold INT8 Q/DQ (PipelineError    same
              otherwise); strongly typed, no flags
``best``      weakly typed, ``FP16`` (+``INT8`` if Q/DQ)  strongly typed; the graph's types decide
============  ==========================================  ===========================================

TensorRT documents weak typing as deprecated since 10.12 and removes the precision flags in 11;
the ``fp16``/``best`` rows therefore fall to the right-hand column on a module without them.
TensorRT-RTX documents its timing cache as a no-op (since RTX 1.2): the file is still read and
written so artifacts look the same for both targets, and the build notes say so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch

from ..errors import ArtifactError, BackendUnavailable, ExportError, InputError, PipelineError

log = logging.getLogger("fxcompress.tensorrt")

#: target -> (python module, pip package that provides it)
TARGETS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "tensorrt"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx-cu12"),
}
PRECISIONS = ("fp32", "fp16", "int8", "best")
_TP = onnx.TensorProto
_QUANT_TYPES = {_TP.INT8: "INT8", _TP.UINT8: "UINT8", _TP.INT4: "INT4", _TP.UINT4: "UINT4",
                _TP.INT16: "INT16", _TP.UINT16: "UINT16", _TP.INT32: "INT32", _TP.FLOAT8E4M3FN: "FP8",
                _TP.FLOAT8E5M2: "FP8E5M2", _TP.FLOAT4E2M1: "FP4"}


# --------------------------------------------------------------------------- modules and devices

def _check_target(target: str) -> tuple[str, str]:
    if target not in TARGETS:
        raise PipelineError(f"unknown TensorRT target {target!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[target]


FALLBACK_HINT = "or compile with fallback='onnxruntime'"


class TensorRTUnavailable(BackendUnavailable):
    """``BackendUnavailable`` keeping what is missing (``reason``) apart from what else to do
    (``hint``, e.g. "compile with fallback='onnxruntime'"): ``str()`` is both, for a user who
    sees the error; a fallback record quotes ``reason`` alone, as the fallback was already taken."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason = reason
        self.hint = hint


def import_trt(target: str) -> ModuleType:
    """The TensorRT module for ``target`` ("tensorrt" or "tensorrt-rtx"); ``TensorRTUnavailable``
    (a ``BackendUnavailable``) naming the module and its pip package if missing."""
    module_name, package = _check_target(target)
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        extra = (" (TensorRT-RTX builds engines on a CPU too: target='tensorrt-rtx')"
                 if target == "tensorrt" else "")
        raise TensorRTUnavailable(
            f"target {target!r} needs the Python module '{module_name}', which is not importable here "
            f"({exc}); install it with `pip install {package}`{extra}", FALLBACK_HINT) from exc


def module_available(target: str) -> bool:
    """Whether the module for ``target`` can be imported (without importing it)."""
    return importlib.util.find_spec(_check_target(target)[0]) is not None


def gpu_available() -> bool:
    """Whether torch sees a CUDA device (what running an engine needs)."""
    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def _no_gpu_error() -> TensorRTUnavailable:
    return TensorRTUnavailable(
        f"running a TensorRT engine needs an NVIDIA GPU with a CUDA driver; torch.cuda.is_available() is "
        f"False here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}). Engines for "
        "target='tensorrt-rtx' can still be built on this machine and run on a GPU machine",
        "to run here, compile with target='onnxruntime' or fallback='onnxruntime'")


# --------------------------------------------------------------------------- logging

class _LogSink:
    """One ILogger per module: TensorRT keeps the first logger it is given process-wide, so every
    builder/runtime here shares it and captures are scoped with ``capture_log``."""

    _by_module: dict[str, Any] = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, trt: ModuleType) -> Any:
        with cls._lock:
            if trt.__name__ not in cls._by_module:
                cls._by_module[trt.__name__] = cls._make(trt)
            return cls._by_module[trt.__name__]

    @staticmethod
    def _make(trt: ModuleType) -> Any:
        severity = trt.ILogger.Severity
        names = {severity.INTERNAL_ERROR: "error", severity.ERROR: "error", severity.WARNING: "warning"}

        class Sink(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.captures: list[list[tuple[str, str]]] = []

            def log(self, sev: Any, msg: str) -> None:
                name = names.get(sev)
                if name is not None:
                    log.debug("[%s] %s: %s", trt.__name__, name, msg)
                    for capture in self.captures:
                        capture.append((name, msg))

        return Sink()


@contextlib.contextmanager
def capture_log(trt: ModuleType) -> Iterator[list[tuple[str, str]]]:
    """Collect the module's warnings and errors, as ``(severity, message)``, while the block runs."""
    sink = _LogSink.get(trt)
    messages: list[tuple[str, str]] = []
    sink.captures.append(messages)
    try:
        yield messages
    finally:
        sink.captures.remove(messages)


def trt_logger(trt: ModuleType) -> Any:
    """The shared ``ILogger`` for ``trt`` (pass it to Builder/Runtime/OnnxParser)."""
    return _LogSink.get(trt)


# --------------------------------------------------------------------------- graph facts

_FOLDABLE = ("Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze")
_FOLD_LIMIT = 1 << 20


def constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Build-time constants of the main graph, by tensor name: initializers, ``Constant`` outputs, and
    small Cast/Identity/Reshape/Squeeze/Unsqueeze chains of them (TensorRT folds those too)."""
    from onnx import numpy_helper

    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
            continue
        if node.op_type not in _FOLDABLE or not node.input or not all(i in out for i in node.input if i):
            continue
        src = out[node.input[0]]
        if int(np.prod(src.dims, dtype=np.int64)) > _FOLD_LIMIT:
            continue
        value = numpy_helper.to_array(src)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            if node.op_type == "Cast":
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
            elif node.op_type == "Reshape":
                shape = [int(d) for d in numpy_helper.to_array(out[node.input[1]])]
                shape = [value.shape[i] if d == 0 else d for i, d in enumerate(shape)]
                value = value.reshape(shape)
            elif node.op_type in ("Squeeze", "Unsqueeze"):
                axes = attrs.get("axes")
                if axes is None and len(node.input) > 1 and node.input[1]:
                    axes = [int(a) for a in numpy_helper.to_array(out[node.input[1]])]
                if node.op_type == "Squeeze":
                    value = np.squeeze(value, axis=tuple(axes) if axes is not None else None)
                else:
                    value = np.expand_dims(value, axis=tuple(axes))
        except (KeyError, ValueError, TypeError):
            continue
        out[node.output[0]] = numpy_helper.from_array(np.asarray(value), node.output[0])
    return out


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (old IRs also list initializers as inputs)."""
    init = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in init]


def input_dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """Dims of a graph input: an int when static, the ``dim_param`` name or None when dynamic."""
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def qdq_type(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto]) -> str:
    """The quantized type of a QuantizeLinear/DequantizeLinear node ("INT8", "UINT8", "INT32", ...)."""
    if node.op_type == "DequantizeLinear" and node.input[0] in constants:
        return _QUANT_TYPES.get(constants[node.input[0]].data_type, "OTHER")
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] in constants:
            return _QUANT_TYPES.get(constants[node.input[2]].data_type, "OTHER")
        return "UNKNOWN"
    if node.op_type == "QuantizeLinear":
        for attr in node.attribute:
            if attr.name == "output_dtype" and attr.i:
                return _QUANT_TYPES.get(attr.i, "OTHER")
        return "UINT8"  # ONNX: y_zero_point omitted -> uint8 output
    return "UNKNOWN"


@dataclass(frozen=True)
class GraphTraits:
    """What the build needs to know about a graph before configuring the builder."""

    qdq_types: frozenset[str] = frozenset()
    float16: bool = False
    dynamic_inputs: tuple[str, ...] = ()

    @property
    def has_int8_qdq(self) -> bool:
        return "INT8" in self.qdq_types

    @property
    def has_qdq(self) -> bool:
        return bool(self.qdq_types)


def graph_traits(model: onnx.ModelProto) -> GraphTraits:
    """Q/DQ types, float16 use and dynamic inputs of ``model``."""
    constants = constant_tensors(model)
    qdq = frozenset(qdq_type(n, constants) for n in model.graph.node
                    if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    fp16 = onnx.TensorProto.FLOAT16
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    float16 = (any(v.type.tensor_type.elem_type == fp16 for v in values)
               or any(t.data_type == fp16 for t in constants.values())
               or any(n.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in n.attribute)
                      for n in model.graph.node))
    dynamic = tuple(v.name for v in graph_inputs(model) if any(not isinstance(d, int) for d in input_dims(v)))
    return GraphTraits(qdq, float16, dynamic)


# --------------------------------------------------------------------------- options and profiles

Shape = tuple[int, ...]
Profile = tuple[Shape, Shape, Shape]


def derive_profiles(onnx_model: onnx.ModelProto,
                    example_shapes: Mapping[str, Sequence[int]] | Sequence[Sequence[int]], *,
                    min_batch: int = 1, max_batch: int | None = None,
                    ranges: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Profile]:
    """min/opt/max shapes for every input with dynamic dims; opt is the example shape.

    A dynamic dim 0 is the batch: ``min_batch`` .. ``max_batch`` (default ``max(example batch, 32)``).
    Another dynamic dim named ``p`` (its ``dim_param``) spans ``ranges[p]`` when given, else it is
    fixed to the example size. Inputs whose shape is fully static get no profile.
    """
    inputs = graph_inputs(onnx_model)
    if isinstance(example_shapes, Mapping):
        shapes = dict(example_shapes)
        unknown = set(shapes) - {v.name for v in inputs}
        if unknown:
            raise InputError(f"derive_profiles: no graph input named {sorted(unknown)}; inputs are "
                             f"{[v.name for v in inputs]}")
    else:
        seq = list(example_shapes)
        if len(seq) != len(inputs):
            raise InputError(f"derive_profiles: {len(seq)} example shapes for {len(inputs)} graph inputs "
                             f"{[v.name for v in inputs]}")
        shapes = {v.name: s for v, s in zip(inputs, seq)}
    ranges = dict(ranges or {})
    profiles: dict[str, Profile] = {}
    for value in inputs:
        dims = input_dims(value)
        if all(isinstance(d, int) for d in dims):
            continue
        if value.name not in shapes:
            raise InputError(f"derive_profiles: input {value.name!r} has dynamic dims {dims} but no example "
                             "shape; give one, or pass profiles={name: (min, opt, max)} explicitly")
        opt = tuple(int(s) for s in shapes[value.name])
        if len(opt) != len(dims):
            raise InputError(f"derive_profiles: example shape {list(opt)} for input {value.name!r} has rank "
                             f"{len(opt)}, the graph input has rank {len(dims)} ({dims})")
        lo, hi = list(opt), list(opt)
        for axis, (dim, size) in enumerate(zip(dims, opt)):
            if isinstance(dim, int):
                if dim != size:
                    raise InputError(f"derive_profiles: input {value.name!r} dim {axis} is fixed to {dim} in "
                                     f"the graph but the example has {size}")
                continue
            if isinstance(dim, str) and dim in ranges:
                lo[axis], hi[axis] = (int(x) for x in ranges[dim])
            elif axis == 0:
                lo[axis] = min_batch
                hi[axis] = max_batch if max_batch is not None else max(size, 32)
            if not lo[axis] <= size <= hi[axis]:
                raise InputError(f"derive_profiles: input {value.name!r} dim {axis} ({dim}): the example "
                                 f"size {size} is outside the range {lo[axis]}..{hi[axis]}")
        profiles[value.name] = (tuple(lo), opt, tuple(hi))
    return profiles


def _normalize_cc(cc: str) -> str:
    text = str(cc).upper().replace("SM_", "SM").replace(".", "")
    return text if text.startswith("SM") else f"SM{text}"


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine. ``profiles`` maps input name -> (min, opt, max) shapes."""

    precision: str = "fp32"
    workspace_bytes: int | None = None
    profiles: Mapping[str, Profile] | None = None
    timing_cache: str | None = None
    builder_optimization_level: int | None = None
    #: TensorRT-RTX only: GPUs to build for, e.g. ("SM86", "SM89"); None = the module's portable default
    compute_capabilities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise PipelineError(f"BuildOptions.precision must be one of {', '.join(PRECISIONS)}; "
                                f"got {self.precision!r}")
        if self.workspace_bytes is not None and (not isinstance(self.workspace_bytes, int)
                                                 or self.workspace_bytes <= 0):
            raise PipelineError("BuildOptions.workspace_bytes must be a positive int; "
                                f"got {self.workspace_bytes!r}")
        if self.builder_optimization_level is not None and self.builder_optimization_level not in range(6):
            raise PipelineError("BuildOptions.builder_optimization_level must be 0..5; "
                                f"got {self.builder_optimization_level!r}")
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", str(self.timing_cache))
        if self.compute_capabilities is not None:
            object.__setattr__(self, "compute_capabilities",
                               tuple(_normalize_cc(c) for c in self.compute_capabilities))
        if self.profiles is not None:
            profiles = {str(k): self._profile(str(k), v) for k, v in self.profiles.items()}
            object.__setattr__(self, "profiles", profiles)

    @staticmethod
    def _profile(name: str, value: Any) -> Profile:
        try:
            lo, opt, hi = (tuple(int(d) for d in s) for s in value)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"profile for input {name!r} must be (min, opt, max) shapes; "
                                f"got {value!r}") from exc
        if not len(lo) == len(opt) == len(hi) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise PipelineError(f"profile for input {name!r} needs min <= opt <= max per dim, same ranks; "
                                f"got min={list(lo)} opt={list(opt)} max={list(hi)}")
        return lo, opt, hi

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for manifest.json)."""
        d = dataclasses.asdict(self)
        if self.profiles is not None:
            d["profiles"] = {k: [list(s) for s in v] for k, v in self.profiles.items()}
        if self.compute_capabilities is not None:
            d["compute_capabilities"] = list(self.compute_capabilities)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BuildOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise PipelineError(f"unknown TensorRT build option(s) {sorted(unknown)}; known: {sorted(names)}")
        d = dict(data)
        if d.get("compute_capabilities") is not None:
            d["compute_capabilities"] = tuple(d["compute_capabilities"])
        return cls(**d)

    @classmethod
    def from_compile(cls, *, precision: str = "fp32", example_inputs: Sequence[Any] = (),
                     onnx_model: onnx.ModelProto | None = None, min_batch: int = 1,
                     max_batch: int | None = None, ranges: Mapping[str, tuple[int, int]] | None = None,
                     **options: Any) -> "BuildOptions":
        """Options for ``fxcompress.compile``: profiles derived from the example inputs unless given."""
        opts = cls.from_dict({"precision": precision, **options})
        if opts.profiles is None and onnx_model is not None and graph_traits(onnx_model).dynamic_inputs:
            shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
            opts = dataclasses.replace(opts, profiles=derive_profiles(onnx_model, shapes, min_batch=min_batch,
                                                                      max_batch=max_batch, ranges=ranges))
        return opts


# --------------------------------------------------------------------------- precision and config

@dataclass(frozen=True)
class PrecisionPlan:
    """How a precision request becomes a network kind and builder flags."""

    precision: str
    strongly_typed: bool
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def builder_flags(trt: ModuleType) -> frozenset[str]:
    """Names of the module's ``BuilderFlag`` members (TensorRT-RTX has no FP16/INT8)."""
    return frozenset(n for n in dir(trt.BuilderFlag) if n.isupper())


def precision_plan(precision: str, traits: GraphTraits, *, module_flags: Collection[str],
                   target: str = "tensorrt") -> PrecisionPlan:
    """The table in this module's docstring, as a pure function (no module needed)."""
    if precision not in PRECISIONS:
        raise PipelineError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    weak_ok = "FP16" in module_flags
    qdq_int8 = ("INT8",) if traits.has_int8_qdq and "INT8" in module_flags else ()
    notes: list[str] = []
    if traits.qdq_types - {"INT8", "FP8", "INT4", "FP4"}:
        notes.append(f"graph has Q/DQ of type(s) {sorted(traits.qdq_types)}; TensorRT takes "
                     "INT8/FP8/INT4/FP4 (run check-tensorrt)")
    if precision == "int8":
        if not traits.has_int8_qdq:
            raise PipelineError(
                f"precision='int8' for {target} needs INT8 QuantizeLinear/DequantizeLinear nodes in the ONNX "
                "graph (explicit quantization; fxcompress does not use TensorRT calibrators); add the "
                "quantize-int8 pass (QuantizeInt8(scheme='tensorrt')) before the build, or build with "
                "precision='fp32'")
        notes.append("INT8 from the graph's Q/DQ nodes (strongly typed network)")
        return PrecisionPlan(precision, True, (), tuple(notes))
    if precision == "fp32":
        if traits.has_qdq:
            notes.append("the graph has Q/DQ nodes: those layers run quantized although precision='fp32'")
        if traits.float16:
            notes.append("the graph has float16 tensors: they stay float16 (strongly typed network)")
        return PrecisionPlan(precision, True, (), tuple(notes))
    if weak_ok:
        notes.append("weakly typed network with precision flags (deprecated by TensorRT since 10.12)")
        return PrecisionPlan(precision, False, ("FP16", *qdq_int8), tuple(notes))
    if precision == "best":
        notes.append(f"{target} is strongly typed: the graph's own types and Q/DQ nodes decide each "
                     "layer's precision")
        return PrecisionPlan(precision, True, (), tuple(notes))
    if traits.float16:
        notes.append("FP16 from the graph's float16 tensors (strongly typed network)")
        return PrecisionPlan(precision, True, (), tuple(notes))
    raise BackendUnavailable(
        f"precision='fp16' is not available for {target}: its networks are strongly typed and it has no "
        "FP16 builder flag, so precision comes from the graph's own types; run the convert-fp16 pass "
        "(ConvertFP16) before the build so the ONNX graph holds float16 tensors, or build with "
        "precision='fp32'")


def translate_config(trt: ModuleType, builder: Any, options: BuildOptions,
                     traits: GraphTraits | None = None, *, target: str | None = None) -> Any:
    """An ``IBuilderConfig`` for ``options``: precision flags, workspace, optimization level,
    compute capabilities (TensorRT-RTX) and optimization profiles. The timing cache is attached by
    ``build_engine`` (it must outlive the build)."""
    traits = traits or GraphTraits()
    target = target or ("tensorrt-rtx" if trt.__name__ == "tensorrt_rtx" else "tensorrt")
    plan = precision_plan(options.precision, traits, module_flags=builder_flags(trt), target=target)
    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = options.builder_optimization_level
    if options.compute_capabilities:
        if not hasattr(trt, "ComputeCapability"):
            raise PipelineError(f"compute_capabilities is a TensorRT-RTX option; {trt.__name__} builds for "
                                "the GPU it runs on")
        known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        config.num_compute_capabilities = len(options.compute_capabilities)
        for i, cc in enumerate(options.compute_capabilities):
            if cc not in known:
                raise PipelineError(f"unknown compute capability {cc!r} for {trt.__name__}; known: {known}")
            if not config.set_compute_capability(getattr(trt.ComputeCapability, cc), i):
                raise PipelineError(f"{trt.__name__} refused compute capability {cc} at index {i}")
    if options.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in options.profiles.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise PipelineError(f"{trt.__name__} rejected the optimization profile "
                                f"{options.to_dict()['profiles']}")
    return config


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class ParserIssue:
    """One error reported by TensorRT's ONNX parser, tied to the node when it names one."""

    node_index: int
    node: str | None
    op_type: str | None
    code: str
    message: str

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op_type})" if self.node or self.op_type else "graph"
        return f"{where}: {self.message} [{self.code}]"


class TensorRTParseError(ExportError):
    """TensorRT's ONNX parser rejected the graph; ``issues`` lists each error with its node."""

    def __init__(self, message: str, issues: Sequence[ParserIssue]) -> None:
        super().__init__(message)
        self.issues = tuple(issues)


def _clean(desc: str) -> str:
    """Drop the CUDA-driver lines a GPU-less machine appends to parser messages."""
    lines = [ln for ln in str(desc).splitlines()
             if "catchCudaError" not in ln and "CUDA driver version is insufficient" not in ln]
    return "\n".join(lines).strip()


def _issues(parser: Any, model: onnx.ModelProto) -> list[ParserIssue]:
    nodes = model.graph.node
    out: list[ParserIssue] = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        idx = int(err.node())
        name = err.node_name() or (nodes[idx].name if 0 <= idx < len(nodes) else "") or None
        op = err.node_operator() or (nodes[idx].op_type if 0 <= idx < len(nodes) else "") or None
        msg = _clean(err.desc())
        if msg in ("", "false") and op:
            msg = f"the parser has no importer for operator {op}"
        out.append(ParserIssue(idx, name, op, str(err.code()).rsplit(".", 1)[-1], msg))
    return out


def network_flags(trt: ModuleType, strongly_typed: bool) -> int:
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _builder(trt: ModuleType, target: str) -> Any:
    try:
        builder = trt.Builder(trt_logger(trt))
    except (RuntimeError, TypeError) as exc:
        builder, cause = None, exc
    else:
        cause = None
    if builder is None:
        hint = ""
        if target == "tensorrt":
            hint = " (TensorRT-RTX builds ahead of time on a CPU: target='tensorrt-rtx')"
        raise BackendUnavailable(f"{trt.__name__} could not create a Builder: it needs a usable CUDA device "
                                 f"here{hint}") from cause
    return builder


def parser_report(onnx_model: onnx.ModelProto, target: str) -> tuple[list[ParserIssue], list[str], str]:
    """Run the real ONNX parser of ``target`` on ``onnx_model``.

    Returns (issues, warnings, "module version"). ``supports_model_v2`` reports every unsupported
    node (``parse`` stops at the first); a full ``parse`` then catches import-time errors.
    """
    trt = import_trt(target)
    data = onnx_model.SerializeToString()
    issues: list[ParserIssue] = []
    with capture_log(trt) as messages:
        builder = _builder(trt, target)
        for check in ("supports_model_v2", "parse"):
            network = builder.create_network(network_flags(trt, True))
            parser = trt.OnnxParser(network, trt_logger(trt))
            fn = getattr(parser, check, None)
            if fn is None:
                continue
            fn(data)
            for issue in _issues(parser, onnx_model):
                if all((issue.node, issue.message) != (i.node, i.message) for i in issues):
                    issues.append(issue)
            if issues:
                break
    warnings = [m for sev, m in messages if sev == "warning"]
    return issues, warnings, f"{trt.__name__} {trt.__version__}"


# --------------------------------------------------------------------------- building

@dataclass(frozen=True)
class EngineBuild:
    """A serialized engine and how it was built (what manifest.json records)."""

    engine: bytes = field(repr=False)
    target: str
    module_name: str
    module_version: str
    options: BuildOptions
    build_seconds: float
    parse_seconds: float
    strongly_typed: bool
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    num_layers: int = 0
    timing_cache_loaded: bool = False
    timing_cache_written: bool = False

    @property
    def size(self) -> int:
        return len(self.engine)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.engine).hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the report and manifest."""
        return {
            "target": self.target, "module": self.module_name, "version": self.module_version,
            "options": self.options.to_dict(), "build_seconds": round(self.build_seconds, 4),
            "parse_seconds": round(self.parse_seconds, 4), "bytes": self.size, "sha256": self.sha256,
            "strongly_typed": self.strongly_typed, "flags": list(self.flags), "notes": list(self.notes),
            "warnings": list(self.warnings), "num_layers": self.num_layers,
            "timing_cache": {"path": self.options.timing_cache, "loaded": self.timing_cache_loaded,
                             "written": self.timing_cache_written},
        }

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_bytes(self.engine)
        return out


def _attach_timing_cache(trt: ModuleType, config: Any, path: str | None) -> tuple[Any, bool]:
    if path is None:
        return None, False
    blob = Path(path).read_bytes() if Path(path).is_file() else b""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TensorRT-RTX: documented no-op
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, False):
            if not blob:
                raise ExportError(f"{trt.__name__} could not create a timing cache")
            log.warning("timing cache %s does not match this %s/device; starting a new one",
                        path, trt.__name__)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
            return cache, False
    return cache, bool(blob)


def _save_timing_cache(config: Any, path: str) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cache = config.get_timing_cache()
        if cache is None:
            return False
        blob = bytes(cache.serialize())
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(target)
    return True


def build_engine(onnx_model: onnx.ModelProto, target: str = "tensorrt-rtx",
                 options: BuildOptions | None = None) -> EngineBuild:
    """Parse ``onnx_model`` with the real TensorRT ONNX parser and build a serialized engine.

    Raises ``BackendUnavailable`` when the module (or, for ``tensorrt``, a GPU) is missing,
    ``TensorRTParseError`` (an ``ExportError``) naming every node the parser rejected, and
    ``ExportError`` with TensorRT's own messages when the build itself fails.
    """
    options = options or BuildOptions()
    trt = import_trt(target)
    traits = graph_traits(onnx_model)
    missing = [n for n in traits.dynamic_inputs if n not in (options.profiles or {})]
    if missing:
        raise ExportError(
            f"inputs {missing} have dynamic dims but no optimization profile; pass "
            "BuildOptions(profiles={name: (min, opt, max)}) or derive them from example shapes with "
            "derive_profiles(onnx_model, example_shapes)")
    unknown = sorted(set(options.profiles or {}) - {v.name for v in graph_inputs(onnx_model)})
    if unknown:
        raise PipelineError(f"profiles name {unknown}, which are not graph inputs "
                            f"({[v.name for v in graph_inputs(onnx_model)]})")
    plan = precision_plan(options.precision, traits, module_flags=builder_flags(trt), target=target)
    notes = list(plan.notes)
    if target == "tensorrt-rtx" and options.timing_cache:
        notes.append("TensorRT-RTX documents timing caches as a no-op (since 1.2); the file is kept "
                     "for symmetry")
    data = onnx_model.SerializeToString()
    with capture_log(trt) as messages:
        builder = _builder(trt, target)
        network = builder.create_network(network_flags(trt, plan.strongly_typed))
        parser = trt.OnnxParser(network, trt_logger(trt))
        t0 = time.perf_counter()
        ok = parser.parse(data)
        parse_seconds = time.perf_counter() - t0
        if not ok:
            issues = _issues(parser, onnx_model)
            listing = "\n".join(f"  - {i}" for i in issues) or "  (the parser gave no details)"
            raise TensorRTParseError(
                f"{trt.__name__} {trt.__version__} could not parse the ONNX graph:\n{listing}\n"
                "Run the check-tensorrt pass (passes.onnx.CheckTensorRT) for every problem and its fix.",
                issues)
        config = translate_config(trt, builder, options, traits, target=target)
        cache, cache_loaded = _attach_timing_cache(trt, config, options.timing_cache)
        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - t0
        if serialized is None:
            errors = [_clean(m) for sev, m in messages if sev == "error"]
            listing = "\n".join(f"  - {e}" for e in errors) or "  (no message; see the log)"
            raise ExportError(f"{trt.__name__} {trt.__version__} failed to build the engine "
                              f"(precision={options.precision}):\n{listing}")
        engine = bytes(serialized)
        written = _save_timing_cache(config, options.timing_cache) if options.timing_cache else False
        del cache
        num_layers = int(network.num_layers)
    return EngineBuild(
        engine=engine, target=target, module_name=trt.__name__, module_version=str(trt.__version__),
        options=options, build_seconds=build_seconds, parse_seconds=parse_seconds,
        strongly_typed=plan.strongly_typed, flags=plan.flags, notes=tuple(notes),
        warnings=tuple(_clean(m) for sev, m in messages if sev == "warning"), num_layers=num_layers,
        timing_cache_loaded=cache_loaded, timing_cache_written=written)


# --------------------------------------------------------------------------- running

def _torch_dtype(trt: ModuleType, dtype: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in table:
        raise BackendUnavailable(f"engine I/O type {name} has no torch equivalent in TrtRunner")
    return table[name]


class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors via ``execute_async_v3`` (no pycuda).

    Inputs are taken positionally in the engine's input order (or by name); CPU tensors are moved
    to the GPU and results come back on the device of the first input. TensorRT-RTX compiles
    kernels on first use; ``runtime_cache`` (a file) keeps them across runs.
    """

    def __init__(self, engine_bytes: bytes, target: str = "tensorrt-rtx", *, device: int | str | None = None,
                 runtime_cache: str | None = None) -> None:
        if not gpu_available():
            raise _no_gpu_error()
        self.target = target
        self.trt = import_trt(target)
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None
                                   else torch.device(device).index or 0)
        self.runtime_cache_path = runtime_cache
        torch.cuda.init()
        with torch.cuda.device(self.device):
            self._load(engine_bytes, runtime_cache)

    def _load(self, engine_bytes: bytes, runtime_cache: str | None) -> None:
        trt = self.trt
        self._runtime = trt.Runtime(trt_logger(trt))
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            detail = ""
            if hasattr(self._runtime, "get_engine_validity"):
                detail = f" (engine validity: {self._runtime.get_engine_validity(engine_bytes)})"
            raise BackendUnavailable(
                f"{trt.__name__} {trt.__version__} could not deserialize this engine{detail}: it was built "
                "by another TensorRT version or for another GPU; rebuild it with build_engine() for this "
                "machine")
        self._runtime_cache = None
        if runtime_cache is not None and hasattr(self.engine, "create_runtime_config"):
            self._runtime_config = config = self.engine.create_runtime_config()
            self._runtime_cache = config.create_runtime_cache()
            if Path(runtime_cache).is_file():
                self._runtime_cache.deserialize(Path(runtime_cache).read_bytes())
            config.set_runtime_cache(self._runtime_cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendUnavailable(f"{trt.__name__} could not create an execution context "
                                     "(out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_names = [n for n, i in zip(names, is_input) if i]
        self.output_names = [n for n, i in zip(names, is_input) if not i]
        self._stream = torch.cuda.Stream(self.device)

    def _bind_inputs(self, args: Sequence[torch.Tensor],
                     kwargs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if args and kwargs:
            raise InputError("TrtRunner takes inputs either positionally or by name, not both")
        if kwargs:
            missing = [n for n in self.input_names if n not in kwargs]
            extra = [n for n in kwargs if n not in self.input_names]
            if missing or extra:
                raise InputError(f"engine inputs are {self.input_names}; missing {missing}, unknown {extra}")
            args = [kwargs[n] for n in self.input_names]
        if len(args) != len(self.input_names):
            raise InputError(f"the engine takes {len(self.input_names)} input(s) {self.input_names}; "
                             f"got {len(args)}")
        kept: list[torch.Tensor] = []
        for name, value in zip(self.input_names, args):
            if not isinstance(value, torch.Tensor):
                raise InputError(f"input {name!r} must be a torch.Tensor; got {type(value).__name__}")
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            tensor = value.to(device=self.device, dtype=dtype).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                lo, opt, hi = (list(s) for s in self.engine.get_tensor_profile_shape(name, 0))
                raise InputError(f"input {name!r} has shape {list(tensor.shape)}, outside the engine's "
                                 f"optimization profile min={lo} opt={opt} max={hi}; rebuild with a wider "
                                 "profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
            kept.append(tensor)
        return kept

    def __call__(self, *args: torch.Tensor,
                 **kwargs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        first = next(iter([*args, *kwargs.values()]), None)
        home = first.device if isinstance(first, torch.Tensor) else self.device
        with torch.cuda.device(self.device):
            kept = self._bind_inputs(args, kwargs)
            outputs = []
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BackendUnavailable(f"output {name!r} has a data-dependent shape {list(shape)}; "
                                             "TrtRunner does not implement an IOutputAllocator")
                out = torch.empty(shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)),
                                  device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise BackendUnavailable(f"{self.trt.__name__} execute_async_v3 failed; see the "
                                         "fxcompress.tensorrt log")
            self._stream.synchronize()
            del kept
        results = tuple(o.to(home) for o in outputs)
        return results[0] if len(results) == 1 else results

    def save_runtime_cache(self) -> bool:
        """Write TensorRT-RTX's JIT kernel cache to ``runtime_cache`` (False when there is none)."""
        if self._runtime_cache is None or self.runtime_cache_path is None:
            return False
        Path(self.runtime_cache_path).write_bytes(bytes(self._runtime_cache.serialize()))
        return True


def load_engine_bytes(path: str | Path) -> bytes:
    """Read a ``model.engine`` file, with a clear error when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"engine file {p} is missing; rebuild it with build_engine() or re-save the "
                            "artifact")
    return p.read_bytes()
