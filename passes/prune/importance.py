"""Importance of every channel class of a ``DependencyGraph`` (low = pruned first).

* ``l1`` / ``l2``: norm of what a channel produces, summed over every layer of its class: the
  producer's weight row and bias, with a BatchNorm right after it folded in
  (``gamma / sqrt(var + eps)`` scale, shifted bias). A normalization with batch statistics
  (``track_running_stats=False``, InstanceNorm, training mode) has no fixed scale to fold; it
  cancels the producer's bias, so the row is scored with the norm's shift ``beta`` as its bias.
  A channel whose output is identically zero therefore scores exactly 0.
* ``bn-scale``: ``|gamma|`` of the normalization layers of the class (network slimming); a group
  without normalization layers falls back to ``l2``.
* ``taylor``: first-order Taylor expansion of the loss, ``sum |w * dL/dw|`` over every parameter
  slice of the class, with gradients accumulated over a few batches of data.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.errors import PassError

from .depgraph import DependencyGraph, ModuleEdit

__all__ = ["CRITERIA", "Criterion", "class_importance"]

#: how channels are scored (a pass option's type)
Criterion = Literal["l1", "l2", "bn-scale", "taylor"]
CRITERIA: tuple[str, ...] = get_args(Criterion)
_PRODUCERS = ("conv", "conv_transpose", "linear", "embedding")


def _rows(gm: GraphModule, edit: ModuleEdit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight rows (one per output position) and bias of a producer, BatchNorm folded in."""
    mod = gm.get_submodule(edit.path)
    w = mod.weight.detach().double()
    if edit.kind == "embedding":
        w = w.t()
    elif edit.kind == "conv_transpose":
        w = w.transpose(0, 1)
    rows = w.reshape(w.shape[0], -1)
    bias = None if getattr(mod, "bias", None) is None else mod.bias.detach().double()
    if edit.norm is None:
        return rows, bias
    bn = gm.get_submodule(edit.norm)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(rows.shape[0], dtype=rows.dtype)
    if uses_batch_stats(bn):
        # the statistics cancel the producer's bias; a zero row leaves the constant beta
        return rows, beta
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return rows * scale[:, None], beta + scale * ((bias if bias is not None else 0.0) - mean)


def uses_batch_stats(norm: nn.Module) -> bool:
    """True when a BatchNorm/InstanceNorm normalizes with the statistics of its input (training
    mode, or no running statistics kept) rather than with its running mean and variance."""
    return norm.training or getattr(norm, "running_mean", None) is None or \
        getattr(norm, "running_var", None) is None


def _magnitude(gm: GraphModule, dg: DependencyGraph, p: int) -> np.ndarray:
    scores = np.zeros(len(dg.classes))
    comp = dg.comp
    for edit in dg.edits.values():
        if edit.kind not in _PRODUCERS or edit.out_labels is None:
            continue
        rows, bias = _rows(gm, edit)
        values = rows if bias is None else torch.cat([rows, bias[:, None]], dim=1)
        norms = values.abs().sum(1) if p == 1 else values.pow(2).sum(1).sqrt()
        np.add.at(scores, comp[edit.out_labels], norms.numpy())
    return scores


def _bn_scale(gm: GraphModule, dg: DependencyGraph) -> tuple[np.ndarray, np.ndarray]:
    scores = np.zeros(len(dg.classes))
    has = np.zeros(len(dg.classes), dtype=bool)
    comp = dg.comp
    for edit in dg.edits.values():
        if edit.kind not in ("norm", "groupnorm", "layernorm"):
            continue
        weight = getattr(gm.get_submodule(edit.path), "weight", None)
        if weight is None:
            continue
        np.add.at(scores, comp[edit.out_labels], weight.detach().double().abs().numpy())
        has[comp[edit.out_labels]] = True
    return scores, has


def _loss(out: Any, target: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(target, torch.Tensor) and target.dtype in (torch.int64, torch.int32) and out.dim() >= 2 \
            and target.shape == out.shape[:1] + out.shape[2:]:
        return nn.functional.cross_entropy(out, target)
    if isinstance(target, torch.Tensor) and target.is_floating_point() and target.shape == out.shape:
        return nn.functional.mse_loss(out, target)
    if out.dim() >= 2 and out.shape[1] > 1:  # no usable target: the model's own predictions
        return nn.functional.cross_entropy(out, out.detach().argmax(1))
    return out.pow(2).mean()


def _taylor(gm: GraphModule, dg: DependencyGraph, data: Iterable[Any], batches: int, pass_name: str,
            argument: str) -> np.ndarray:
    from passes.data import explain_failure, input_specs, iter_batches, to_device

    params = dict(gm.named_parameters())
    flags = {name: p.requires_grad for name, p in params.items()}
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            specs = input_specs(gm)
            batches_ = iter_batches(data, gm, argument=argument, pass_name=pass_name, limit=batches)
            for i, (inputs, target) in enumerate(batches_):
                with explain_failure(inputs, specs, argument=argument, pass_name=pass_name, index=i):
                    loss = _loss(gm(*to_device(inputs, device)), to_device(target, device))
                loss.backward()
                for name, p in params.items():
                    if p.grad is not None:
                        grads[name] += p.grad
                        p.grad = None
    finally:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(flags[name])
    scores = np.zeros(len(dg.classes))
    comp = dg.comp
    for s in dg.slices:
        name = f"{s.owner}.{s.param}" if s.param else s.owner
        if name not in params:
            continue
        wg = (params[name].detach() * grads[name]).abs().double()
        per = wg.transpose(0, s.dim).reshape(wg.shape[s.dim], -1).sum(1) if wg.dim() else wg.reshape(1)
        np.add.at(scores, comp[s.labels], per.numpy())
    return scores


def class_importance(gm: GraphModule, dg: DependencyGraph, criterion: str, *, data: Iterable[Any] | None = None,
                     argument: str = "train_data", batches: int = 8, pass_name: str = "prune-channels"
                     ) -> tuple[np.ndarray, list[str]]:
    """Score per class of ``dg`` and notes (fallbacks taken). ``data`` is needed for ``taylor``."""
    notes: list[str] = []
    if criterion in ("l1", "l2"):
        return _magnitude(gm, dg, 1 if criterion == "l1" else 2), notes
    if criterion == "bn-scale":
        scores, has = _bn_scale(gm, dg)
        fallback = _magnitude(gm, dg, 2)
        for g in dg.groups:
            if g.prunable and not all(has[c] for c in g.prunable):
                scores[g.classes] = fallback[g.classes]
                notes.append(f"group of {', '.join(g.layers)}: no normalization scale on every channel, "
                             f"importance 'l2' used instead of 'bn-scale'")
        return scores, notes
    if criterion == "taylor":
        if data is None:
            raise PassError(f"{pass_name}: importance='taylor' needs data: pass train_data= or calibration= "
                            f"to fxcompress.compile() (batches of (x, y)), or choose importance='l2'",
                            pass_name=pass_name)
        return _taylor(gm, dg, data, batches, pass_name, argument), notes
    raise PassError(f"{pass_name}: unknown importance {criterion!r}; choose one of {', '.join(CRITERIA)}",
                    pass_name=pass_name)
