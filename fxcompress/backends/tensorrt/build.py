"""Parse ONNX with the TensorRT parser (issues named by node) and build a serialized engine."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from ...errors import BackendUnavailable, ExportError, PipelineError
from ...onnx_facts import graph_inputs, graph_traits
from .options import BuildOptions, builder_flags, precision_plan, translate_config
from .runtime import (
    capture_log,
    import_trt,
    log,
    trt_logger,
)


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
