"""fxcompress: compress PyTorch models through torch.fx compiler passes.

``compile(model, example_inputs, passes=[...], target=...)`` traces the model, runs the passes
through the pass manager, lowers to ONNX and builds an ONNX Runtime session or TensorRT engine.
"""

from __future__ import annotations

from .api import compile
from .artifact import Compiled, load
from .bench import BenchResult, benchmark
from .compare import Comparison, Tolerance
from .errors import (ArtifactError, BackendUnavailable, ExportError, FxCompressError, InputError,
                     PassError, PassVerificationError, PipelineError, TraceError)
from .instruments import Bisect, DumpGraphs, Evaluate, NumericCheck, PassTiming, PrintAfter, ProgressBar
from .pass_base import Diagnostic, OnnxPass, Pass, PassContext, PassResult
from .pipeline import Pipeline, Repeat, Snapshot
from .registry import available as available_passes
from .registry import parse_pipeline, register
from .report import PassRecord, Report
from .stats import GraphStats, LayerStats, graph_stats, onnx_stats

__version__ = "0.1.0"

__all__ = [
    "ArtifactError", "BackendUnavailable", "BenchResult", "Bisect", "Compiled", "Comparison", "Tolerance", "Diagnostic", "DumpGraphs", "Evaluate", "ExportError",
    "FxCompressError", "InputError", "NumericCheck", "OnnxPass", "Pass", "PassContext", "PassError",
    "PassRecord", "PassTiming", "PassVerificationError", "Pipeline", "PipelineError", "PrintAfter",
    "ProgressBar", "Repeat", "Report", "GraphStats", "LayerStats", "graph_stats", "onnx_stats", "Snapshot", "TraceError", "available_passes", "benchmark", "compile", "load",
    "parse_pipeline", "register", "__version__",
]
