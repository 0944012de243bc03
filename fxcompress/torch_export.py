"""The torch.export front end: capture below Python control flow, then canonicalize.

``export_trace`` captures a whole model with ``torch.export.export(model, args, strict=False)``;
``export_fallback`` does so where symbolic tracing failed at the top level, naming both front
ends' reasons when export fails too; ``inline_opaque`` exports each submodule holding parameters
that symbolic tracing left opaque and inlines its graph, so only what neither front end captures
stays a leaf.

Dynamic axes: an axis named by ``dynamic_axes`` is exported as ``Dim.AUTO``; an example of size 1
along it is repeated to size 2 first (export would specialize a size-1 axis to the constant 1).
For an inlined submodule the axes that follow the model's dynamic axes are found by running the
traced model at two sizes and comparing the submodule's input shapes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from .canonicalize import canonicalize, replace_with_graph
from .copying import deep_copy
from .errors import InputError, TraceError, short_reason

_EXPORT_FIX = ("fix: make the data-dependent code tensor ops (torch.where, torch.cond), pass the argument "
               "that decides it via concrete_args=..., or keep the module opaque with leaf_modules=[...]")


def _input_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def dynamic_axes_of(dynamic_axes: Any, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> list[set[int]]:
    """The dynamic axes of each input: ``"batch"`` -> axis 0 of every input of rank >= 1; a dict
    ``{input name: {axis: name} | [axes]}`` -> those axes; None -> none."""
    if dynamic_axes is None:
        return [set() for _ in inputs]
    if dynamic_axes == "batch":
        return [{0} if t.dim() >= 1 else set() for t in inputs]
    if not isinstance(dynamic_axes, Mapping):
        raise InputError(f"dynamic_axes must be 'batch', None or a dict {{input name: axes}}; got {dynamic_axes!r}")
    out: list[set[int]] = []
    for name, t in zip(names, inputs):
        spec = dynamic_axes.get(name, ())
        axes = {int(a) for a in (spec.keys() if isinstance(spec, Mapping) else spec)}
        bad = sorted(a for a in axes if not 0 <= a < t.dim())
        if bad:
            raise InputError(f"dynamic_axes[{name!r}]: axes {bad} out of range for a rank-{t.dim()} input")
        out.append(axes)
    return out


def _resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``t`` repeated along ``axis`` and cut to ``size`` (values stay valid ids, masks, pixels)."""
    reps = -(-size // t.shape[axis])
    return torch.cat([t] * reps, dim=axis).narrow(axis, 0, size)


def _export_args(inputs: Sequence[torch.Tensor], axes: list[set[int]]) -> tuple[torch.Tensor, ...]:
    """The example inputs with every size-1 dynamic axis grown to 2, so export keeps it symbolic."""
    return tuple(_grow(t, ax) for t, ax in zip(inputs, axes))


def _grow(t: torch.Tensor, axes: set[int]) -> torch.Tensor:
    for a in sorted(axes):
        if t.shape[a] == 1:
            t = _resize(t, a, 2)
    return t


def _dynamic_shapes(axes: list[set[int]]) -> tuple[dict[int, Any] | None, ...]:
    from torch.export import Dim

    return tuple({a: Dim.AUTO for a in sorted(ax)} or None for ax in axes)


def _kv_cache_hint(model: nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """A hint when the model returns a KV-cache object, which no graph output can hold."""
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            out = deep_copy(model).eval()(*inputs)
    except Exception:  # noqa: BLE001 - the export error is reported instead
        return None
    leaves = pytree.tree_leaves(out)
    values = leaves + (list(out.values()) if isinstance(out, Mapping) else [])
    caches = sorted({type(v).__name__ for v in values if "cache" in type(v).__name__.lower()})
    if caches:
        return (f"the model returns a KV cache ({', '.join(caches)}), which is not a tensor; build or call it "
                f"with use_cache=False (e.g. model.config.use_cache = False)")
    return None


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_shapes: Any
            ) -> GraphModule:
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    return ep.module()


def export_trace(model: nn.Module, inputs: tuple[torch.Tensor, ...], *, dynamic_axes: Any = "batch",
                 concrete_args: dict[str, Any] | None = None, train: bool = False,
                 fx_reason: str | None = None) -> GraphModule:
    """Capture a deep copy of ``model`` with torch.export and canonicalize it."""
    root = deep_copy(model)
    root.train(train)
    names = _input_names(model, len(inputs))
    axes = dynamic_axes_of(dynamic_axes, names, inputs)
    kwargs = dict(concrete_args or {})
    dyn = _dynamic_shapes(axes)
    if kwargs:
        dyn = {**dict(zip(names, dyn)), **{k: None for k in kwargs}}  # type: ignore[assignment]
    try:
        exported = _export(root, _export_args(inputs, axes), kwargs, dyn)
    except Exception as exc:
        hint = _kv_cache_hint(model, inputs)
        lines = [f"cannot capture {type(model).__name__} with torch.export: {short_reason(exc)}"]
        if fx_reason:
            lines = [f"neither front end captures {type(model).__name__}:",
                     "  torch.fx: " + fx_reason.replace("\n", "\n  "), f"  torch.export: {short_reason(exc)}"]
        lines.append(f"  fix: {hint}" if hint else f"  {_EXPORT_FIX}")
        err = TraceError("\n".join(lines))
        err.module_path = ""  # type: ignore[attr-defined]
        raise err from exc
    hint = _kv_cache_hint(model, inputs) if _has_non_tensor_output(exported) else None
    if hint:
        raise TraceError(f"cannot use the output of {type(model).__name__}: {hint}")
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise TraceError(f"torch.export captured {type(model).__name__} with {len(placeholders)} inputs but "
                         f"{len(inputs)} example inputs were given; pass non-tensor arguments via concrete_args")
    gm = canonicalize(exported, root, type(model).__name__)
    gm.train(train)
    gm.meta["frontend"] = "export"
    gm.meta["opaque_modules"] = {}
    return gm


def _has_non_tensor_output(exported: GraphModule) -> bool:
    out = next(n for n in reversed(exported.graph.nodes) if n.op == "output")
    return any(not isinstance(leaf, torch.fx.Node) and leaf is not None for leaf in pytree.tree_leaves(out.args[0]))


def export_fallback(model: nn.Module, inputs: tuple[torch.Tensor, ...], fx_error: TraceError, **options: Any
                    ) -> GraphModule:
    """``export_trace`` where symbolic tracing failed at the top level; the error names both reasons."""
    try:
        return export_trace(model, inputs, fx_reason=str(fx_error), **options)
    except TraceError as err:
        raise err from fx_error


def _capture_calls(gm: GraphModule, inputs: Sequence[torch.Tensor], paths: Sequence[str]
                   ) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """The (args, kwargs) each opaque module at ``paths`` is first called with on ``inputs``."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    for path in paths:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str = path) -> None:
            seen.setdefault(path, (args, dict(kwargs)))

        handles.append(gm.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            gm(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _sized(inputs: Sequence[torch.Tensor], axes: list[set[int]], size: int) -> tuple[torch.Tensor, ...]:
    out = []
    for t, ax in zip(inputs, axes):
        for a in sorted(ax):
            t = _resize(t, a, size)
        out.append(t)
    return tuple(out)


def inline_opaque(gm: GraphModule, inputs: tuple[torch.Tensor, ...], *, dynamic_axes: Any = "batch",
                  user_paths: frozenset[str] = frozenset(), user_types: tuple[type, ...] = ()) -> None:
    """Export and inline every opaque module of ``gm`` that holds parameters, unless the user made it a
    leaf; update ``gm.meta["opaque_modules"]`` (those left get both front ends' reasons)."""
    opaque: dict[str, str] = dict(gm.meta.get("opaque_modules", {}))
    todo = [p for p in opaque if p not in user_paths
            and not (user_types and isinstance(gm.get_submodule(p), user_types))
            and any(True for _ in gm.get_submodule(p).parameters())]
    if not todo:
        return
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    axes = dynamic_axes_of(dynamic_axes, names, inputs)
    calls = _capture_calls(gm, inputs, todo)
    at2 = _capture_calls(gm, _sized(inputs, axes, 2), todo) if any(axes) else calls
    at3 = _capture_calls(gm, _sized(inputs, axes, 3), todo) if any(axes) else calls
    installs = []
    for path in todo:
        if path not in calls:
            continue
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == path) != 1:
            opaque[path] += "; not exported: the module is called more than once"
            continue
        try:
            install = _inline_one(gm, node, path, at2[path], at3[path])
        except Exception as exc:  # noqa: BLE001 - the module stays opaque, with both reasons
            opaque[path] = f"{opaque[path]}; torch.export: {short_reason(exc)}"
            continue
        installs.append(install)
        del opaque[path]
    for install in installs:
        install()
    gm.graph.lint()
    gm.recompile()
    gm.meta["opaque_modules"] = opaque


def _inline_one(gm: GraphModule, node: torch.fx.Node, path: str, call2: tuple[Any, Any], call3: tuple[Any, Any]
                ) -> Any:
    module = gm.get_submodule(path)
    args2, kwargs2 = call2
    args3, kwargs3 = call3
    flat2, spec = pytree.tree_flatten((args2, kwargs2))
    flat3, _ = pytree.tree_flatten((args3, kwargs3))
    dyn_flat = [({a: torch.export.Dim.AUTO for a in range(t.dim()) if t.shape[a] != u.shape[a]} or None)
                if isinstance(t, torch.Tensor) and isinstance(u, torch.Tensor) else None
                for t, u in zip(flat2, flat3)]
    dyn_args, dyn_kwargs = pytree.tree_unflatten(dyn_flat, spec)
    params = list(inspect.signature(module.forward).parameters)
    dynamic_shapes = {**{params[i]: d for i, d in enumerate(dyn_args) if i < len(params)}, **dyn_kwargs}
    was_training = module.training
    try:
        exported = _export(module, tuple(args2), kwargs2, dynamic_shapes)
    finally:
        module.train(was_training)
    node_flat, _ = pytree.tree_flatten((tuple(node.args), dict(node.kwargs)))
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder"]
    tensor_args = [a for a, v in zip(node_flat, flat2) if isinstance(v, torch.Tensor)]
    if len(placeholders) == len(node_flat):
        bound = node_flat
    elif len(placeholders) == len(tensor_args):
        bound = tensor_args
    else:
        raise TraceError(f"cannot bind the {len(placeholders)} exported inputs of '{path}' to its call")
    return replace_with_graph(gm, node, exported, module, bound)


__all__ = ["dynamic_axes_of", "export_fallback", "export_trace", "inline_opaque"]
