"""Pipeline instruments: objects with optional named hooks, called by the pass manager.

Hooks (all optional): ``on_pipeline_start(pipeline, ctx)``, ``should_run(pass_, graph, ctx) -> bool``,
``before_pass(pass_, graph, ctx)``, ``check(pass_, graph, outputs, reference, ctx) -> str | None``
(a message fails the pass, which is rolled back), ``after_pass(pass_, graph, record, ctx)``
(``pass_`` is None for the export step), ``on_pipeline_end(report, ctx)``.

``Pipeline`` rejects an instrument that is a class (not an instance) or has none of these hooks.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TextIO

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.fx import GraphModule

from .backends.onnxruntime import OrtRunner
from .errors import PipelineError
from .graph_text import to_text
from .pass_base import Pass, PassContext
from .report import PassRecord, Report, Snapshot
from .verify import ATOL, RTOL, allclose, error_metrics, output_mismatch

#: the hooks the pass manager calls, in the order of a run
HOOKS: tuple[str, ...] = ("on_pipeline_start", "should_run", "before_pass", "check", "after_pass",
                          "on_pipeline_end")


def validate_instrument(instrument: Any, where: str = "instrument") -> None:
    """Raise ``PipelineError`` unless ``instrument`` is an object with at least one callable hook."""
    if isinstance(instrument, type):
        raise PipelineError(f"{where} is the class {instrument.__name__}, not an instance; add '()': "
                            f"{instrument.__name__}() instead of {instrument.__name__}")
    hooks = [h for h in HOOKS if callable(getattr(instrument, h, None))]
    if not hooks:
        raise PipelineError(f"{where} {instrument!r} ({type(instrument).__name__}) has none of the instrument "
                            f"hooks, so it would never be called; define at least one of: {', '.join(HOOKS)}")


def _check_arity(fn: Any, params: str, what: str) -> None:
    """Fail now, not mid-pipeline, when ``fn`` cannot be called with the arguments ``params`` names."""
    if not callable(fn):
        raise PipelineError(f"{what} must be a callable taking ({params}); got {fn!r}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind(*([None] * len(params.split(","))))
    except TypeError:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise PipelineError(f"{what} is called as f({params}), but {name}{signature} cannot take those "
                            f"arguments; e.g. lambda {params}: ...") from None


def _matches(p: Pass | None, names: Iterable[str]) -> bool:
    names = set(names)
    return p is not None and (not names or p.name in names or type(p).__name__ in names)


class PrintAfter:
    """Print the canonical graph text after the named passes (all passes when ``names`` is empty)."""

    def __init__(self, names: Iterable[str] = (), stream: TextIO | None = None) -> None:
        self.names = tuple(names)
        self.stream = stream

    def after_pass(self, p: Pass | None, graph: Any, record: PassRecord, ctx: PassContext) -> None:
        if _matches(p, self.names):
            print(f"// after {record.name}\n{to_text(graph)}", file=self.stream or sys.stdout)


class DumpGraphs:
    """Write the canonical text of the input and of every kept step into ``directory``, numbered
    and named as the snapshots (and so as an artifact's ``graphs/``): ``03_prune-channels.fxg``.
    A rolled-back pass leaves no file, as it leaves no snapshot."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index = 0

    def on_pipeline_start(self, pipeline: Any, ctx: PassContext) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index = 0

    def after_pass(self, p: Pass | None, graph: Any, record: PassRecord, ctx: PassContext) -> None:
        if record.status == "rolled-back":
            return
        snap = Snapshot(self._index, record.name, record.stage, to_text(graph))
        self._index += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / snap.filename).write_text(snap.text, encoding="utf-8")


class PassTiming:
    """Collect wall time per pass name; ``summary()`` is sorted slowest first."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def after_pass(self, p: Pass | None, graph: Any, record: PassRecord, ctx: PassContext) -> None:
        key = p.name if p is not None else record.name
        self.times[key] = self.times.get(key, 0.0) + record.seconds

    def summary(self) -> list[tuple[str, float]]:
        return sorted(self.times.items(), key=lambda kv: -kv[1])


class NumericCheck:
    """Fail (and roll back) any pass whose outputs drift from the original model beyond limits.

    Limits: ``max_abs`` (largest absolute error), ``min_cosine`` (cosine similarity of the flat
    outputs), ``min_top1`` (top-1 agreement for logits). With no limit given, the outputs must
    match the original as the pipeline checks exact passes: fp32 ``rtol`` ``verify.RTOL`` (1e-4)
    and ``atol`` ``verify.ATOL`` (1e-5), i.e. the whole pipeline so far must preserve outputs."""

    def __init__(self, max_abs: float | None = None, min_cosine: float | None = None,
                 min_top1: float | None = None) -> None:
        for option, value, low, high in (("max_abs", max_abs, 0.0, float("inf")), ("min_cosine", min_cosine, -1.0, 1.0),
                                         ("min_top1", min_top1, 0.0, 1.0)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and low <= value <= high):
                raise PipelineError(f"NumericCheck({option}=...) must be a number in [{low:g}, {high:g}] or "
                                    f"None; got {value!r}")
        self.max_abs, self.min_cosine, self.min_top1 = max_abs, min_cosine, min_top1
        self.exact = max_abs is None and min_cosine is None and min_top1 is None

    def check(self, p: Pass, graph: Any, outputs: Any, reference: Any, ctx: PassContext) -> str | None:
        if reference is None:
            return None
        mismatch = output_mismatch(reference, outputs)
        if mismatch is not None:
            return f"{mismatch} vs the original model"
        m = error_metrics(reference, outputs)
        if self.exact and not allclose(reference, outputs, RTOL, ATOL):
            return (f"outputs differ from the original model beyond rtol {RTOL:g}, atol {ATOL:g} (max abs error "
                    f"{m.max_abs:.3g}); give NumericCheck limits such as max_abs= or min_cosine= for a lossy pass")
        if self.max_abs is not None and not m.max_abs <= self.max_abs:  # a NaN error fails too
            return f"max abs error {m.max_abs:.3g} > {self.max_abs:g} vs the original model"
        if self.min_cosine is not None and not m.cosine >= self.min_cosine:
            return f"cosine similarity {m.cosine:.6f} < {self.min_cosine:g} vs the original model"
        if self.min_top1 is not None and m.top1 is not None and m.top1 < self.min_top1:
            return f"top-1 agreement {m.top1:.3f} < {self.min_top1:g} vs the original model"
        return None


class Bisect:
    """Find the first pass after which ``check(graph, ctx)`` stops holding.

    ``culprit`` is that pass's report name (None while every step passes); nothing is rolled back."""

    def __init__(self, check: Callable[[Any, PassContext], bool]) -> None:
        _check_arity(check, "graph, ctx", "Bisect(check)")
        self._check = check
        self.culprit: str | None = None
        self.culprit_index: int | None = None

    def after_pass(self, p: Pass | None, graph: Any, record: PassRecord, ctx: PassContext) -> None:
        if self.culprit is None and record.status != "rolled-back" and not self._check(graph, ctx):
            self.culprit, self.culprit_index = record.name, record.index


class ProgressBar:
    """A rich progress bar over the pipeline, and ``ctx.progress`` for long passes (calibration, training)."""

    def __init__(self, transient: bool = True) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=transient)
        self._task: Any = None

    def on_pipeline_start(self, pipeline: Any, ctx: PassContext) -> None:
        self.progress.start()
        self._task = self.progress.add_task("passes", total=sum(1 for _ in pipeline.schedule()), info="")
        ctx.progress = self.task

    def before_pass(self, p: Pass, graph: Any, ctx: PassContext) -> None:
        self.progress.update(self._task, info=p.name)

    def after_pass(self, p: Pass | None, graph: Any, record: PassRecord, ctx: PassContext) -> None:
        if p is not None:
            self.progress.advance(self._task)

    def on_pipeline_end(self, report: Report, ctx: PassContext) -> None:
        self.progress.stop()

    @contextmanager
    def task(self, description: str = "", total: float | None = None) -> Iterator[Any]:
        tid = self.progress.add_task(description, total=total, info="")
        handle = _TaskHandle(self.progress, tid)
        try:
            yield handle
        finally:
            self.progress.remove_task(tid)


class _TaskHandle:
    def __init__(self, progress: Any, tid: Any) -> None:
        self.progress, self.tid = progress, tid

    def advance(self, n: float = 1, **fields: Any) -> None:
        info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self.progress.update(self.tid, advance=n, info=info)


class Evaluate:
    """Score the graph after every step with ``metric(run) -> float`` and store it in the row's
    stats under ``name`` (e.g. test-set accuracy of each stage). ``run`` takes a batch tensor:
    the GraphModule for FX steps, an ONNX Runtime session for ONNX steps."""

    def __init__(self, metric: Callable[[Callable[..., Any]], float], name: str = "accuracy") -> None:
        _check_arity(metric, "run", "Evaluate(metric)")
        self.metric, self.name = metric, name
        self.values: dict[str, float] = {}

    def after_pass(self, p: Pass | None, graph: Any, record: PassRecord, ctx: PassContext) -> None:
        if record.status == "rolled-back":
            return
        if isinstance(graph, GraphModule):
            run: Callable[..., Any] = graph
        else:
            run = OrtRunner(graph)
        value = float(self.metric(run))
        record.stats[self.name] = value
        self.values[record.name] = value
