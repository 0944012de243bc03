"""Copies of models and graphs that share or own their parameters.

The pass manager hands each pass a copy of the graph; a copy whose parameters share storage with
the original costs memory only for what a pass replaces (``shared_copy``), and ``own_parameters``
gives it its own storage at the end (copy-on-write, deferred). ``deep_copy`` is how every front
end copies the user's model before capturing it.
"""

from __future__ import annotations

import collections
import copy
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .errors import TraceError, short_reason

if TYPE_CHECKING:  # pragma: no cover
    from torch.fx import GraphModule


def copy_graph_module(gm: "GraphModule", share_parameters: bool = False) -> "GraphModule":
    """A deep copy that keeps node meta (shapes) and the module-level meta dict; with
    ``share_parameters`` its parameters share storage with ``gm``'s (see ``shared_copy``).

    The submodules are cloned first (``_clone_module``) into the memo ``copy.deepcopy`` then uses:
    the same result as deep-copying them, without reconstructing every module's empty hook
    dictionaries through the generic protocol (most of a large graph's copy time)."""
    memo = _parameter_aliases(gm) if share_parameters else {}
    for child in gm.children():
        _clone_module(child, memo)
    new = copy.deepcopy(gm, memo)
    new.meta = copy.deepcopy(getattr(gm, "meta", {}))
    return new


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are new ``nn.Parameter`` objects over the same
    storage (and version counter) as ``module``'s: no weight memory, and nothing done to the copy's
    modules, parameter objects (``requires_grad``, ``.grad``, ``param.data = ...``) or buffers
    reaches ``module``; only a write into a parameter's values in place would. Tied parameters stay tied."""
    return copy.deepcopy(module, _parameter_aliases(module))


def _parameter_aliases(module: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo mapping every plain ``nn.Parameter`` of ``module`` to an alias of it."""
    return {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
            for p in module.parameters() if type(p) is nn.Parameter}


def own_parameters(module: nn.Module, source: nn.Module) -> None:
    """Give each parameter of ``module`` that still shares storage with one of ``source``'s a copy of
    its own, in place (tied parameters stay tied): copy-on-write, deferred to the end, of what no
    pass replaced, so ``module`` no longer changes when ``source`` does."""
    theirs = {p.untyped_storage().data_ptr() for p in source.parameters()}
    for p in module.parameters():
        if p.untyped_storage().data_ptr() in theirs:
            p.data = p.data.clone()


def parameter_versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every parameter with its version counter (bumped by any in-place write, also through an alias)."""
    return {name: (p, p._version) for name, p in module.named_parameters()}


def written_in_place(versions: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """Names of the parameters recorded by ``parameter_versions`` written in place since."""
    return [name for name, (p, v) in versions.items() if p._version != v]


_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device)
_CHILD_DICTS = ("_parameters", "_buffers", "_modules")


def _plain_module_type(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies ``cls`` by the default protocol: ``__getstate__()`` (a dict),
    deep-copied, into ``__setstate__`` of a new instance (no ``__deepcopy__``/``__reduce__`` of its own)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and not issubclass(cls, (list, dict))
            and not any("__slots__" in vars(k) for k in cls.__mro__))


def _clone_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster for modules that use ``nn.Module``'s own copy protocol:
    tensors and unknown attributes still go through ``copy.deepcopy`` (shared tensors stay shared),
    empty containers are made anew. Other module types are deep-copied as they define."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain_module_type(cls):
        return copy.deepcopy(module, memo)
    original = module.__getstate__()
    if type(original) is not dict:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in original.items():
        if key in _CHILD_DICTS and type(value) in (dict, collections.OrderedDict):
            items = ((k, _clone_module(v, memo) if isinstance(v, nn.Module) else copy.deepcopy(v, memo))
                     for k, v in value.items())
            state[key] = type(value)(items)
        elif isinstance(value, _ATOMIC):
            state[key] = value
        elif type(value) in (dict, collections.OrderedDict, set, list) and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


_SHARE_PARAMETERS: ContextVar[bool] = ContextVar("fxcompress_share_parameters", default=False)


@contextmanager
def sharing_parameters(share: bool) -> Iterator[None]:
    """Within it, ``deep_copy`` makes copies whose parameters share storage with the model's."""
    token = _SHARE_PARAMETERS.set(share)
    try:
        yield
    finally:
        _SHARE_PARAMETERS.reset(token)


def deep_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the user's model (fxcompress never captures the user's own object); under
    ``sharing_parameters(True)`` its parameters share storage with the user's (``shared_copy``)."""
    try:
        return shared_copy(model) if _SHARE_PARAMETERS.get() else copy.deepcopy(model)
    except Exception as exc:
        raise TraceError(f"cannot deep-copy {type(model).__name__} for tracing ({short_reason(exc)}); "
                         f"fxcompress never traces the user's own object. Make the model "
                         f"deep-copyable (e.g. drop open files, locks or hooks holding them)") from exc
