"""``fxcompress.compile``: trace, run the pipeline, lower, and build the target's runner."""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .artifact import Compiled, tensor_specs
from .backends import tensorrt as trt_backend
from .backends.onnx_export import export_onnx
from .copying import own_parameters, shared_copy
from .errors import (
    BackendUnavailable,
    ExportError,
    FxCompressError,
    InputError,
    OpaqueModuleWarning,
    PipelineError,
)
from .instruments import ProgressBar
from .pass_base import Pass, PassContext
from .pipeline import Pipeline
from .trace import opaque_warning, trace
from .verify import as_inputs, fresh_inputs

TARGETS = ("fx", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx")
PRECISIONS = ("fp32", "fp16", "int8", "best")


def warn_opaque(gm: Any, logger: logging.Logger | None) -> str | None:
    """Warn (Python warning and log) when opaque modules hold too much of the model; returns the text."""
    message = opaque_warning(gm)
    if message:
        warnings.warn(message, OpaqueModuleWarning, stacklevel=3)
        (logger or logging.getLogger("fxcompress")).warning("%s", message)
    return message


def _as_pipeline(passes: Pipeline | Sequence[Pass] | str, verify: bool | None, on_error: str | None,
                 instruments: Sequence[Any]) -> Pipeline:
    """The pipeline to run. ``verify``/``on_error`` given to ``compile`` override a ``Pipeline``
    object's own settings (None keeps them); its instruments run together with ``instruments``."""
    if isinstance(passes, Pipeline):
        changes: dict[str, Any] = {}
        if verify is not None:
            changes["verify"] = verify
        if on_error is not None:
            changes["on_error"] = on_error
        if instruments:
            changes["instruments"] = (*passes.instruments, *instruments)
        return dataclasses.replace(passes, **changes) if changes else passes
    if isinstance(passes, Pass):
        passes = (passes,)
    return Pipeline(passes if isinstance(passes, str) else tuple(passes),  # type: ignore[arg-type]
                    verify=True if verify is None else verify, on_error=on_error or "raise",  # type: ignore[arg-type]
                    instruments=tuple(instruments))


def compile(
    model: nn.Module,
    example_inputs: Any,
    passes: Pipeline | Sequence[Pass] | str = (),
    *,
    target: str = "onnxruntime",
    calibration: Iterable[Any] | None = None,
    train_data: Iterable[Any] | None = None,
    verify: bool | None = None,
    on_error: str | None = None,
    instruments: Sequence[Any] = (),
    progress: bool | None = None,
    precision: str = "fp32",
    fallback: str | None = None,
    dynamic_axes: Any = "batch",
    opset: int = 17,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    tensorrt_options: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    frontend: str = "auto",
    leaf_modules: Sequence[Any] = (),
    concrete_args: dict[str, Any] | None = None,
    on_untraceable: str = "leaf",
    logger: logging.Logger | None = None,
) -> Compiled:
    """Trace ``model``, run ``passes``, lower to ``target`` and return a runnable ``Compiled``.

    ``model`` and ``example_inputs`` are never mutated. ``passes`` is a list of pass objects, a
    ``Pipeline`` or a pipeline string. ``verify`` (default True) checks exact passes numerically;
    ``on_error`` is ``"raise"`` (default) or ``"skip"`` (roll the failing pass back and go on). For a
    ``Pipeline`` object, ``verify``/``on_error`` left at None keep the pipeline's own settings and
    given values override them. ``calibration`` and ``train_data`` go into the ``PassContext``.
    """
    _check_arguments(model, target, precision, fallback)
    inputs = as_inputs(example_inputs)
    pipeline = _as_pipeline(passes, verify, on_error, _with_progress(instruments, progress))

    original = shared_copy(model).eval()
    gm = trace(model, inputs, frontend=frontend, dynamic_axes=dynamic_axes,  # type: ignore[arg-type]
               leaf_modules=leaf_modules, concrete_args=concrete_args, on_untraceable=on_untraceable,
               share_parameters=True)
    opaque_warning = warn_opaque(gm, logger)
    ctx = PassContext(fresh_inputs(inputs), calibration=calibration, train_data=train_data, original=original, target=target,
                      device=device, seed=seed, logger=logger)
    input_names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]

    def lower(graph_module: Any, context: PassContext) -> Any:
        return export_onnx(graph_module, context.example_inputs, dynamic_axes=dynamic_axes, opset=opset)

    outcome = pipeline.apply(gm, ctx, lower=None if target == "fx" else lower, lower_at_end=target != "fx",
                             handed_over=True)
    own_parameters(outcome.graph_module, model)
    report = outcome.report
    _describe_run(report, gm, pipeline, target, precision, opaque_warning)
    compiled = Compiled(
        graph_module=outcome.graph_module, onnx_model=outcome.onnx_model, report=report,
        snapshots=outcome.snapshots, pipeline=str(pipeline), target=target,
        inputs=tensor_specs(inputs, input_names), outputs=tensor_specs(outcome.outputs, None),
        lower=lambda g: lower(g, ctx),
    )
    _attach_backend(compiled, target, precision=precision, fallback=fallback, providers=providers,
                    threads=threads, tensorrt_options=tensorrt_options or {}, example_inputs=inputs)
    return compiled


def _check_arguments(model: Any, target: str, precision: str, fallback: str | None) -> None:
    """``compile``'s argument checks that need no tracing: a model that is not a module is an
    ``InputError``; a wrong choice of what to build (target, precision, fallback) a ``PipelineError``."""
    if not isinstance(model, nn.Module):
        raise InputError(f"compile() needs a torch.nn.Module; got {type(model).__name__}")
    if target not in TARGETS:
        raise PipelineError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if fallback not in (None, "onnxruntime"):
        raise PipelineError(f"fallback must be None or 'onnxruntime'; got {fallback!r}")


def _with_progress(instruments: Sequence[Any], progress: bool | None) -> Sequence[Any]:
    """``instruments`` plus a progress bar when ``progress`` (None: when stderr is a terminal)."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return instruments

    return (*instruments, ProgressBar())


def _describe_run(report: Any, gm: Any, pipeline: Pipeline, target: str, precision: str,
                  opaque_warning: str | None) -> None:
    """Record in ``report`` how the model was compiled, and the opaque-module warning on its first row."""
    report.meta.update({
        "target": target, "pipeline": str(pipeline), "precision": precision,
        "opaque_modules": dict(gm.meta.get("opaque_modules", {})), "frontend": gm.meta.get("frontend", "fx"),
    })
    if opaque_warning and report.rows:
        report.rows[0].diagnostics.append({"severity": "warning", "message": opaque_warning, "node": None})


def _attach_backend(compiled: Compiled, target: str, *, precision: str, fallback: str | None,
                    providers: Sequence[str] | None, threads: int | None, tensorrt_options: dict[str, Any],
                    example_inputs: tuple[torch.Tensor, ...]) -> None:
    if target == "fx":
        compiled.use_backend("fx")
        return
    if target == "onnx":
        compiled.use_backend("none")
        return
    if target == "onnxruntime":
        compiled.use_backend("onnxruntime", providers=providers, threads=threads)
        return
    try:
        build = trt_backend.build_engine(
            compiled.onnx_model, target,
            trt_backend.BuildOptions.from_compile(precision=precision, example_inputs=example_inputs,
                                                  onnx_model=compiled.onnx_model, **tensorrt_options))
        compiled.engine = build.engine
        compiled.engine_info = build.describe()
        compiled.report.meta["engine"] = compiled.engine_info
        compiled.use_backend(target)
    except (BackendUnavailable, ExportError) as exc:
        if fallback != "onnxruntime":
            raise
        _fall_back(compiled, target, exc, providers, threads)
        return
    if fallback == "onnxruntime" and not trt_backend.gpu_available():
        _fall_back(compiled, target, BackendUnavailable("running a TensorRT engine needs an NVIDIA GPU; none found"),
                   providers, threads)


def _fall_back(compiled: Compiled, target: str, reason: FxCompressError, providers: Sequence[str] | None,
               threads: int | None) -> None:
    compiled.use_backend("onnxruntime", providers=providers, threads=threads,
                         note=f"onnxruntime (fallback from {target}: {getattr(reason, 'reason', reason)})")
