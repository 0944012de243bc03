"""fxcompress: compress PyTorch models through torch.fx compiler passes."""

from __future__ import annotations

from .errors import (ArtifactError, BackendUnavailable, ExportError, FxCompressError, InputError,
                     PassError, PassVerificationError, PipelineError, TraceError)
from .pass_base import Diagnostic, OnnxPass, Pass, PassContext, PassResult

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "BackendUnavailable", "Diagnostic", "ExportError", "FxCompressError", "InputError",
    "OnnxPass", "Pass", "PassContext", "PassError", "PassResult", "PassVerificationError", "PipelineError",
    "TraceError", "__version__",
]
