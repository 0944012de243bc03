"""Physically remove channel classes from a GraphModule: smaller modules, sliced tensors and
rewritten shape arguments, all driven by a ``DependencyGraph`` and a removal mask."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.attrs import fetch_attr
from fxcompress.errors import PassError

from .depgraph import DependencyGraph, ModuleEdit, ShapeFix

__all__ = ["apply_removal"]


def _index(idx: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(idx, dtype=torch.long)


def _new(cls: type[nn.Module], *args: Any, like: torch.Tensor | None, **kwargs: Any) -> nn.Module:
    """A module constructed without running its initializer (its state is loaded right after)."""
    if like is not None:
        kwargs.update(device=like.device, dtype=like.dtype)
    return torch.nn.utils.skip_init(cls, *args, **kwargs)


def _rebuild(mod: nn.Module, edit: ModuleEdit, state: dict[str, torch.Tensor], n_in: int | None,
             n_out: int) -> nn.Module:
    """A module of the same type and hyper-parameters as ``mod``, sized for ``state``."""
    cls, w = type(mod), state.get("weight")
    if edit.kind == "conv":
        cin = n_in if n_in is not None else mod.in_channels
        groups = {"dense": 1, "depthwise": cin, "grouped": cin // max(edit.group_size, 1)}[edit.mode]
        return _new(cls, cin, w.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                    dilation=mod.dilation, groups=groups, bias=mod.bias is not None,
                    padding_mode=mod.padding_mode, like=w)
    if edit.kind == "conv_transpose":
        return _new(cls, w.shape[0], w.shape[1] * mod.groups, mod.kernel_size, stride=mod.stride,
                    padding=mod.padding, output_padding=mod.output_padding, groups=mod.groups,
                    bias=mod.bias is not None, dilation=mod.dilation, padding_mode=mod.padding_mode, like=w)
    if edit.kind == "linear":
        return _new(cls, w.shape[1], w.shape[0], bias=mod.bias is not None, like=w)
    if edit.kind == "embedding":
        return _new(cls, w.shape[0], w.shape[1], padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                    norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq, sparse=mod.sparse,
                    like=w)
    if edit.kind == "norm":
        like = w if w is not None else state.get("running_mean")
        return _new(cls, n_out, eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
                    track_running_stats=mod.track_running_stats, like=like)
    if edit.kind == "layernorm":
        shape = tuple(mod.normalized_shape[:-1]) + (n_out,)
        kwargs = {"bias": mod.bias is not None} if mod.elementwise_affine else {}
        return _new(cls, shape, eps=mod.eps, elementwise_affine=mod.elementwise_affine, like=w, **kwargs)
    if edit.kind == "groupnorm":
        groups = {"single": 1, "per-channel": n_out, "groups": n_out // max(edit.group_size, 1)}[edit.mode]
        return _new(cls, groups, n_out, eps=mod.eps, affine=mod.affine, like=w)
    if edit.kind == "prelu":
        return _new(cls, num_parameters=n_out, like=w)
    raise PassError(f"prune-channels: no rebuild rule for module kind {edit.kind!r} ({type(mod).__name__})")


def _set_path(root: nn.Module, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if isinstance(value, nn.Module):
        setattr(owner, name, value)
        return
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    if name in getattr(owner, "_buffers", {}):
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)


def apply_removal(gm: GraphModule, dg: DependencyGraph, removed: np.ndarray) -> dict[str, dict[str, Any]]:
    """Remove every channel whose class is set in the boolean mask ``removed``; returns, per
    module with channels, ``{kind, channels_before, channels_after, kept}`` (kept output positions)."""
    keep = lambda labels: dg.kept_positions(labels, removed)  # noqa: E731
    by_owner: dict[str, list] = {}
    for s in dg.slices:
        by_owner.setdefault(s.owner, []).append(s)
    layers: dict[str, dict[str, Any]] = {}
    for path, edit in dg.edits.items():
        mod = gm.get_submodule(path)
        labels = edit.out_labels if edit.out_labels is not None else edit.in_labels
        kept_out = keep(labels)
        layers[path] = {"kind": type(mod).__name__, "channels_before": int(len(labels)),
                        "channels_after": int(len(kept_out)), "kept": kept_out.tolist()}
        slices = by_owner.get(path, [])
        if all(len(keep(s.labels)) == len(s.labels) for s in slices):
            continue
        state = dict(mod.state_dict())
        for s in slices:
            state[s.param] = state[s.param].index_select(s.dim, _index(keep(s.labels)))
        n_in = None if edit.in_labels is None else int(len(keep(edit.in_labels)))
        new = _rebuild(mod, edit, state, n_in, int(len(kept_out)))
        new.load_state_dict(state)
        for name, p in new.named_parameters():
            p.requires_grad_(fetch_attr(mod, name).requires_grad)
        new.train(mod.training)
        _set_path(gm, path, new)
    for owner, slices in by_owner.items():
        if owner in dg.edits:
            continue
        value = fetch_attr(gm, owner)
        new_value = value.detach()
        for s in slices:
            new_value = new_value.index_select(s.dim, _index(keep(s.labels)))
        if new_value.shape != value.shape:
            _set_path(gm, owner, new_value.clone())
    nodes = {n.name: n for n in gm.graph.nodes}
    for fix in dg.fixes:
        _apply_fix(gm, nodes[fix.node], fix, keep)
    gm.graph.lint()
    return layers


def _apply_fix(gm: GraphModule, node: Node, fix: ShapeFix, keep: Any) -> None:
    if fix.kind == "split":
        sizes = [int(len(keep(s))) for s in fix.labels]
        x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
        node.args, node.kwargs = (x, sizes), {"dim": fix.axis}
        return
    if fix.kind == "slice":
        labels = fix.labels[0]
        start, stop = fix.sizes
        kept = keep(labels)
        new = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
        index = node.args[1]
        if isinstance(index, tuple):
            index = index[:fix.axis] + (new,) + index[fix.axis + 1:]
        else:
            index = new
        node.args = (node.args[0], index)
        return
    count = int(len(keep(fix.labels[0])))
    if fix.kind == "expand":
        sizes = list(node.args[1:]) if not (len(node.args) == 2 and isinstance(node.args[1], (tuple, list))) \
            else list(node.args[1])
        if isinstance(sizes[fix.axis], int) and sizes[fix.axis] != -1:
            sizes[fix.axis] = count
        node.args = (node.args[0], *sizes)
        return

    def resize(sizes: list[Any], offset: int) -> list[Any]:
        for axis in fix.block:
            i = axis - offset
            if 0 <= i < len(sizes):
                sizes[i] = count if axis == fix.axis else int(fix.sizes[axis])
        return sizes

    if fix.kind == "reshape":
        if node.op == "call_function":  # torch.reshape(x, shape)
            node.args = (node.args[0], tuple(resize(list(node.args[1]), 0)), *node.args[2:])
        elif len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            node.args = (node.args[0], tuple(resize(list(node.args[1]), 0)))
        else:
            node.args = (node.args[0], *resize(list(node.args[1:]), 0))
        return
    if fix.kind == "unflatten":
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            dim = mod.dim if mod.dim >= 0 else mod.dim + len(fix.sizes) - len(mod.unflattened_size) + 1
            _set_path(gm, str(node.target),
                      nn.Unflatten(mod.dim, tuple(resize(list(mod.unflattened_size), dim))))
            return
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        dim = dim if dim >= 0 else dim + len(fix.sizes) - len(sizes) + 1
        node.args, node.kwargs = (node.args[0], node.args[1] if len(node.args) > 1 else dim,
                                  tuple(resize(list(sizes), dim))), {}
        return
    raise PassError(f"prune-channels: unknown shape fix {fix.kind!r} at node '{node.name}'")
