"""Supervised training on the graph: ``train_loop`` (shared with distillation) and ``FineTune``.

``train_loop`` trains any module on an iterable of batches (see ``passes.data``) with AdamW or
SGD, a cosine / linear / constant schedule with linear warmup, gradient clipping and a progress
bar. The loss is ``loss_fn(outputs, targets, inputs)``, so a distillation loss can run the
teacher on ``inputs``. ``FineTune`` runs it on ``ctx.train_data`` (e.g. to recover accuracy
after pruning, or to train QAT fake-quant), then freezes QAT fake-quant into constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.errors import PassError, PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult, _no_progress

from ._fx_utils import writes_inputs
from .data import InputSpec, check_inputs, explain_failure, graph_inputs, input_specs, split_batch, to_device
from .distributed import shard, sync_module, wrap_ddp

LossFn = Callable[[Any, Any, tuple[Any, ...]], torch.Tensor]
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
LOSSES = ("auto", "cross_entropy", "mse")


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise PassError(f"training needs a tensor output; the model returned {type(out).__name__}")
    return out


def supervised_loss(kind: str = "auto") -> LossFn:
    """Cross-entropy on integer class targets, MSE on float targets (``auto`` picks by dtype)."""
    if kind not in LOSSES:
        raise PipelineError(f"loss={kind!r} is not one of {', '.join(LOSSES)}")

    def loss(outputs: Any, targets: Any, inputs: tuple[Any, ...]) -> torch.Tensor:
        if targets is None:
            raise PassError("supervised training needs targets: yield (inputs..., target) batches, "
                            "e.g. a DataLoader of (x, y)")
        out = _first_tensor(outputs)
        target = _first_tensor(targets)
        use_ce = kind == "cross_entropy" or (kind == "auto" and not target.is_floating_point())
        if use_ce:
            return nn.functional.cross_entropy(out, target.long())
        return nn.functional.mse_loss(out, target.to(out.dtype))

    return loss


def _lr_factor(step: int, total: int | None, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _n_steps(data: Iterable[Any], epochs: int, max_steps: int) -> int | None:
    try:
        per_epoch = len(data)  # type: ignore[arg-type]
    except TypeError:
        return max_steps or None
    total = per_epoch * epochs
    return min(total, max_steps) if max_steps else total


def _check_settings(data: Iterable[Any] | None, *, optimizer: str, schedule: str, epochs: int,
                    lr: float) -> None:
    """``train_loop``'s settings (a ``PipelineError``) and data (a ``PassError``), checked before any work."""
    if optimizer not in OPTIMIZERS:
        raise PipelineError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise PipelineError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if epochs < 1 or lr <= 0:
        raise PipelineError(f"training needs epochs >= 1 and lr > 0; got epochs={epochs}, lr={lr}")
    if data is None:
        raise PassError("training needs data: pass train_data= to fxcompress.compile()")


def _optimizer(name: str, params: list[nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def train_loop(model: nn.Module, data: Iterable[Any], loss_fn: LossFn, *, epochs: int = 1, lr: float = 1e-3,
               optimizer: str = "adamw", schedule: str = "cosine", warmup: int = 0, grad_clip: float = 1.0,
               weight_decay: float = 0.0, device: str | torch.device = "cpu",
               progress: Callable[..., Any] | None = None, max_steps: int = 0, seed: int | None = 0,
               n_inputs: int | None = None, input_names: Sequence[str] = (),
               parameters: Iterable[nn.Parameter] | None = None, description: str = "training",
               specs: Sequence[InputSpec] = ()) -> dict[str, Any]:
    """Train ``model`` in place; returns ``{"steps", "epochs", "first_loss", "last_loss", "epoch_losses"}``.

    ``warmup`` is in steps; ``grad_clip`` 0 disables clipping; ``max_steps`` 0 means no cap. The
    model is left in eval mode. ``seed`` makes the run repeatable without touching the caller's RNG.
    ``specs`` (``data.input_specs`` of the traced graph) lets a batch shaped unlike the example
    inputs fail with an error naming ``train_data=``, the input and both shapes.
    """
    _check_settings(data, optimizer=optimizer, schedule=schedule, epochs=epochs, lr=lr)
    if n_inputs is None:
        names = graph_inputs(model) if isinstance(model, GraphModule) else list(input_names)
        n_inputs, input_names = max(1, len(names)), names
    device = torch.device(device)
    params = [p for p in (parameters if parameters is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise PassError("training found no trainable parameters in the model")
    opt = _optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    total = _n_steps(data, epochs, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warmup, schedule))
    progress = progress or _no_progress
    model.to(device)
    writes = writes_inputs(model)
    epoch_losses: list[float] = []
    first_loss: float | None = None
    step = 0
    with torch.random.fork_rng(devices=[]), progress(description, total=total) as bar:
        if seed is not None:
            torch.manual_seed(seed)
        model.train()
        try:
            for _ in range(epochs):
                running, count = 0.0, 0
                for batch in data:
                    if max_steps and step >= max_steps:
                        break
                    inputs, targets = split_batch(batch, n_inputs, input_names)
                    where = {"argument": "train_data", "pass_name": description, "index": step}
                    check_inputs(inputs, specs, **where)
                    fed, targets = to_device(inputs, device, copy=writes), to_device(targets, device)
                    opt.zero_grad(set_to_none=True)
                    with explain_failure(inputs, specs, **where):
                        outputs = model(*fed)
                    loss = loss_fn(outputs, targets, to_device(inputs, device, copy=True) if writes else fed)
                    if not torch.isfinite(loss.detach()):
                        raise PassError(f"training diverged at step {step}: loss is {float(loss.detach())}; lower lr "
                                        f"(now {lr}) or enable grad_clip")
                    loss.backward()
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    sched.step()
                    value = float(loss.detach())
                    first_loss = value if first_loss is None else first_loss
                    running, count, step = running + value, count + 1, step + 1
                    bar.advance(1, loss=running / count)
                if count:
                    epoch_losses.append(running / count)
                if max_steps and step >= max_steps:
                    break
        finally:
            model.eval()
    if step == 0:
        raise PassError("training data yielded no batches")
    return {"steps": step, "epochs": len(epoch_losses), "first_loss": first_loss,
            "last_loss": epoch_losses[-1] if epoch_losses else first_loss, "epoch_losses": epoch_losses}


def finalize_training(gm: GraphModule) -> dict[str, int]:
    """After training a graph: freeze QAT fake-quant (learned scales -> constants, INT8 weights)."""
    from .quantize.qat import freeze_qat, has_qat

    if not has_qat(gm):
        return {}
    return freeze_qat(gm)


@dataclass(frozen=True)
class TrainingPass(Pass):
    """What every pass that trains the graph shares: its optimizer options (checked when constructed,
    ``Literal`` choices as in a pipeline string) and their hand-over to ``train_loop``. Subclasses
    (``fine-tune``, ``distill``) add their loss and data. ``freeze_quant``: QAT fake-quant left by
    ``quantize-int8{qat=true}`` is trained and then frozen into constants."""

    requires: ClassVar[tuple[str, ...]] = ("train-data",)
    trains: ClassVar[bool] = True

    epochs: int = 3
    lr: float = 1e-2
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    freeze_quant: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.lr <= 0:
            raise PipelineError(f"{self.name}: needs epochs >= 1 and lr > 0; got epochs={self.epochs}, lr={self.lr}")
        if self.warmup < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise PipelineError(f"{self.name}: warmup, grad_clip and weight_decay must be >= 0")

    def optimizer_options(self) -> dict[str, Any]:
        """The ``train_loop`` keyword arguments these options set."""
        return {"epochs": self.epochs, "lr": self.lr, "optimizer": self.optimizer, "schedule": self.schedule,
                "warmup": self.warmup, "grad_clip": self.grad_clip, "weight_decay": self.weight_decay}

    def finish(self, gm: GraphModule, stats: dict[str, Any], what: str) -> PassResult:
        """Freeze QAT fake-quant (``freeze_quant``) and warn when the loss rose."""
        if self.freeze_quant:
            frozen = finalize_training(gm)
            if frozen:
                stats["frozen"] = frozen
        result = PassResult(graph=gm, stats=stats)
        first, last = stats.get("first_loss"), stats.get("last_loss")
        if first is not None and last is not None and last > first * 1.5:
            result.warn(f"{what} loss rose from {first:.4g} to {last:.4g}; lower lr (now {self.lr})")
        return result


@dataclass(frozen=True)
class FineTune(TrainingPass):
    """Supervised fine-tuning of the graph on ``train_data`` (AdamW, cosine schedule, clipping).

    ``loss`` ``auto`` is cross-entropy for integer targets and MSE for float targets. QAT
    fake-quant left by ``quantize-int8{qat=true}`` is trained and then frozen (``freeze_quant``).
    The defaults (3 epochs, lr 1e-2) recover a heavily pruned network (see ``Distill``); lower
    ``lr`` to fine-tune gently (a large pretrained model, or a pattern re-applied afterwards).
    """

    name: ClassVar[str] = "fine-tune"
    requires: ClassVar[tuple[str, ...]] = ("train-data", "train-labels")

    loss: Literal["auto", "cross_entropy", "mse"] = "auto"
    max_steps: int = 0

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        if ctx.train_data is None:
            raise PassError(f"{self.name} needs training data: pass train_data= to fxcompress.compile() "
                            f"(an iterable of (inputs..., target) batches, e.g. a DataLoader of (x, y))",
                            pass_name=self.name)
        names = graph_inputs(gm)
        gm.to(ctx.device)
        stats = train_loop(wrap_ddp(gm, device=ctx.device), shard(ctx.train_data, seed=ctx.seed),
                           supervised_loss(self.loss), **self.optimizer_options(), device=ctx.device,
                           progress=ctx.progress, max_steps=self.max_steps, seed=ctx.seed,
                           n_inputs=len(names), input_names=names, description=self.name,
                           specs=input_specs(gm))
        sync_module(gm)
        gm.to("cpu")
        return self.finish(gm, stats, "training")
