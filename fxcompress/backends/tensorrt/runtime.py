"""The TensorRT module of a target, device checks, and the logger that captures build messages."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch

from ...errors import BackendUnavailable, PipelineError

log = logging.getLogger("fxcompress.tensorrt")

#: target -> (python module, pip package that provides it)
TARGETS: dict[str, tuple[str, str]] = {
    "tensorrt": ("tensorrt", "tensorrt"),
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx-cu12"),
}


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
