"""Build options: optimization profiles, precision plan, and their translation to a builder config."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import onnx
import torch

from ...errors import BackendUnavailable, InputError, PipelineError
from ...onnx_facts import GraphTraits, graph_inputs, graph_traits, input_dims

PRECISIONS = ("fp32", "fp16", "int8", "best")


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
