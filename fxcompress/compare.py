"""Per-layer fidelity across stages: original torch -> rewritten FX -> ONNX Runtime -> TensorRT.

``compare(original, graph_module, onnx_model, inputs)`` runs every stage it is given on the same
inputs and lines the intermediate results up per FX node, in graph order:

* **original** (eager ``nn.Module``, a private eval-mode copy): per-module outputs captured with
  forward hooks, keyed by module path and call order. An FX ``call_module`` node is paired with
  the eager output of its module path. When the original traces, the mapping goes through that
  trace: a node absorbed by a rewrite (a BatchNorm folded into its Conv, a dropout removed) moves
  the counterpart to the end of the absorbed chain, so a folded Conv is compared with the eager
  BatchNorm output. A ``call_function``/``call_method`` node has a counterpart only in the original
  trace, when a node of the same name applies the same target to corresponding inputs (in the
  unchanged original trace: every node).
* **fx** (the rewritten ``GraphModule``): every node's output (cloned as produced, so in-place
  modules such as ``ReLU(inplace=True)`` cannot overwrite a recorded value).
* **ort**: the ONNX model with every intermediate tensor exposed as a graph output; each tensor
  maps back to its FX node through the exporter's provenance (``fxcompress.onnx_graph``). The
  ``output`` row comes from the unmodified model (the deployed session, with its fusions).
* **trt**: on an NVIDIA GPU, a TensorRT engine of the exposed model (per layer) and the given
  engine (``output`` row). Elsewhere the stage is ``"not run: <reason>"``.

Each stage is compared with the one before it: fx vs original, ort vs fx, trt vs ort. Tensors of
different shapes (a layout change) are skipped with a note. ``Comparison.first_divergent(stage)``
is the first row where that stage leaves the tolerance (``Tolerance``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .errors import FxCompressError, InputError
from .verify import as_inputs, flatten_outputs, fresh_inputs, node_values as _fx_values, snapshot as _snapshot

__all__ = ["STAGES", "Comparison", "LayerRow", "Metric", "Tolerance", "compare", "load_inputs",
           "rebuild_graph"]

#: stage -> (title, stage it is compared with)
STAGES: dict[str, tuple[str, str]] = {
    "fx": ("FX vs original", "original"),
    "ort": ("ORT vs FX", "fx"),
    "trt": ("TRT vs ORT", "ort"),
}
TRT_TARGETS = ("tensorrt", "tensorrt-rtx")


# ----------------------------------------------------------------------------- tolerance


@dataclass(frozen=True)
class Tolerance:
    """When a layer counts as drifted: ``cosine < min_cosine`` or
    ``max_abs > max_abs_rel * max(1, |ref|max)``.

    Defaults: fp32 backends agree with torch to ~1e-6 relative per layer, so ``max_abs_rel=1e-3``
    leaves three orders of magnitude for kernel differences while a wrong weight, a bad rewrite or
    fp16 rounding crosses it; ``min_cosine=0.999`` (a relative L2 error of about 4.5%) catches a
    layer whose direction changed even when its scale is tiny. The cosine test is not applied
    when ``max_abs <= noise * max(1, |ref|max)``: both tensors are then equal up to float noise,
    and the cosine of near-zero tensors means nothing.

    Q/DQ graphs: a DequantizeLinear output may differ by ``quant_steps`` quantization steps (its
    scale): when the input of a QuantizeLinear lies on a rounding boundary, float noise upstream
    flips it by one step in one backend and not the other. The flip then propagates: the next
    Conv/MatMul differs by about ``step * sum|w|``, which exceeds the fp32 default. Measured with
    the ``int8`` recipe on the zoo's resnet_basic and inverted_residual (three calibrations each,
    ORT vs FX): worst max abs 1.2e-2 x max(1,|ref|max), lowest cosine 0.99999. Compare INT8 graphs
    with ``Tolerance(max_abs_rel=5e-2)`` (``--tolerance abs=5e-2``); the cosine test still holds.
    """

    min_cosine: float = 0.999
    max_abs_rel: float = 1e-3
    noise: float = 1e-6
    quant_steps: float = 1.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_cosine <= 1.0:
            raise InputError(f"Tolerance.min_cosine must be in [-1, 1], got {self.min_cosine}")
        for name in ("max_abs_rel", "noise", "quant_steps"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise InputError(f"Tolerance.{name} must be a finite number >= 0, got {value}")

    def abs_limit(self, ref_max: float) -> float:
        """The largest max-abs error allowed for a reference whose largest magnitude is ``ref_max``."""
        return self.max_abs_rel * max(1.0, ref_max)

    def drifts(self, max_abs: float, cosine: float, ref_max: float, step: float = 0.0) -> bool:
        """Whether a layer drifted; ``step`` is the quantization step of a DequantizeLinear output."""
        if math.isnan(max_abs) or math.isnan(cosine):
            return True
        if max_abs > max(self.abs_limit(ref_max), self.quant_steps * step + self.noise * max(1.0, ref_max)):
            return True
        return max_abs > self.noise * max(1.0, ref_max) and cosine < self.min_cosine

    @classmethod
    def parse(cls, text: str) -> "Tolerance":
        """``"cosine=0.99,abs=1e-2"`` (any of ``cosine``, ``abs``, ``noise``, ``steps``), or a bare
        number for ``abs`` (the max-abs limit relative to ``max(1, |ref|max)``)."""
        keys = {"cosine": "min_cosine", "abs": "max_abs_rel", "noise": "noise", "steps": "quant_steps"}
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, raw = part.partition("=")
            if not sep:
                key, raw = "abs", key
            key = key.strip().lower()
            if key not in keys:
                raise InputError(f"tolerance {text!r}: unknown key {key!r}; use cosine=..., abs=..., "
                                 "noise=..., steps=... (e.g. 'cosine=0.999,abs=1e-3')")
            try:
                values[keys[key]] = float(raw)
            except ValueError:
                raise InputError(f"tolerance {text!r}: {key}={raw!r} is not a number") from None
        if not values:
            raise InputError(f"tolerance {text!r}: give cosine=..., abs=... or a number")
        return cls(**values)

    def __str__(self) -> str:
        steps = f" (Q/DQ outputs: or {self.quant_steps:g} step)" if self.quant_steps else ""
        return f"cosine < {self.min_cosine:g} or max abs > {self.max_abs_rel:g}*max(1,|ref|max){steps}"


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Metric:
    """One stage's error at one layer, against the stage before it (``against`` names what)."""

    max_abs: float
    cosine: float
    ref_max: float
    drift: bool
    against: str

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


@dataclass
class LayerRow:
    """One FX node: its error per stage, or why a stage has none (``notes[stage]``)."""

    index: int
    node: str
    op: str
    kind: str
    shape: tuple[int, ...] | None
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def drifted(self, stage: str) -> bool:
        m = self.metrics.get(stage)
        return m is not None and m.drift

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "node": self.node, "op": self.op, "kind": self.kind,
                "shape": list(self.shape) if self.shape is not None else None,
                "metrics": {s: m.to_dict() for s, m in self.metrics.items()}, "notes": dict(self.notes)}


@dataclass
class Comparison:
    """Per-layer rows in graph order; ``stages[s]`` is ``"ran"``, ``"not run: <reason>"`` or
    ``"omitted: <reason>"``."""

    rows: list[LayerRow]
    stages: dict[str, str]
    tolerance: Tolerance
    notes: list[str] = field(default_factory=list)

    def ran(self, stage: str) -> bool:
        return self.stages.get(stage) == "ran"

    def first_divergent(self, stage: str) -> LayerRow | None:
        """The first row (graph order) where ``stage`` drifts beyond the tolerance, else None."""
        if stage not in STAGES:
            raise InputError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        return next((r for r in self.rows if r.drifted(stage)), None)

    def summary(self) -> list[str]:
        """One line per stage: status, and the first divergent layer when there is one."""
        lines = []
        for stage, (title, _) in STAGES.items():
            status = self.stages.get(stage, "omitted")
            if status != "ran":
                lines.append(f"{title}: {status}")
                continue
            row = self.first_divergent(stage)
            if row is None:
                compared = sum(stage in r.metrics for r in self.rows)
                lines.append(f"{title}: no divergent layer ({compared} compared; drift = {self.tolerance})")
            else:
                m = row.metrics[stage]
                lines.append(f"{title}: first divergent layer: {row.node} ({row.kind}), "
                             f"max abs {m.max_abs:.3g}, cosine {m.cosine:.6f}, vs {m.against}")
        return lines

    def table(self) -> Any:
        """A rich ``Table``: one row per layer, one column per stage that ran (or could run)."""
        from rich.markup import escape
        from rich.table import Table

        shown = [s for s in STAGES if not self.stages.get(s, "omitted").startswith("omitted")]
        first = {s: self.first_divergent(s) for s in shown}
        table = Table(title="per-layer error across stages", caption=escape("\n".join(self.caption())),
                      caption_justify="left")
        table.add_column("#", justify="right")
        table.add_column("node", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        for s in shown:
            title = STAGES[s][0]
            status = self.stages[s]
            header = f"{title}\nmax abs  cosine" if status == "ran" else f"{title}\n{escape(_short(status))}"
            table.add_column(header, no_wrap=True)
        for row in self.rows:
            cells = [str(row.index), escape(row.node), escape(row.kind), _fmt_shape(row.shape)]
            for s in shown:
                cells.append(self._cell(row, s, first[s]))
            table.add_row(*cells)
        return table

    def render(self, width: int | None = None) -> str:
        """The table as plain text, ``width`` columns wide (default: as wide as the table needs)."""
        import io

        from rich.console import Console

        table = self.table()
        probe = Console(file=io.StringIO(), width=10_000)
        width = width or max(probe.measure(table).maximum, *(len(line) for line in self.caption()))
        out = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
        out.print(table)
        return "\n".join(line.rstrip() for line in out.file.getvalue().rstrip("\n").splitlines())

    def _cell(self, row: LayerRow, stage: str, first: LayerRow | None) -> str:
        if self.stages[stage] != "ran":
            return "-"
        m = row.metrics.get(stage)
        if m is None:
            note = row.notes.get(stage, "")
            return "[dim]" + ("skipped: shape" if note.startswith("shapes differ") else "n/a") + "[/dim]"
        text = f"{m.max_abs:8.2e}  {m.cosine:.6f}"
        if first is row:
            return f"[bold red]{text} << first[/bold red]"
        return f"[red]{text}[/red]" if m.drift else text

    def caption(self) -> list[str]:
        """The drift rule, the notes and the skipped tensors (stage statuses are in ``summary()``)."""
        lines = [f"drift: {self.tolerance}"]
        lines += self.notes
        skipped = [(r.node, s, n) for r in self.rows for s, n in r.notes.items()
                   if n.startswith("shapes differ")]
        lines += [f"{node} ({STAGES[s][0]}): {note}" for node, s, note in skipped]
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": asdict(self.tolerance),
            "stages": dict(self.stages),
            "first_divergent": {s: (r.node if (r := self.first_divergent(s)) else None) for s in STAGES},
            "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
        }


def _finite(v: Any) -> Any:
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def _short(status: str) -> str:
    """The status up to its first ';' or '(' (column headers stay narrow; ``summary()`` has it all)."""
    head = status.split(";")[0].split(" (")[0].strip()
    return head if len(head) <= 60 else head[:59] + "…"


def _fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "x".join(map(str, shape)) or "scalar"


# ----------------------------------------------------------------------------- running the stages


def _eager_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[str, list[Any]], Any]:
    """Outputs of every submodule call of a private eval copy of ``model``: path -> one entry per call."""
    model = copy.deepcopy(model).eval()
    calls: dict[str, list[Any]] = {}
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(_m: nn.Module, _args: Any, out: Any, path: str = path) -> None:
            calls.setdefault(path, []).append(_snapshot(out))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            final = _snapshot(model(*fresh_inputs(inputs)))
    finally:
        for h in handles:
            h.remove()
    return calls, final


def _tensors(value: Any) -> list[torch.Tensor]:
    return flatten_outputs(value)


def _kind(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        try:
            return type(gm.get_submodule(str(node.target))).__name__
        except AttributeError:
            return str(node.target)
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "output":
        return "output"
    return getattr(node.target, "__name__", str(node.target))


# ----------------------------------------------------------------------------- original <-> FX mapping


class _OriginalMap:
    """Finds the original model's value for a node of the (possibly rewritten) FX graph."""

    def __init__(self, original: nn.Module, gm: GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
        self.calls, self.final = _eager_outputs(original, inputs)
        self.gm_nodes = {n.name: n for n in gm.graph.nodes}
        self.gm_occurrence = _occurrences(gm)
        self.g0: GraphModule | None = None
        self.g0_values: dict[str, Any] = {}
        self.trace_note: str | None = None
        try:
            from .trace import trace

            self.g0 = trace(original, inputs)
            self.g0_values = _fx_values(self.g0, inputs)
        except Exception as exc:  # noqa: BLE001 - without the trace, modules still map by path
            self.trace_note = (f"the original model does not trace ({type(exc).__name__}: {str(exc)[:120]}); "
                               "call_module nodes map by module path only and call_function nodes have no "
                               "counterpart")
        self.g0_nodes = {n.name: n for n in self.g0.graph.nodes} if self.g0 is not None else {}
        self.g0_occurrence = _occurrences(self.g0) if self.g0 is not None else {}

    def _resolve(self, n0: Node) -> Node:
        """The last node of the original trace's chain ``n0 -> a -> b ...`` absorbed by the rewrite.

        A node is absorbed (a folded BatchNorm, a removed dropout) when it is gone from the rewritten
        graph, was the only user of the node before it, and the nodes that read it in the original
        now read the rewritten ``n0`` instead. A node gone for another reason (replaced by a node of
        another name) ends nothing: ``n0`` is then compared as it is.
        """
        best = cur = n0
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.name in self.gm_nodes or user.op not in ("call_module", "call_function", "call_method"):
                break
            if not user.args or user.args[0] is not cur:
                break
            cur = user
            readers = [self.gm_nodes.get(u.name) for u in cur.users]
            mine = self.gm_nodes.get(n0.name)
            if readers and all(r is not None and mine in r.all_input_nodes for r in readers):
                best = cur
        return best

    def _value_of(self, n0: Node) -> tuple[Any, str] | None:
        if n0.op == "call_module":
            k = self.g0_occurrence.get(n0.name, 0)
            outs = self.calls.get(str(n0.target), [])
            if k < len(outs):
                return outs[k], _call_label(str(n0.target), k, len(outs))
            return None
        if n0.name in self.g0_values:
            return self.g0_values[n0.name], f"original trace %{n0.name}"
        return None

    def counterpart(self, node: Node) -> tuple[Any, str] | str:
        """``(value, label)`` of the original's counterpart, or a note saying why there is none."""
        if node.op == "output":
            return self.final, "original output"
        n0 = self.g0_nodes.get(node.name)
        if node.op == "call_module":
            path = str(node.target)
            if n0 is not None and n0.op == "call_module" and str(n0.target) == path:
                end = self._resolve(n0)
                found = self._value_of(end)
                if found is not None:
                    value, label = found
                    if end is not n0:
                        label += f" ({_absorbed(n0, end)} absorbed)"
                    return value, label
            outs = self.calls.get(path)
            if not outs:
                return f"module {path!r} is not called by the original model"
            k = self.gm_occurrence.get(node.name, 0)
            if k >= len(outs):
                return (f"module {path!r} is called {len(outs)} time(s) by the original model, "
                        f"this is call #{k + 1}")
            return outs[k], _call_label(path, k, len(outs))
        if node.op not in ("call_function", "call_method"):
            return f"{node.op} node"
        if n0 is None or n0.op != node.op or n0.target != node.target:
            return "no node of this name and target in the original trace" if self.g0 is not None \
                else "no eager counterpart for a call_function node (the original does not trace)"
        if not self._same_inputs(node, n0):
            return "its inputs are not those of the original trace's node of the same name (rewritten)"
        end = self._resolve(n0)
        found = self._value_of(end)
        if found is None:
            return "no recorded value in the original trace"
        value, label = found
        return value, label + (f" ({_absorbed(n0, end)} absorbed)" if end is not n0 else "")

    def _same_inputs(self, node: Node, n0: Node) -> bool:
        def mine(a: Node) -> str:
            twin = self.g0_nodes.get(a.name)
            return self._resolve(twin).name if twin is not None else f"<new {a.name}>"

        try:
            return map_arg((node.args, node.kwargs), mine) == map_arg((n0.args, n0.kwargs), lambda b: b.name)
        except Exception:  # noqa: BLE001 - arguments that do not compare (tensors) mean "not the same"
            return False


def _occurrences(gm: GraphModule) -> dict[str, int]:
    """call_module node name -> how many earlier call_module nodes target the same module."""
    seen: dict[str, int] = {}
    out: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.name] = seen.get(str(n.target), 0)
            seen[str(n.target)] = out[n.name] + 1
    return out


def _call_label(path: str, k: int, total: int) -> str:
    return f"module {path}" + (f" call #{k + 1}" if total > 1 else "")


def _absorbed(n0: Node, end: Node) -> str:
    names = []
    cur = n0
    while cur is not end:
        (cur,) = cur.users
        names.append(cur.name)
    return ", ".join(names)


# ----------------------------------------------------------------------------- ONNX Runtime / TensorRT


@dataclass
class _Backends:
    """What the ONNX side produced: FX node -> ONNX result tensors, the op type making each layer's
    result, the quantization step of DequantizeLinear outputs, and the values per backend."""

    layers: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)
    ort: dict[str, torch.Tensor] = field(default_factory=dict)
    ort_finals: list[torch.Tensor] = field(default_factory=list)
    trt: dict[str, torch.Tensor] = field(default_factory=dict)
    trt_finals: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto) -> "_Backends":
        from .onnx_facts import constant_tensors
        from .onnx_graph import fx_node_outputs

        layers = fx_node_outputs(model)
        producer = {o: n.op_type for n in model.graph.node for o in n.output}
        constants = constant_tensors(model)
        steps = {}
        for n in model.graph.node:
            if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[1] in constants:
                scale = numpy_helper.to_array(constants[n.input[1]])
                steps[n.output[0]] = float(np.abs(scale).max()) if scale.size else 0.0
        return cls(layers, {fx: producer.get(names[-1], "?") for fx, names in layers.items()}, steps)

    def step(self, names: Sequence[str]) -> float:
        return max((self.steps.get(n, 0.0) for n in names), default=0.0)


def _run_ort(model: onnx.ModelProto, names: list[str], inputs: tuple[torch.Tensor, ...],
             optimization: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Intermediate tensors ``names`` (from a copy exposing them) and the unmodified model's outputs."""
    from .backends.onnxruntime import OrtRunner
    from .onnx_graph import expose_outputs

    deployed = OrtRunner(model, optimization=optimization)
    finals = [torch.from_numpy(np.asarray(o)) for o in deployed.run_numpy(*inputs)]
    exposed = OrtRunner(expose_outputs(model, names), optimization=optimization)
    outs = exposed.session.run(names, exposed.feed(*inputs)) if names else []
    return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(names, outs)}, finals


def _trt_status(engine: bytes | None, target: str | None) -> str | None:
    """None when TensorRT can run here, else why not."""
    if target is None:
        return ("not run: no TensorRT engine or target given (pass target='tensorrt-rtx' or 'tensorrt')"
                if engine is None else "not run: an engine was given without its target ('tensorrt' or "
                "'tensorrt-rtx')")
    if target not in TRT_TARGETS:
        return f"not run: target {target!r} is not a TensorRT target ({', '.join(TRT_TARGETS)})"
    from .backends import tensorrt as trt_backend

    if not trt_backend.gpu_available():
        return (f"not run: running a {target} engine needs an NVIDIA GPU; torch.cuda.is_available() is False "
                f"here (torch {torch.__version__})")
    if not trt_backend.module_available(target):
        module, package = trt_backend.TARGETS[target]
        return f"not run: module '{module}' is not installed (pip install {package})"
    return None


def layer_engine(model: onnx.ModelProto, names: Sequence[str], inputs: tuple[torch.Tensor, ...], target: str,
                 precision: str = "fp32") -> Any:
    """A TensorRT ``EngineBuild`` of ``model`` with the tensors ``names`` marked as outputs (what the
    TRT column runs; building needs no GPU for ``tensorrt-rtx``)."""
    from .backends import tensorrt as trt_backend
    from .onnx_graph import expose_outputs

    exposed = expose_outputs(model, list(names))
    options = trt_backend.BuildOptions.from_compile(precision=precision, example_inputs=inputs, onnx_model=exposed)
    return trt_backend.build_engine(exposed, target, options)


def _run_trt(model: onnx.ModelProto, names: list[str], inputs: tuple[torch.Tensor, ...], engine: bytes | None,
             target: str, precision: str) -> tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]:
    """Per-layer values from an engine built with ``names`` marked as outputs, and the given
    engine's outputs."""
    from .backends import tensorrt as trt_backend

    finals = None
    if engine is not None:
        out = trt_backend.TrtRunner(engine, target)(*inputs)
        finals = [t.cpu() for t in _tensors(out)]
    values: dict[str, torch.Tensor] = {}
    if names:
        runner = trt_backend.TrtRunner(layer_engine(model, names, inputs, target, precision).engine, target)
        outs = runner(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        values = {n: t.cpu() for n, t in zip(runner.output_names, outs)}
    return values, finals


# ----------------------------------------------------------------------------- metrics


def _metric(ref: torch.Tensor, act: torch.Tensor, tol: Tolerance, against: str, step: float = 0.0) -> Metric:
    r = ref.detach().to("cpu", torch.float64).flatten()
    a = act.detach().to("cpu", torch.float64).flatten()
    if r.numel() == 0:
        return Metric(0.0, 1.0, 0.0, False, against)
    diff = (r - a).abs()
    max_abs = float(diff.max())
    ref_max = float(r.abs().max())
    denom = float(r.norm() * a.norm())
    if denom > 0:
        cosine = float(r @ a) / denom
    else:
        cosine = 1.0 if max_abs == 0 else 0.0
    if math.isnan(max_abs) or not math.isfinite(denom):
        max_abs, cosine = float("nan"), float("nan")
    return Metric(max_abs, cosine, ref_max, tol.drifts(max_abs, cosine, ref_max, step), against)


def _worst(metrics: list[Metric]) -> Metric:
    return Metric(
        max_abs=max(m.max_abs for m in metrics), cosine=min(m.cosine for m in metrics),
        ref_max=max(m.ref_max for m in metrics), drift=any(m.drift for m in metrics),
        against=metrics[0].against)


def _pairs(refs: list[torch.Tensor], acts: list[torch.Tensor]
           ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str | None]:
    """Tensors to compare (same shapes), and a note for those that could not be paired."""
    if not refs or not acts:
        return [], "no tensor value"
    if len(refs) == len(acts) and all(r.shape == a.shape for r, a in zip(refs, acts)):
        return list(zip(refs, acts)), None
    used: set[int] = set()
    pairs = []
    for r in refs:
        found = [i for i, a in enumerate(acts) if i not in used and a.shape == r.shape]
        if found:
            i = found[-1] if len(refs) == 1 else found[0]
            used.add(i)
            pairs.append((r, acts[i]))
    if len(pairs) == len(refs):
        return pairs, None
    ref_shapes = ", ".join(_fmt_shape(tuple(r.shape)) for r in refs)
    act_shapes = ", ".join(_fmt_shape(tuple(a.shape)) for a in acts)
    if pairs:
        return pairs, (f"compared {len(pairs)} of {len(refs)} tensors ({ref_shapes}); the others have no "
                       f"counterpart of the same shape ({act_shapes})")
    return pairs, f"shapes differ: {ref_shapes} vs {act_shapes} (a layout change?); skipped"


def _fill(row: LayerRow, stage: str, refs: list[torch.Tensor], acts: list[torch.Tensor], tol: Tolerance,
          against: str, step: float = 0.0) -> None:
    pairs, note = _pairs(refs, acts)
    if pairs:
        row.metrics[stage] = _worst([_metric(r, a, tol, against, step) for r, a in pairs])
    if note:
        row.notes[stage] = note


# ----------------------------------------------------------------------------- compare


def compare(
    original: nn.Module | None,
    graph_module: GraphModule | None,
    onnx_model: onnx.ModelProto | None,
    inputs: Any,
    *,
    engine: bytes | None = None,
    target: str | None = None,
    tolerance: Tolerance | None = None,
    precision: str = "fp32",
    ort_optimization: str = "all",
) -> Comparison:
    """Run every stage given on ``inputs`` and compare them layer by layer (see the module doc).

    ``original``: the source ``nn.Module`` (never modified: hooks go on a private copy).
    ``graph_module``: the rewritten FX graph; the rows follow its node order. Without it, rows follow
    the FX nodes recorded in the ONNX model. ``onnx_model``: the lowered graph, run in ONNX Runtime
    (``ort_optimization`` as in ``OrtRunner``; every exposed tensor keeps the nodes around it from
    fusing, the ``output`` row uses the unmodified graph). ``engine`` / ``target``: a TensorRT
    engine and/or target (``"tensorrt"``, ``"tensorrt-rtx"``); on a GPU, a per-layer engine is built
    with ``precision``. A stage without what it needs is reported as not run, never an error.
    """
    args = as_inputs(inputs, "inputs")
    tol = tolerance or Tolerance()
    stages: dict[str, str] = {}
    notes: list[str] = []
    if graph_module is None and onnx_model is None:
        raise InputError("compare needs a graph_module or an onnx_model (or both) to compare")

    fx_values = _fx_values(graph_module, args) if graph_module is not None else None
    origin: _OriginalMap | None = None
    if graph_module is None:
        stages["fx"] = "omitted: no FX graph given" + (" (the original has nothing to be compared with)"
                                                       if original is not None else "")
    elif original is None:
        stages["fx"] = "omitted: no original model given"
    else:
        origin = _OriginalMap(original, graph_module, args)
        stages["fx"] = "ran"
        if origin.trace_note:
            notes.append(origin.trace_note)

    side = _Backends()
    if onnx_model is None:
        stages["ort"] = "omitted: no ONNX model given"
    else:
        side = _Backends.of(onnx_model)
        if not side.layers:
            notes.append("the ONNX model records no FX node provenance (not exported by fxcompress?): "
                         "only its outputs are compared")
        if fx_values is not None:
            unknown = sorted(set(side.layers) - set(fx_values))
            if unknown:
                listed = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
                notes.append(f"{len(unknown)} ONNX layer(s) name FX nodes absent from the FX graph "
                             f"({listed}): the ONNX model was not exported from this graph")
            notes += _weight_mismatches(graph_module, onnx_model)
            side.layers = {fx: ts for fx, ts in side.layers.items()
                           if fx in fx_values and _tensors(fx_values[fx])}
        names = [t for ts in side.layers.values() for t in ts]
        side.ort, side.ort_finals = _run_ort(onnx_model, names, args, ort_optimization)
        stages["ort"] = "ran" if fx_values is not None else "omitted: no FX graph to compare with"

    why_not = _trt_status(engine, target)
    if why_not is None and onnx_model is None:
        why_not = "omitted: no ONNX model (the ONNX Runtime reference TensorRT is compared with)"
    if why_not is None:
        try:
            names = [t for ts in side.layers.values() for t in ts if side.ort[t].is_floating_point()]
            side.trt, side.trt_finals = _run_trt(onnx_model, names, args, engine, str(target), precision)
            stages["trt"] = "ran"
        except (FxCompressError, RuntimeError) as exc:  # e.g. no engine for this GPU, CUDA errors
            why_not = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if why_not is not None:
        stages["trt"] = why_not

    rows = _rows(graph_module, fx_values, origin, side, stages, tol)
    return Comparison(rows=rows, stages={s: stages[s] for s in STAGES}, tolerance=tol, notes=notes)


def _rows(gm: GraphModule | None, fx_values: dict[str, Any] | None, origin: _OriginalMap | None,
          side: _Backends, stages: dict[str, str], tol: Tolerance) -> list[LayerRow]:
    rows: list[LayerRow] = []
    have_ort = bool(side.ort) or bool(side.ort_finals)

    def backends(row: LayerRow, fx_tensors: list[torch.Tensor] | None, names: list[str] | None) -> None:
        """The ort and trt cells of ``row``: the tensors ``names``, or the model outputs for None."""
        if names is None:
            ort, trt, label, step = side.ort_finals, side.trt_finals, "model outputs", 0.0
        else:
            ort = [side.ort[t] for t in names]
            trt = [side.trt[t] for t in names if t in side.trt]
            label, step = ", ".join(names), side.step(names)
        if not ort:
            if have_ort and fx_tensors is not None:
                row.notes["ort"] = "no ONNX tensor (exported into its neighbours, or removed by an ONNX pass)"
            return
        if fx_tensors is not None and stages.get("ort") == "ran":
            _fill(row, "ort", fx_tensors, ort, tol, label, step)
        if trt and stages.get("trt") == "ran":
            _fill(row, "trt", ort, trt, tol, label, step)

    if gm is not None and fx_values is not None:
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            fx_tensors = _tensors(fx_values.get(node.name))
            if not fx_tensors:
                continue
            row = LayerRow(len(rows), node.name, node.op, _kind(gm, node), tuple(fx_tensors[0].shape))
            if origin is not None:
                found = origin.counterpart(node)
                if isinstance(found, str):
                    row.notes["fx"] = found
                else:
                    _fill(row, "fx", _tensors(found[0]), fx_tensors, tol, found[1])
            backends(row, fx_tensors, None if node.op == "output" else side.layers.get(node.name, []))
            rows.append(row)
        return rows
    for fx, names in side.layers.items():
        row = LayerRow(len(rows), fx, "onnx", side.kinds.get(fx, "?"), tuple(side.ort[names[0]].shape))
        backends(row, None, names)
        rows.append(row)
    if side.ort_finals:
        row = LayerRow(len(rows), "output", "output", "output", tuple(side.ort_finals[0].shape))
        backends(row, None, None)
        rows.append(row)
    return rows


def _weight_mismatches(gm: GraphModule, model: onnx.ModelProto, limit: int = 5) -> list[str]:
    """ONNX initializers whose values differ from the FX graph's parameter/buffer of the same name."""
    state = gm.state_dict()
    differ = []
    for init in model.graph.initializer:
        ref = state.get(init.name)
        if ref is None:
            continue
        value = numpy_helper.to_array(init)
        if tuple(value.shape) != tuple(ref.shape):
            continue
        expected = ref.detach().cpu().double().numpy()
        if not np.allclose(value.astype(np.float64), expected, rtol=1e-6, atol=1e-7):
            differ.append(init.name)
    if not differ:
        return []
    shown = ", ".join(differ[:limit]) + (", ..." if len(differ) > limit else "")
    return [f"{len(differ)} ONNX initializer(s) differ from the FX graph's parameter of the same name: "
            f"{shown}"]


# ----------------------------------------------------------------------------- artifacts (CLI helpers)


def not_numpy(file: Path) -> str | None:
    """Why the existing ``file`` is not a numpy ``.npy``/``.npz`` file (from its first bytes, before
    numpy would guess at it), or None."""
    with file.open("rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY" or head.startswith(b"PK"):
        return None
    kind = "text" if head and all(32 <= c < 127 or c in b"\t\r\n" for c in head) else "data"
    return (f"inputs file {file} is not a .npy/.npz numpy file: it starts with {head!r} ({kind}, not numpy's "
            f"header); save the arrays with numpy.save (.npy) or numpy.savez (.npz), e.g. "
            f"numpy.save('x.npy', numpy.loadtxt('{file.name}', ndmin=2)) for a text table")


def load_inputs(path: str | Path, specs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Model inputs from a ``.npy`` (one input) or ``.npz`` (several, keyed by input name), cast to
    the dtypes in ``specs`` (the artifact manifest's ``inputs``: ``{"name", "dtype", "shape"}``).

    An array whose rank or per-sample shape (all but the first axis) differs from the spec's
    ``shape`` is an ``InputError`` naming the input; the batch size may differ (the ONNX model
    has a dynamic batch axis)."""
    file = Path(path)
    names = [str(s["name"]) for s in specs]
    if not file.is_file():
        raise InputError(f"inputs file {file} does not exist; save the input with numpy.save (.npy) or, for "
                         f"several inputs ({', '.join(names)}), numpy.savez (.npz)")
    problem = not_numpy(file)
    if problem:
        raise InputError(problem)
    try:
        loaded = np.load(file, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise InputError(f"inputs file {file} is not a .npy/.npz numpy file "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise InputError(f"{file} holds one array but the model takes {len(names)} inputs "
                             f"({', '.join(names)}); save them with numpy.savez(path, **{{name: array}})")
        arrays = [loaded]
    else:
        with loaded:
            keys = list(loaded.files)
            if len(names) == 1 and len(keys) == 1:
                arrays = [loaded[keys[0]]]
            else:
                missing = [n for n in names if n not in keys]
                extra = [k for k in keys if k not in names]
                if missing:
                    raise InputError(f"{file} lacks input(s) {missing}; it has {keys}, the model takes "
                                     f"{names}" + (f" (unknown: {extra})" if extra else ""))
                arrays = [loaded[n] for n in names]
    out = []
    for spec, array in zip(specs, arrays):
        _check_shape(file, spec, array)
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        out.append(tensor.to(dtype) if isinstance(dtype, torch.dtype) else tensor)
    return tuple(out)


def _check_shape(file: Path, spec: Mapping[str, Any], array: np.ndarray) -> None:
    shape = spec.get("shape")
    if shape is None:
        return
    expected, actual = tuple(int(d) for d in shape), tuple(array.shape)
    if len(actual) != len(expected) or actual[1:] != expected[1:]:
        per_sample = "" if len(expected) < 2 else f", i.e. samples of shape {expected[1:]} for any batch size"
        raise InputError(f"{file}: input '{spec['name']}' has shape {actual}, but the artifact was compiled for "
                         f"{expected}{per_sample}; save an array of that shape")


def rebuild_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor], pipeline: str
                  ) -> tuple[Optional[GraphModule], Optional[str]]:
    """The FX graph an artifact was compiled to, rebuilt by running its pipeline on ``model`` again
    (``target="fx"``); ``(None, reason)`` when that fails (e.g. a pass needs calibration data)."""
    from .api import compile as fx_compile

    try:
        compiled = fx_compile(model, tuple(example_inputs), pipeline, target="fx", progress=False)
    except FxCompressError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"the FX graph could not be rebuilt with pipeline {pipeline!r}: {first}"
    return compiled.graph_module, None
