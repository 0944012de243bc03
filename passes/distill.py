"""Knowledge distillation: train the graph (the student) to match a frozen teacher.

By default the teacher is the model before compression (``ctx.original``), so the damage done
by pruning or quantization is repaired by learning from the uncompressed model; ``teacher=``
takes any other module (classic big-teacher -> small-student distillation).

Loss on the model output (``loss="auto"``): for classification (2-D logits and integer labels
in the batch) ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, s)``;
otherwise MSE to the teacher's output (plus ``(1 - alpha) * MSE(y, s)`` when the batch carries
float targets of the output's shape). Feature distillation adds ``feature_weight`` times the MSE
between named intermediate outputs, through a learned 1x1 projection when the student has fewer
(or more) channels than the teacher; projections only live during training.

The training loop is ``passes.train.train_loop`` (shared with ``FineTune``); under ``torchrun``
the student is wrapped in ``DistributedDataParallel`` and the data sharded (``passes.distributed``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.fx import Graph, GraphModule, Node
from torch.nn import functional as F

from fxcompress.errors import PassError, PipelineError
from fxcompress.pass_base import PassContext, PassResult, not_in_pipeline_string

from .distributed import shard, sync_module, world_size, wrap_ddp
from .data import graph_inputs, input_specs, split_batch, to_device
from .train import TrainingPass, train_loop

LOSSES = ("auto", "kd", "mse")

__all__ = ["Distill", "distillation_loss", "kd_loss", "LOSSES"]


# ----------------------------------------------------------------------------- losses

def kd_loss(student: Tensor, teacher: Tensor, targets: Tensor | None = None, *, temperature: float = 1.0,
            alpha: float = 0.5) -> Tensor:
    """Hinton's distillation loss on ``N x C`` logits.

    ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(y, s)`` (KL averaged over
    the batch); without ``targets`` only the first term, with weight 1."""
    t = temperature
    log_s = F.log_softmax(student / t, dim=-1)
    log_t = F.log_softmax(teacher.detach().to(student.dtype) / t, dim=-1)
    soft = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (t * t)
    if targets is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student, targets.long())


def _first_tensor(out: Any, what: str) -> Tensor:
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, dict) and out:
        out = next(iter(out.values()))
    if not isinstance(out, Tensor):
        raise PassError(f"distill: the {what} must return a tensor (or a tuple/dict whose first item "
                        f"is one); got {type(out).__name__}")
    return out


def _is_labels(targets: Any, logits: Tensor) -> bool:
    return (isinstance(targets, Tensor) and not targets.is_floating_point() and not targets.is_complex()
            and targets.dim() == 1 and targets.shape[0] == logits.shape[0])


def distillation_loss(student_out: Any, teacher_out: Any, targets: Any = None, *, temperature: float = 1.0,
                      alpha: float = 0.5, kind: str = "auto") -> Tensor:
    """The output term of ``Distill``'s loss for one batch (see the module docstring).

    ``kind``: ``auto`` (KD for 2-D logits with integer labels, else MSE), ``kd`` (KD always; the
    CE term only when labels are present), ``mse`` (MSE to the teacher always)."""
    if kind not in LOSSES:
        raise PipelineError(f"distill: loss={kind!r} is not one of {', '.join(LOSSES)}")
    s = _first_tensor(student_out, "student")
    t = _first_tensor(teacher_out, "teacher").detach()
    if s.shape != t.shape:
        raise PassError(f"distill: student output {tuple(s.shape)} and teacher output {tuple(t.shape)} "
                        f"differ; the teacher must produce the same output as the student "
                        f"(same task, same classes)")
    labels = targets if _is_labels(targets, s) else None
    if kind == "kd" or (kind == "auto" and s.dim() == 2 and labels is not None):
        if s.dim() != 2:
            raise PassError(f"distill: loss='kd' needs N x C logits; the student returns {tuple(s.shape)}")
        return kd_loss(s, t, labels, temperature=temperature, alpha=alpha)
    loss = F.mse_loss(s, t.to(s.dtype))
    y = targets if isinstance(targets, Tensor) else None
    if y is not None and y.is_floating_point() and y.shape == s.shape:
        return alpha * loss + (1.0 - alpha) * F.mse_loss(s, y.to(s.dtype))
    return loss


# ----------------------------------------------------------------------------- taps

def _resolve_node(gm: GraphModule, name: str, who: str) -> Node:
    nodes = [n for n in gm.graph.nodes if n.op not in ("output",)]
    for n in nodes:
        if n.name == name:
            return n
    for n in nodes:
        if n.op == "call_module" and str(n.target) == name:
            return n
    shown = ", ".join(n.name for n in nodes[:30])
    raise PassError(f"distill: features: {who} has no FX node or module called {name!r}; "
                    f"its nodes include: {shown}{' ...' if len(nodes) > 30 else ''}")


def tapped(gm: GraphModule, names: Sequence[str], who: str) -> GraphModule:
    """A GraphModule that shares ``gm``'s parameters and buffers and returns
    ``(gm's output, (outputs of the nodes ``names``))``."""
    graph = Graph()
    env: dict[Node, Node] = {}
    output: Node | None = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output = node
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    if output is None:  # pragma: no cover - every FX graph has one
        raise PassError(f"distill: the {who} graph has no output node")
    picked = tuple(env[_resolve_node(gm, name, who)] for name in names)
    out = torch.fx.node.map_arg(output.args[0], lambda n: env[n])
    graph.output((out, picked))
    return GraphModule(gm, graph, class_name=f"{type(gm).__name__}Tapped")


class _Student(nn.Module):
    """The module trained: the student graph (tapped when features are distilled) plus the 1x1
    projections onto the teacher's channel counts. Returns ``(output, projected features)``."""

    def __init__(self, net: nn.Module, tapped_features: bool) -> None:
        super().__init__()
        self.net = net
        self.tapped_features = tapped_features
        self.projections = nn.ModuleList()

    def forward(self, *inputs: Any) -> tuple[Any, list[Tensor]]:
        if not self.tapped_features:
            return self.net(*inputs), []
        out, feats = self.net(*inputs)
        if len(feats) != len(self.projections):
            raise PassError("distill: feature projections were not built before training")
        return out, [proj(_first_tensor(f, "student feature")) for proj, f in zip(self.projections, feats)]


class _Teacher:
    """Runs the teacher frozen: eval mode, no gradients, its own training flags restored on exit;
    collects the named features through forward hooks (modules; one called several times gives
    its last output) or a tapped graph (FX nodes, the teacher traced when it is not a graph)."""

    def __init__(self, model: nn.Module, features: Sequence[str], device: torch.device,
                 example_inputs: tuple[Any, ...]) -> None:
        if _device_of(model) not in (None, device):
            model = copy.deepcopy(model).to(device)
        self.model = model
        self.features = tuple(features)
        self._captured: dict[str, Tensor] = {}
        self._hooks: list[Any] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        modules = dict(model.named_modules())
        self.runner: nn.Module = model
        self.use_hooks = all(name in modules and name != "" for name in self.features)
        if self.features and not self.use_hooks:
            gm = model if isinstance(model, GraphModule) else _trace(model, example_inputs)
            self.runner = tapped(gm, self.features, "the teacher")
        self._modules = modules

    def __enter__(self) -> "_Teacher":
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.runner.eval()
        if self.features and self.use_hooks:
            for name in self.features:
                self._hooks.append(self._modules[name].register_forward_hook(self._capture(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for m, mode in self._modes:
            m.training = mode

    def _capture(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[name] = _first_tensor(output, f"teacher module {name!r}")
        return hook

    @torch.no_grad()
    def __call__(self, *inputs: Any) -> tuple[Any, list[Tensor]]:
        if not self.features:
            return self.runner(*inputs), []
        if self.use_hooks:
            self._captured.clear()
            out = self.runner(*inputs)
            return out, [self._captured[name] for name in self.features]
        out, feats = self.runner(*inputs)
        return out, [_first_tensor(f, "teacher feature") for f in feats]


def _trace(model: nn.Module, example_inputs: tuple[Any, ...]) -> GraphModule:
    from fxcompress.trace import trace

    return trace(model, example_inputs)


def _device_of(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def make_projection(student_shape: Sequence[int], teacher_shape: Sequence[int],
                    pair: tuple[str, str]) -> nn.Module:
    """A 1x1 conv (or linear, for ``N x C`` features) from the student's channels (axis 1) to the
    teacher's; ``Identity`` when they already agree."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    where = f"distill: features {pair[0]!r} -> {pair[1]!r}"
    if len(s) != len(t) or len(s) < 2 or len(s) > 5:
        raise PassError(f"{where}: shapes {s} and {t} cannot be matched; pick N x C or N x C x spatial "
                        f"tensors of the same rank")
    if s[0] != t[0] or s[2:] != t[2:]:
        raise PassError(f"{where}: shapes {s} and {t} differ outside the channel axis (1); pick layers with "
                        f"the same spatial size")
    if s[1] == t[1]:
        return nn.Identity()
    if len(s) == 2:
        return nn.Linear(s[1], t[1])
    conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(s)]
    return conv(s[1], t[1], kernel_size=1)


# ----------------------------------------------------------------------------- data and progress

class _Limited:
    """At most ``limit`` batches per pass over ``data`` (0: all of them)."""

    def __init__(self, data: Iterable[Any], limit: int) -> None:
        self.data, self.limit = data, limit

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            if self.limit and i >= self.limit:
                return
            yield batch

    def __len__(self) -> int:
        n = len(self.data)  # type: ignore[arg-type]
        return min(n, self.limit) if self.limit else n


class _LossMeter:
    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, loss: float) -> None:
        self.value = loss if self.value is None else 0.9 * self.value + 0.1 * loss


class _Bar:
    def __init__(self, inner: Any, meter: _LossMeter) -> None:
        self.inner, self.meter = inner, meter

    def advance(self, n: float = 1, **fields: Any) -> None:
        if self.meter.value is not None:
            fields = {"loss": self.meter.value, **fields}
        self.inner.advance(n, **fields)


def _progress_with_loss(progress: Callable[..., Any], meter: _LossMeter) -> Callable[..., Any]:
    @contextmanager
    def factory(description: str = "", total: float | None = None) -> Iterator[_Bar]:
        with progress(description, total=total) as bar:
            yield _Bar(bar, meter)
    return factory


# ----------------------------------------------------------------------------- the pass

@dataclass(frozen=True)
class Distill(TrainingPass):
    """Train the graph against a frozen teacher (default: the original model, ``ctx.original``).

    ``temperature`` T and ``alpha`` (weight of the teacher term) shape the KD loss; ``loss``
    ``auto`` picks KD for classification and MSE otherwise (``kd`` / ``mse`` force one).
    The defaults (3 epochs, lr 1e-2 with cosine decay, T 1, alpha 0.5) are for recovering a
    heavily pruned student on a short budget: on digits with 70% of the channels pruned they
    bring DigitsResNet back to 98.9% (``bench/recovery.py``; lr 1e-3 left it at 59% in 2 epochs), and
    T 4 trailed T 1 by up to a point (soft targets a 2-3 epoch student cannot fit yet). For
    gentle distillation of a large pretrained student lower ``lr`` (1e-3 to 1e-4).
    ``features``: ``(("student_node", "teacher_module_or_node"), ...)`` pairs distilled with MSE
    (times ``feature_weight``) through a learned 1x1 projection when channel counts differ.
    ``warmup`` is in steps; ``max_batches`` caps the batches of each epoch (0: all);
    ``device`` empty means the context's device. Learned QAT fake-quant is frozen afterwards
    (``freeze_quant``), as ``fine-tune`` does. Under ``torchrun`` the student trains in
    DistributedDataParallel on each process's share of the data (``max_batches`` then counts
    per process) and every process ends with the same weights. ``data``: training batches for
    this pass only (e.g. in ``Repeat(4, [PruneChannels(...), Distill(data=loader)])``), instead of
    ``train_data=`` given to ``compile()``; like ``teacher`` it is not part of the pipeline string.
    """

    name: ClassVar[str] = "distill"

    temperature: float = 1.0
    alpha: float = 0.5
    loss: Literal["auto", "kd", "mse"] = "auto"
    features: tuple[tuple[str, str], ...] = ()
    feature_weight: float = 1.0
    max_batches: int = 0
    device: str = ""
    teacher: nn.Module | None = not_in_pipeline_string()
    data: Iterable[Any] | None = not_in_pipeline_string()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise PipelineError(f"{self.name}: temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise PipelineError(f"{self.name}: alpha (weight of the teacher term) must be in [0, 1]; "
                                f"got {self.alpha}")
        if self.max_batches < 0 or self.feature_weight < 0:
            raise PipelineError(f"{self.name}: max_batches and feature_weight must be >= 0")
        try:
            features = tuple((str(s), str(t)) for s, t in self.features)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"{self.name}: features must be (student_node, teacher_module_or_node) "
                                f"pairs; got {self.features!r}") from exc
        object.__setattr__(self, "features", features)
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise PipelineError(f"{self.name}: teacher must be an nn.Module; "
                                f"got {type(self.teacher).__name__}")
        if self.data is not None:
            if isinstance(self.data, (str, bytes, torch.Tensor)) or not isinstance(self.data, Iterable):
                raise PipelineError(f"{self.name}: data must be an iterable of (inputs..., target) batches "
                                    f"(a list or a DataLoader); got {type(self.data).__name__}")
            if isinstance(self.data, Iterator):
                raise PipelineError(f"{self.name}: data is a one-shot iterator ({type(self.data).__name__}); "
                                    f"every epoch and every Repeat round reads it again: pass a list or a "
                                    f"DataLoader")
            # the pass brings its own data, so it no longer needs train_data= from the context
            object.__setattr__(self, "requires", ())

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        train_data = self.data if self.data is not None else ctx.train_data
        if train_data is None:
            raise PassError(f"{self.name} needs training data: pass train_data= to fxcompress.compile() "
                            f"or Distill(data=...) (an iterable of (inputs..., target) batches, e.g. a "
                            f"DataLoader of (x, y))", pass_name=self.name)
        teacher_model = self.teacher if self.teacher is not None else ctx.original
        if teacher_model is None:
            raise PassError(f"{self.name} has no teacher: give Distill(teacher=model) or compile the model "
                            f"with fxcompress.compile() (which makes the original model the teacher)",
                            pass_name=self.name)
        device = torch.device(self.device) if self.device else ctx.device
        names = graph_inputs(gm)
        example = self._example_inputs(ctx, names, train_data)
        gm.to(device)
        student = _Student(tapped(gm, [s for s, _ in self.features], "the student") if self.features else gm,
                           bool(self.features))
        example = to_device(example, device)
        with _Teacher(teacher_model, [t for _, t in self.features], device, example) as teacher:
            if self.features:
                self._build_projections(student, teacher, example, ctx.seed, device)
            meter = _LossMeter()
            loss_fn = self._loss_fn(teacher, meter)
            model = wrap_ddp(student, device=device)
            data = _Limited(shard(train_data, seed=ctx.seed), self.max_batches)
            stats = train_loop(model, data, loss_fn, **self.optimizer_options(), device=device,
                               progress=_progress_with_loss(ctx.progress, meter), seed=ctx.seed,
                               n_inputs=len(names), input_names=names, description=self.name,
                               specs=input_specs(gm))
            sync_module(gm)
        gm.to("cpu")
        gm.eval()
        stats["world_size"] = world_size()
        stats["teacher"] = "original" if self.teacher is None else type(teacher_model).__name__
        stats["projections"] = sum(1 for p in student.projections if not isinstance(p, nn.Identity))
        return self.finish(gm, stats, "distillation")

    def _example_inputs(self, ctx: PassContext, names: list[str], data: Iterable[Any]) -> tuple[Any, ...]:
        if ctx.example_inputs:
            return tuple(ctx.example_inputs)
        for batch in data:
            return split_batch(batch, max(1, len(names)), names)[0]
        what = "data=" if self.data is not None else "train_data="
        raise PassError(f"{self.name}: {what} yielded no batches", pass_name=self.name)

    def _build_projections(self, student: _Student, teacher: _Teacher, example: tuple[Any, ...], seed: int,
                           device: torch.device) -> None:
        modes = [(m, m.training) for m in student.modules()]
        student.eval()
        try:
            with torch.no_grad():
                _, s_feats = student.net(*example)
                _, t_feats = teacher(*example)
            s_feats = [_first_tensor(f, "student feature") for f in s_feats]
        finally:
            for m, mode in modes:
                m.training = mode
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for pair, s, t in zip(self.features, s_feats, t_feats):
                student.projections.append(make_projection(s.shape, t.shape, pair).to(device))

    def _loss_fn(self, teacher: _Teacher, meter: _LossMeter) -> Callable[[Any, Any, tuple[Any, ...]], Tensor]:
        def loss_fn(outputs: Any, targets: Any, inputs: tuple[Any, ...]) -> Tensor:
            student_out, student_feats = outputs
            teacher_out, teacher_feats = teacher(*inputs)
            loss = distillation_loss(student_out, teacher_out, targets, temperature=self.temperature,
                                     alpha=self.alpha, kind=self.loss)
            if student_feats:
                feat = sum(F.mse_loss(s, t.to(s.dtype)) for s, t in zip(student_feats, teacher_feats))
                loss = loss + self.feature_weight * feat / len(student_feats)
            meter.add(float(loss.detach()))
            return loss
        return loss_fn
