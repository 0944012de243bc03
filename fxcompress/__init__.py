"""fxcompress: compress PyTorch models through torch.fx compiler passes.

``compile(model, example_inputs, passes=[...], target=...)`` traces the model, runs the passes
through the pass manager, lowers to ONNX and builds an ONNX Runtime session or TensorRT engine.
"""

from __future__ import annotations

from .api import compile
from .artifact import Compiled, load
from .bench import BenchResult, benchmark
from .compare import Comparison, Tolerance
from .errors import (
                     ArtifactError,
                     BackendUnavailable,
                     ExportError,
                     FxCompressError,
                     InputError,
                     PassError,
                     PassOrderWarning,
                     PassVerificationError,
                     PipelineError,
                     TraceError,
)
from .instruments import Bisect, DumpGraphs, Evaluate, NumericCheck, PassTiming, PrintAfter, ProgressBar
from .layer_rows import PassLayerRow
from .pass_base import (
                     Diagnostic,
                     OnnxPass,
                     OrderPreference,
                     Pass,
                     PassContext,
                     PassResult,
                     prefer_after,
                     prefer_before,
)
from .pipeline import Pipeline, Repeat, Snapshot
from .registry import available as available_passes
from .registry import parse_pipeline, register
from .report import PassRecord, Report
from .stats import GraphStats, LayerStats, graph_stats, onnx_stats

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "available_passes", "BackendUnavailable", "benchmark", "BenchResult", "Bisect",
    "Comparison", "compile", "Compiled", "Diagnostic", "DumpGraphs", "Evaluate", "ExportError",
    "FxCompressError", "graph_stats", "GraphStats", "InputError", "PassLayerRow", "LayerStats", "load",
    "NumericCheck", "onnx_stats", "OnnxPass", "OrderPreference", "parse_pipeline", "Pass", "PassContext",
    "PassError", "PassOrderWarning", "PassRecord", "prefer_after", "prefer_before",
    "PassResult", "PassTiming", "PassVerificationError", "Pipeline", "PipelineError", "PrintAfter",
    "ProgressBar", "register", "Repeat", "Report", "Snapshot", "Tolerance", "TraceError", "__version__",
]
