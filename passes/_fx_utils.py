"""Small torch.fx helpers shared by the built-in passes.

Modules, attributes and nodes of a ``GraphModule``: look them up by qualified name, swap a
module behind a ``call_module`` node without touching modules other nodes still use, read an
argument by position or keyword, read shapes from ``meta["tensor_meta"]``, tell whether a
node has side effects, and drop attributes nothing references any more.
"""

from __future__ import annotations

import fnmatch
import operator
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxcompress.attrs import fetch_attr
from fxcompress.errors import PassError

__all__ = [
    "call_arg", "delete_submodules_if_unused", "delete_unused_attributes", "eliminate_dead_code",
    "get_attr_value", "get_module", "is_impure", "is_inplace", "meta_dtype", "meta_shape",
    "module_call_nodes", "register_tensor", "replace_call_module", "replace_node", "replace_uses_with_literal", "set_module",
    "split_qualname", "unique_name", "unmatched_patterns", "writes_inputs",
]

_MUTATING_METHODS = frozenset({"copy_", "set_", "resize_", "resize_as_", "zero_", "fill_", "index_put_",
                               "masked_fill_", "scatter_", "scatter_add_", "requires_grad_", "share_memory_"})
_MUTATING_FUNCTIONS = (operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                       operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                       operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul)


def split_qualname(qualname: str) -> tuple[str, str]:
    """``"a.b.c"`` -> ``("a.b", "c")``; a top-level name has parent ``""``."""
    parent, _, name = qualname.rpartition(".")
    return parent, name


def get_module(gm: nn.Module, target: Node | str) -> nn.Module:
    """The submodule a ``call_module`` node (or a qualified name) refers to."""
    name = target.target if isinstance(target, Node) else target
    if not isinstance(name, str):
        raise PassError(f"node {target} does not refer to a submodule (target {name!r})")
    try:
        return gm.get_submodule(name)
    except AttributeError as exc:
        raise PassError(f"graph refers to submodule {name!r}, which the GraphModule does not have") from exc


def get_attr_value(gm: nn.Module, qualname: str) -> Any:
    """The object at a dotted attribute path (parameter, buffer, constant or module)."""
    try:
        return fetch_attr(gm, qualname)
    except AttributeError:
        raise PassError(f"graph refers to attribute {qualname!r}, which the GraphModule does not have") from None


def set_module(gm: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put ``module`` at ``qualname`` (its parent must exist), replacing what was there."""
    parent, name = split_qualname(qualname)
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def unique_name(gm: nn.Module, base: str) -> str:
    """A top-level attribute name derived from ``base`` that ``gm`` does not have yet."""
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "attr"
    if stem[0].isdigit():
        stem = "_" + stem
    name, i = stem, 1
    while hasattr(gm, name):
        name = f"{stem}_{i}"
        i += 1
    return name


def register_tensor(gm: GraphModule, base: str, value: torch.Tensor, *, parameter: bool = False) -> str:
    """Register ``value`` on the root module under a fresh name (a buffer, or a Parameter when
    ``parameter``); returns the name for a ``get_attr`` node."""
    name = unique_name(gm, base)
    value = value.detach()
    if parameter:
        gm.register_parameter(name, nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        gm.register_buffer(name, value)
    return name


def module_call_nodes(gm: GraphModule, target: str) -> list[Node]:
    """Every ``call_module`` node that calls the submodule ``target``."""
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]


def replace_call_module(gm: GraphModule, node: Node, new_module: nn.Module) -> str:
    """Make ``node`` call ``new_module``.

    When no other node calls the old submodule it is replaced under the same name (so graph
    text keeps its name); otherwise ``new_module`` gets a fresh name and only ``node`` is
    retargeted. The old module object is never modified. Returns the target ``node`` now calls.
    """
    if node.op != "call_module":
        raise PassError(f"replace_call_module needs a call_module node, got {node.op} node {node.name!r}")
    old = str(node.target)
    others = [n for n in module_call_nodes(gm, old) if n is not node]
    shared_by_get_attr = any(n.op == "get_attr" and (n.target == old or str(n.target).startswith(old + "."))
                             for n in gm.graph.nodes)
    if not others and not shared_by_get_attr:
        set_module(gm, old, new_module)
        return old
    name = unique_name(gm, old.replace(".", "_"))
    gm.add_submodule(name, new_module)
    node.target = name
    return name


def replace_uses_with_literal(node: Node, value: Any) -> None:
    """Put the literal ``value`` (int, float, tuple...) wherever ``node`` is used as an argument."""
    for user in list(node.users):
        user.args = map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = map_arg(user.kwargs, lambda a: value if a is node else a)


def replace_node(node: Node, replacement: Node | Any) -> None:
    """Redirect every use of ``node`` to ``replacement`` (a node or a literal) and erase ``node``."""
    if isinstance(replacement, Node):
        node.replace_all_uses_with(replacement)
    else:
        replace_uses_with_literal(node, replacement)
    node.graph.erase_node(node)


def call_arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call node, given positionally at ``index`` or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def meta_shape(node: Any) -> tuple[int, ...] | None:
    """Shape from ``meta["tensor_meta"]`` (shape propagation), or None when unknown / not a tensor."""
    tm = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    shape = getattr(tm, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def meta_dtype(node: Any) -> torch.dtype | None:
    """Dtype from ``meta["tensor_meta"]``, or None when unknown / not a tensor."""
    tm = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    return getattr(tm, "dtype", None)


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def is_inplace(node: Node) -> bool:
    """True when the node writes into one of its inputs (``x.add_``, ``relu(inplace=True)``, ``x[i] = v``)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.op == "call_function" and node.target in _MUTATING_FUNCTIONS:
        return True
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_module":
        return False
    name = _target_name(node.target)
    if name in _MUTATING_METHODS:
        return True
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


def writes_inputs(model: nn.Module) -> bool:
    """Whether running ``model`` may write into a tensor it is given, so callers feeding it user
    data must pass copies.

    Conservative: an FX graph counts as writing when any node is in-place (see ``is_inplace``),
    calls a module with ``inplace=True`` (``nn.ReLU(inplace=True)``), a mutating operator
    overload, or a leaf module outside ``torch.nn`` that does not declare
    ``_writes_inputs = False``; any module that is not an FX graph counts as writing."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not isinstance(model, GraphModule):
        return True
    for node in model.graph.nodes:
        if is_inplace(node):
            return True
        if node.op == "call_function" and getattr(getattr(node.target, "_schema", None), "is_mutable", False):
            return True
        if node.op == "call_module":
            mod = get_module(model, node)
            if isinstance(mod, GraphModule):
                if writes_inputs(mod):
                    return True
            elif getattr(mod, "inplace", False) is True:
                return True
            elif getattr(mod, "_writes_inputs", not type(mod).__module__.startswith("torch.nn")):
                return True
    return False


def is_impure(gm: GraphModule, node: Node) -> bool:
    """Whether removing ``node`` could change anything besides its own (unused) value.

    Stricter than ``Node.is_impure``: in-place ops, modules that update state (BatchNorm in
    training mode) and user-defined leaf modules (which may do anything) count as impure.
    """
    if node.op in ("placeholder", "output"):
        return True
    if is_inplace(node):
        return True
    if node.op == "call_module":
        mod = get_module(gm, node)
        if getattr(mod, "_is_impure", False):
            return True
        if not type(mod).__module__.startswith("torch.nn"):
            return True
        return bool(mod.training and getattr(mod, "track_running_stats", False))
    return node.op == "call_function" and node.is_impure()


def eliminate_dead_code(gm: GraphModule) -> int:
    """Remove nodes without users or side effects (see ``is_impure``); returns how many went."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(gm, n))
    return before - len(gm.graph.nodes)


def delete_submodules_if_unused(gm: GraphModule, targets: Iterable[str]) -> list[str]:
    """Delete each submodule in ``targets`` that no node calls or reads any more; returns those deleted."""
    called, fetched = _referenced(gm)
    deleted = []
    for target in sorted(set(targets)):
        in_use = any(_under(t, (target,)) for t in called | fetched)
        if not in_use and gm.delete_submodule(target):
            deleted.append(target)
    return deleted


def _referenced(gm: GraphModule) -> tuple[set[str], set[str]]:
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    fetched = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return called, fetched


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def delete_unused_attributes(gm: GraphModule, only: Iterable[str] | None = None) -> list[str]:
    """Delete submodules, parameters and buffers that no node reaches; returns the deleted names.

    Everything inside a called submodule stays (its forward uses it); of a module only read
    through ``get_attr``, only the fetched tensors stay. With ``only`` (a pass cleaning up after
    itself), just those parameter/buffer names are candidates and submodules are left alone.
    """
    called, fetched = _referenced(gm)
    deleted: list[str] = []
    if only is None:
        before_modules = {name for name, _ in gm.named_modules() if name}
        gm.delete_all_unused_submodules()
        deleted = sorted(before_modules - {name for name, _ in gm.named_modules() if name})
    tensors = [name for name, _ in gm.named_parameters(remove_duplicate=False)]
    tensors += [name for name, _ in gm.named_buffers(remove_duplicate=False)]
    if only is not None:
        wanted = set(only)
        tensors = [name for name in tensors if name in wanted]
    for name in tensors:
        if _under(name, called) or _under(name, fetched):
            continue
        parent, attr = split_qualname(name)
        owner = gm.get_submodule(parent) if parent else gm
        if hasattr(owner, attr):
            delattr(owner, attr)
            deleted.append(name)
    return deleted


def unmatched_patterns(option: str, patterns: Sequence[str], names: Iterable[str], *, consequence: str,
                       layers: Sequence[str] | None = None) -> str | None:
    """A warning for the fnmatch ``patterns`` of ``option`` that match none of ``names`` (module
    paths, node names, ...), or None when each matches something: a typo in ``exclude=`` or
    ``skip=`` would otherwise silently compress the layer meant to be protected. ``layers``: the
    names to show (default: ``names``)."""
    names = list(dict.fromkeys(n for n in names if n))
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if not missing:
        return None
    layers = list(layers) if layers is not None else names
    shown = ", ".join(layers[:6]) + (f" ... ({len(layers)} in all)" if len(layers) > 6 else "")
    return (f"{option}= pattern(s) {', '.join(repr(p) for p in missing)} match no layer, so {consequence}; "
            f"check the spelling against the layers here: {shown}")
