"""Every error fxcompress raises: one base class, so callers can catch them all, and one class per
kind of mistake or failure:

* ``InputError``: something the caller handed over has the wrong type, value or form (a model that is
  not a module, inputs or batches that do not fit, a missing model file, a function argument out of
  range). It is a ``ValueError`` and a ``TypeError``, so code catching either still does.
* ``PipelineError``: what to run is wrong: an unknown pass, option, target or precision, an option of
  the wrong type, an order that breaks a constraint, an unmet ``requires``, a bad instrument.
* ``TraceError`` / ``ExportError``: a model cannot be captured / a graph cannot be lowered to ONNX.
* ``PassError`` (``PassVerificationError``): a pass failed or changed what it must not; rolled back.
* ``BackendUnavailable``: a module, GPU or provider a step needs is missing.
* ``ArtifactError``: a saved artifact is missing, tampered with or of an unknown format.
"""

from __future__ import annotations


class FxCompressError(Exception):
    """Base class of all fxcompress errors."""


def short_reason(exc: BaseException) -> str:
    """``Type: first line of the message``: an exception as a clause of a longer error message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class TraceError(FxCompressError):
    """torch.fx could not trace the model; the message names the module, the line and the fix."""


class PipelineError(FxCompressError):
    """The pipeline itself is wrong (unknown pass or option, bad order, unmet requirement)."""


class PassError(FxCompressError):
    """A pass raised or left a broken graph; it was rolled back. The cause stays as ``__cause__``."""

    def __init__(self, message: str, *, pass_name: str = "", position: int = -1,
                 node: str | None = None, diff: str = "") -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.position = position
        self.node = node
        self.diff = diff


class PassVerificationError(PassError):
    """An exact pass changed the outputs; the message names the first divergent node."""


class ExportError(FxCompressError):
    """A graph could not be lowered to ONNX; the message names the FX node and its source module."""


class BackendUnavailable(FxCompressError):
    """A backend (module, GPU, provider) needed for this step is missing."""


class ArtifactError(FxCompressError):
    """A saved artifact is missing, tampered with, or of an unknown format version."""


class InputError(FxCompressError, ValueError, TypeError):
    """Bad input given to fxcompress: inputs that do not match what a model was compiled for, a
    graph without the shape metadata a function needs, an argument of the wrong type or value."""


class OpaqueModuleWarning(UserWarning):
    """Opaque modules hold a large share of the parameters: passes cannot compress them."""


class PassOrderWarning(UserWarning):
    """The pipeline's order goes against a pass's declared preference (``Pass.order_preferences``):
    it runs as given; the message names the suggested order and the reason."""
