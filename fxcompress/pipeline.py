"""The pass manager: ordering, verification, rollback and instrumentation.

``Pipeline`` runs passes in order on a copy of the graph. Before any work it rejects an order
that breaks a declared constraint (an FX pass after an ONNX pass, a pass whose ``requires``
nothing earlier provides). After each pass it owns ``recompile()``, ``lint()`` and shape
propagation; exact passes are checked numerically against the previous graph and, on a
mismatch, the first divergent node is named. Every pass's error against the original model
is recorded. A failing pass is rolled back (``on_error="skip"``) or raised as ``PassError``
with its name, position, node and graph diff (``on_error="raise"``).

``Pipeline`` and ``Repeat`` are passes themselves, so schedules nest.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
from torch.fx import GraphModule

from .backends.onnx_export import check_outputs
from .backends.onnxruntime import run_model
from .copying import copy_graph_module, own_parameters, parameter_versions, written_in_place
from .errors import FxCompressError, PassError, PassVerificationError, PipelineError
from .graph_text import diff as text_diff
from .graph_text import to_text
from .instruments import validate_instrument
from .onnx_graph import check_model, to_graph, to_model
from .options import format_pass, format_pipeline, nested_passes, not_in_pipeline_string
from .ordering import check_order, emit_order_warnings
from .pass_base import Diagnostic, Pass, PassContext, PassResult
from .registry import parse_pipeline, register
from .report import PassRecord, Report, Snapshot
from .stats import graph_stats, onnx_stats, untied_warnings
from .trace import opaque_shares
from .verify import (check_exact, error_metrics, first_divergent_node, first_divergent_onnx_node, fresh_inputs, lint,
                     output_mismatch, propagate_shapes, run_with_shapes)

if TYPE_CHECKING:  # pragma: no cover
    import onnx

OnError = Literal["raise", "skip"]
Lower = Callable[[GraphModule, PassContext], "onnx.ModelProto"]

@dataclass(frozen=True)
class Pipeline(Pass):
    """An ordered list of passes, itself a pass. ``Pipeline.parse("a,b{x=1}")`` builds one."""

    name: ClassVar[str] = "pipeline"
    passes: tuple[Pass, ...] = nested_passes()
    verify: bool = True
    on_error: OnError = "raise"
    instruments: tuple[Any, ...] = not_in_pipeline_string(())

    def __post_init__(self) -> None:
        passes = self.passes
        if isinstance(passes, str):
            passes = parse_pipeline(passes)
        passes = tuple(passes)
        for i, p in enumerate(passes):
            if not isinstance(p, Pass):
                hint = " (did you pass the class instead of an instance? add '()')" if isinstance(p, type) else ""
                raise PipelineError(f"item {i} of the pipeline is {p!r}, not a Pass{hint}")
        instruments = self.instruments or ()
        if isinstance(instruments, (str, bytes)) or not hasattr(instruments, "__iter__"):
            raise PipelineError(f"instruments must be a list of instrument objects, e.g. "
                                f"instruments=[fxc.PassTiming()]; got {instruments!r}")
        instruments = tuple(instruments)
        for i, instrument in enumerate(instruments):
            validate_instrument(instrument, f"instrument {i}")
        object.__setattr__(self, "passes", passes)
        object.__setattr__(self, "instruments", instruments)

    @classmethod
    def parse(cls, text: str, **options: Any) -> "Pipeline":
        return cls(tuple(parse_pipeline(text)), **options)

    def __str__(self) -> str:
        return format_pipeline(self.passes) if not self.options() else format_pass(self)

    def leaves(self) -> Iterator[Pass]:
        """The non-nested passes in execution order (a ``Repeat`` body appears once)."""
        for p in self.passes:
            if isinstance(p, (Pipeline, Repeat)):
                yield from p.leaves()
            else:
                yield p

    def schedule(self) -> Iterator[Pass]:
        """The non-nested passes as they execute: a ``Repeat`` body ``n`` times."""
        for p in self.passes:
            if isinstance(p, (Pipeline, Repeat)):
                yield from p.schedule()
            else:
                yield p

    def check(self, ctx: PassContext, stage: str = "fx") -> list[Diagnostic]:
        """Check the pass order before any pass runs: raise ``PipelineError`` on an order that breaks
        a hard constraint (an FX pass after an ONNX pass, a ``requires`` nothing earlier provides);
        return a warning ``Diagnostic`` for every declared soft preference the order goes against
        (``Pass.order_preferences``), with the suggested order and the reason.

        Positions are the report rows the passes would get (``#0`` is the ``input`` row, the
        ``export-onnx`` row comes before the first ONNX pass), as in run-time errors."""
        return check_order(list(self.schedule()), list(self.passes), ctx, stage)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        """Run as a nested pass (standalone use); records go into the result's stats."""
        outcome = self.apply(gm, ctx)
        return PassResult(graph=outcome.graph_module, stats={"report": outcome.report.to_dict()})

    def apply(self, gm: GraphModule, ctx: PassContext, *, lower: Lower | None = None,
              reference: Any = None, lower_at_end: bool = False, handed_over: bool = False) -> "Outcome":
        """Run the pipeline on a copy of ``gm``. ``lower`` turns the FX graph into ONNX when the
        first ONNX pass comes (or at the end with ``lower_at_end``). ``reference`` is the original
        model's output on the example inputs (computed from ``ctx.original`` when omitted).
        ``handed_over``: the caller just traced ``gm`` on ``ctx.example_inputs`` (shapes propagated)
        and gives it away, so it is neither copied nor propagated again (``compile`` does this).
        Otherwise the result shares no parameter with ``gm``."""
        order_warnings = self.check(ctx)
        emit_order_warnings(order_warnings, ctx)
        if any(p.stage == "onnx" for p in self.leaves()) and lower is None:
            raise PipelineError("this pipeline has ONNX passes but no lowering: use fxcompress.compile() "
                                "with an ONNX target, or pass lower=")
        run = _Run(self, ctx, lower, reference)
        run.pending = list(order_warnings)
        try:
            run.start(gm, handed_over)
            run.execute(self, prefix="", verify=self.verify, on_error=self.on_error)
            if lower_at_end and run.model is None:
                run.lower_now()
        except BaseException:
            run.end(quiet=True)
            raise
        run.end()
        outcome = run.finish()
        if not handed_over:  # the result must not change when the caller's graph does
            own_parameters(outcome.graph_module, gm)
        return outcome


@dataclass(frozen=True)
class Repeat(Pass):
    """Run ``passes`` ``n`` times: iterative schedules such as prune -> recover."""

    name: ClassVar[str] = "repeat"
    n: int = 1
    passes: tuple[Pass, ...] = nested_passes()

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise PipelineError(f"Repeat needs n >= 1; got {self.n!r}")
        object.__setattr__(self, "passes", Pipeline(tuple(self.passes)).passes)

    def leaves(self) -> Iterator[Pass]:
        return Pipeline(self.passes).leaves()

    def schedule(self) -> Iterator[Pass]:
        body = Pipeline(self.passes)
        for _ in range(self.n):
            yield from body.schedule()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return Pipeline((self,)).run(gm, ctx)


@dataclass
class Outcome:
    """The result of ``Pipeline.apply``."""

    graph_module: GraphModule
    onnx_model: "onnx.ModelProto | None"
    report: Report
    snapshots: list[Snapshot]
    #: ``graph_module``'s outputs on the example inputs (no caller has to run a large graph again)
    outputs: Any = None


def _weights_digest(module: torch.nn.Module) -> str:
    """Digest of every tensor the modules hold: the state dict, non-persistent buffers and plain
    tensor attributes (``self.scale = torch.tensor(2.0)`` in a leaf module); a pass may change any."""
    tensors = dict(module.state_dict())
    tensors.update(module.named_buffers())
    for path, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, torch.Tensor):
                tensors.setdefault(f"{path}.{key}" if path else key, value)
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _onnx_digest(model: "onnx.ModelProto") -> str:
    h = hashlib.blake2b(digest_size=16)
    for init in sorted(model.graph.initializer, key=lambda i: i.name):
        h.update(init.SerializeToString())
    return h.hexdigest()


class _Run:
    """The state of one pipeline execution."""

    def __init__(self, pipeline: Pipeline, ctx: PassContext, lower: Lower | None, reference: Any) -> None:
        self.pipeline = pipeline
        self.ctx = ctx
        self.lower = lower
        self.reference = reference
        self.instruments = tuple(pipeline.instruments)
        self.report = Report()
        self.snapshots: list[Snapshot] = []
        self.gm: GraphModule
        self.model: "onnx.ModelProto | None" = None
        self.outputs: Any = None
        #: outputs of ``self.gm`` (``self.outputs`` are the ONNX model's once lowered)
        self.fx_outputs: Any = None
        self.text = ""
        self.digest = ""
        self.started = False
        #: diagnostics for the ``input`` row (pass-order warnings found before the run)
        self.pending: list[Diagnostic] = []
        self._stats_cache: tuple[tuple[bool, str, str], dict[str, int]] | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _hook(self, hook: str, *args: Any) -> list[Any]:
        return [getattr(i, hook)(*args) for i in self.instruments if hasattr(i, hook)]

    def _run_fx(self, gm: GraphModule) -> Any:
        with torch.no_grad():
            return gm(*fresh_inputs(self.ctx.example_inputs))

    def _run_onnx(self, model: "onnx.ModelProto") -> Any:
        return run_model(model, self.ctx.example_inputs)

    def _text(self, graph: Any) -> str:
        return to_text(graph)

    def _stats(self, graph: Any) -> dict[str, int]:
        """Statistics of the current graph (the one ``self.text``/``self.digest`` describe): a pass
        that changed neither structure nor weights reuses the previous row's, so an unchanged step
        costs no second walk over a large graph."""
        key = (isinstance(graph, GraphModule), self.text, self.digest)
        if self._stats_cache is not None and self._stats_cache[0] == key:
            return dict(self._stats_cache[1])
        stats = self._measure(graph)
        self._stats_cache = (key, stats)
        return dict(stats)

    def _measure(self, graph: Any) -> dict[str, int]:
        if isinstance(graph, GraphModule):
            s = graph_stats(graph)
        else:
            s = onnx_stats(graph, [tuple(t.shape) for t in self.ctx.example_inputs])
        nodes = len(graph.graph.nodes) if isinstance(graph, GraphModule) else len(graph.graph.node)
        return {"nodes": nodes, "params": s.params, "nonzero": s.nonzero, "bytes": s.bytes, "macs": s.macs}

    def _record(self, name: str, stage: str, graph: Any, outputs: Any, *, seconds: float = 0.0,
                status: str = "ok", changed: bool = False, weights_changed: bool = False,
                result: PassResult | None = None) -> PassRecord:
        mismatch = output_mismatch(self.reference, outputs) if self.reference is not None else None
        err = error_metrics(self.reference, outputs).to_dict() if self.reference is not None and not mismatch else None
        row = PassRecord(index=len(self.report), name=name, stage=stage, status=status, changed=changed,
                         weights_changed=weights_changed, seconds=seconds, error=err, **self._stats(graph))
        found = list(result.diagnostics) if result is not None else self.pending
        self.pending = []
        row.diagnostics = [{"severity": d.severity, "message": d.message, "node": d.node} for d in found]
        if result is not None:
            row.stats = dict(result.stats)
            row.layers = list(result.layers)
        if mismatch:
            row.diagnostics.append({"severity": "warning", "node": None,
                                    "message": f"error vs the original model not measured: {mismatch}"})
        self.report.append(row)
        return row

    def _snapshot(self, name: str, stage: str, text: str) -> None:
        self.snapshots.append(Snapshot(len(self.snapshots), name, stage, text))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, gm: GraphModule, handed_over: bool = False) -> None:
        self.gm = gm if handed_over else copy_graph_module(gm, share_parameters=True)
        if not handed_over:
            propagate_shapes(self.gm, self.ctx.example_inputs)
        if self.lower is not None:  # before any pass runs: outputs ONNX cannot hold
            check_outputs(self.gm, warn_dict=False)
        if self.reference is None and self.ctx.original is not None:
            with torch.no_grad():
                self.reference = self.ctx.original(*fresh_inputs(self.ctx.example_inputs))
        self.outputs = self.fx_outputs = self._run_fx(self.gm)
        self.text = self._text(self.gm)
        self.digest = _weights_digest(self.gm)
        self.started = True
        self._hook("on_pipeline_start", self.pipeline, self.ctx)
        self._snapshot("input", "fx", self.text)
        row = self._record("input", "fx", self.gm, self.outputs)
        self._hook("after_pass", None, self.gm, row, self.ctx)

    def end(self, quiet: bool = False) -> None:
        """Call ``on_pipeline_end`` once, also when a pass raised (a progress bar must stop).
        ``quiet``: an instrument failing here is logged, not raised over the error in flight."""
        if not self.started:
            return
        self.started = False
        if not quiet:
            self._hook("on_pipeline_end", self.report, self.ctx)
            return
        for instrument in self.instruments:
            hook = getattr(instrument, "on_pipeline_end", None)
            if hook is None:
                continue
            try:
                hook(self.report, self.ctx)
            except Exception as exc:  # noqa: BLE001 - the pass error in flight matters more
                self.ctx.logger.warning("instrument %s failed in on_pipeline_end: %s", type(instrument).__name__, exc)

    def finish(self) -> Outcome:
        return Outcome(self.gm, self.model, self.report, self.snapshots, self.fx_outputs)

    def lower_now(self) -> None:
        assert self.lower is not None
        t0 = time.perf_counter()
        try:
            model = self.lower(self.gm, self.ctx)
        except FxCompressError:
            raise
        except Exception as exc:
            raise PassError(f"lowering to ONNX failed: {type(exc).__name__}: {exc}", pass_name="export-onnx",
                            position=len(self.report)) from exc
        seconds = time.perf_counter() - t0
        self.model = model
        self.outputs = self._run_onnx(model)
        self.text = self._text(model)
        self.digest = _onnx_digest(model)
        self._snapshot("export-onnx", "onnx", self.text)
        row = self._record("export-onnx", "onnx", model, self.outputs, seconds=seconds, changed=True)
        self._hook("after_pass", None, model, row, self.ctx)

    # -- execution ----------------------------------------------------------------------------
    def execute(self, p: Pass, prefix: str, verify: bool, on_error: OnError) -> None:
        if isinstance(p, Pipeline):
            for child in p.passes:
                self.execute(child, prefix, verify and p.verify, p.on_error)
        elif isinstance(p, Repeat):
            for k in range(p.n):
                for child in p.passes:
                    self.execute(child, f"{prefix}repeat[{k + 1}/{p.n}]/", verify, on_error)
        else:
            self.run_one(p, prefix, verify, on_error)

    def run_one(self, p: Pass, prefix: str, verify: bool, on_error: OnError) -> None:
        label = prefix + str(p)
        position = len(self.report)
        if p.stage == "onnx" and self.model is None:
            self.lower_now()
            position = len(self.report)
        current = self.gm if p.stage == "fx" else self.model
        if not all(self._hook("should_run", p, current, self.ctx)):
            self.report.append(PassRecord(index=position, name=label, stage=p.stage, status="not-run",
                                          **self._stats(current)))
            return
        self._hook("before_pass", p, current, self.ctx)
        t0 = time.perf_counter()
        try:
            new, result, outputs, text, digest = self._attempt(p, label, position, verify)
        except PassError as err:
            if on_error == "raise":
                raise
            self.ctx.logger.warning("%s", err)
            row = self._record(label, p.stage, current, self.outputs, seconds=time.perf_counter() - t0,
                               status="rolled-back")
            row.diagnostics.append({"severity": "error", "message": str(err), "node": err.node})
            self._hook("after_pass", p, current, row, self.ctx)
            return
        seconds = time.perf_counter() - t0
        changed, weights_changed = text != self.text, digest != self.digest
        if changed or weights_changed:
            keep = result.preserved if result.preserved is not None else p.preserves
            self.ctx.invalidate(keep)
        previous = current
        if p.stage == "fx":
            self.gm, self.fx_outputs = new, outputs
        else:
            self.model = new
        self.outputs, self.text, self.digest = outputs, text, digest
        self._snapshot(label, p.stage, text)
        row = self._record(label, p.stage, new, outputs, seconds=seconds, changed=changed,
                           weights_changed=weights_changed, result=result,
                           status="ok" if (changed or weights_changed) else "unchanged")
        if row.status == "unchanged" and p.stage == "fx":
            why = _why_unchanged(p, new, said=bool(row.diagnostics))
            if why:
                row.diagnostics.append({"severity": "info", "node": None, "message": why})
        if p.stage == "fx" and not isinstance(p, Pipeline):
            row.diagnostics += [{"severity": "warning", "message": m, "node": None}
                                for m in untied_warnings(previous, new)]
        self._hook("after_pass", p, new, row, self.ctx)

    def _attempt(self, p: Pass, label: str, position: int, verify: bool
                 ) -> tuple[Any, PassResult, Any, str, str]:
        """Run ``p`` on a copy of the current graph and check it; raises PassError (nothing changed)."""
        fail = _Failure(self, p, label, position)
        result = self._run_on_copy(p, fail)
        if p.stage == "fx":
            new, outputs = self._settle_fx(result, fail)
            text, digest = self._text(new), _weights_digest(new)
        else:
            new, outputs = self._settle_onnx(result, fail)
            text, digest = self._text(new), _onnx_digest(new)
        if verify and p.exact:
            self._verify_exact(p, new, outputs, result, fail)
        for d in result.diagnostics:
            if not isinstance(d, Diagnostic):
                raise fail(f"returned a diagnostic that is not a Diagnostic: {d!r}")
        for problem in self._hook("check", p, new, outputs, self.reference, self.ctx):
            if problem:
                raise fail(f"failed check: {problem}", after=new, cls=PassVerificationError)
        return new, result, outputs, text, digest

    def _run_on_copy(self, p: Pass, fail: "_Failure") -> PassResult:
        """``p.run`` on a copy of the current graph (sharing parameters when ``p`` declares it may)."""
        shares = p.stage == "fx" and bool(p.shares_weights) and not p.trains
        versions = parameter_versions(self.gm) if shares else {}
        work: Any = None
        try:
            work = copy_graph_module(self.gm, share_parameters=shares) if p.stage == "fx" else to_graph(self.model)
            result = p.run(work, self.ctx)
        except PassError as exc:
            raise fail(f"failed: {exc}", exc.node, exc, work) from exc
        except Exception as exc:
            raise fail(f"raised {type(exc).__name__}: {exc}", None, exc, work) from exc
        written = written_in_place(versions)
        if written:
            raise fail(f"wrote into parameter(s) {', '.join(written[:5])} of the graph it was given in place, "
                       "but declares shares_weights = True (those tensors are the graph before it too, which "
                       "could not be kept): replace what it changes (module.weight = nn.Parameter(new)) or "
                       "drop shares_weights")
        if not isinstance(result, PassResult):
            raise fail(f"returned {type(result).__name__}, not a PassResult")
        return result

    def _settle_fx(self, result: PassResult, fail: "_Failure") -> tuple[GraphModule, Any]:
        """What the manager owns after an FX pass: recompile, lint, shapes (and outputs, same run)."""
        new = result.graph
        if not isinstance(new, GraphModule):
            raise fail(f"returned a {type(new).__name__} graph, not a torch.fx.GraphModule")
        try:
            new.recompile()
            lint(new)
            outputs = run_with_shapes(new, self.ctx.example_inputs)
        except PassError as exc:
            raise fail(f"left a broken graph: {exc}", exc.node, exc, new) from exc
        except Exception as exc:
            raise fail(f"left a graph that does not run: {type(exc).__name__}: {exc}", None, exc, new) from exc
        return new, outputs

    def _settle_onnx(self, result: PassResult, fail: "_Failure") -> tuple[Any, Any]:
        """After an ONNX pass: back to a checked ``ModelProto``, and its outputs in ONNX Runtime."""
        try:
            new = to_model(result.graph, like=self.model)
            check_model(new)
            return new, self._run_onnx(new)
        except Exception as exc:
            raise fail(f"left an invalid ONNX graph: {type(exc).__name__}: {exc}", None, exc) from exc

    def _verify_exact(self, p: Pass, new: Any, outputs: Any, result: PassResult, fail: "_Failure") -> None:
        """An exact pass must reproduce the previous graph's outputs; else name the first divergent node."""
        verdict = check_exact(self.gm if p.stage == "fx" else None, self.ctx.example_inputs, self.outputs, outputs)
        if verdict.ok:
            return
        if p.stage == "fx":
            node = first_divergent_node(self.gm, new, self.ctx.example_inputs, result.replaces)
        else:
            node = first_divergent_onnx_node(self.model, new, self.ctx.example_inputs)
        raise fail(f"is declared exact but changed the outputs ({verdict.reason})", node, None, new,
                   cls=PassVerificationError)


class _Failure:
    """Builds the ``PassError`` of one pass attempt: its name, position, node and a diff of the graph."""

    def __init__(self, run: _Run, p: Pass, label: str, position: int) -> None:
        self.run, self.p, self.label, self.position = run, p, label, position
        self.before_text = run.text

    def __call__(self, message: str, node: str | None = None, cause: BaseException | None = None,
                 after: Any = None, cls: type[PassError] = PassError) -> PassError:
        diff = ""
        if after is not None:
            try:
                diff = text_diff(self.before_text, self.run._text(after), "before", f"after {self.p.name}")
            except Exception:  # noqa: BLE001 - a graph too broken to print has no diff
                diff = ""
        where = "" if not node else (f" (first divergent node: '{node}')" if cls is PassVerificationError
                                     else f" at node '{node}'")
        msg = f"pass '{self.label}' (#{self.position}) {message}{where}; it was rolled back"
        if diff:
            msg += "\n" + diff
        err = cls(msg, pass_name=self.p.name, position=self.position, node=node, diff=diff)
        err.__cause__ = cause
        return err


def _why_unchanged(p: Pass, graph: GraphModule, said: bool) -> str | None:
    """The report's word for a pass that rewrote nothing (compression that silently does nothing is a
    bug): that it found nothing, unless it ``said`` why itself, and the opaque modules it could not see."""
    opaque = graph.meta.get("opaque_modules", {})
    text = f"'{p.name}' found nothing to rewrite"
    if not opaque:
        return None if said else text
    shares = opaque_shares(graph)
    names = ", ".join(f"'{k}' ({shares.get(k, 0.0):.0%} of the parameters)" for k in opaque)
    return f"{text} outside opaque modules {names}, which no pass can see into"


def run_passes(gm: GraphModule, passes: Sequence[Pass] | str, ctx: PassContext, **options: Any) -> Outcome:
    """Shorthand: ``Pipeline(passes, **options).apply(gm, ctx)``."""
    return Pipeline(passes if isinstance(passes, str) else tuple(passes), **options).apply(gm, ctx)


register(Pipeline)
register(Repeat)
