"""nn.Module -> torch.fx.GraphModule, with errors that say where tracing failed and how to fix it.

``trace`` deep-copies the model (the user's object, weights and training flag stay untouched),
symbolically traces the copy with a custom ``torch.fx.Tracer`` and propagates shapes so every
node carries ``meta["tensor_meta"]``. A submodule that cannot be traced (data-dependent control
flow, iterating a Proxy, an untraceable call) is kept as an opaque leaf and the trace retried, so
the rest of the model stays visible to passes; ``gm.meta["opaque_modules"]`` lists every module no
pass can look into, with the reason.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import linecache
import operator
import os
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node, Tracer

from .canonicalize import lift_addmm_linears
from .copying import deep_copy, sharing_parameters
from .errors import InputError, TraceError, short_reason
from .torch_export import export_fallback, export_trace, inline_opaque
from .verify import fresh_inputs, propagate_shapes

OnUntraceable = Literal["leaf", "error"]

#: Modules kept opaque unless the user says otherwise: torch.fx cannot trace them (their forward
#: branches on tensor properties) or they would expand into huge graphs no pass rewrites.
DEFAULT_LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)

REASON_DEFAULT_LEAF = "leaf by default"
REASON_USER_LEAF = "leaf_modules"

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_THIS_FILE = os.path.abspath(__file__)


@dataclass(frozen=True)
class _Failure:
    path: str
    type_name: str
    exc: BaseException


class _Tracer(Tracer):
    """A Tracer that honours leaf types/paths and remembers the innermost module that failed."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: frozenset[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.failure: _Failure | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any | None = None) -> Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        loc = _caller_location() if kind not in ("placeholder", "output") else None
        if loc is not None:
            node.meta["source_location"] = loc
        return node

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            path: str | None = self.path_of_module(m)
        except NameError:
            path = None
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if path and not (self.failure is not None and _in_chain(self.failure.exc, exc)):
                self.failure = _Failure(path, type(m).__name__, exc)
            raise


def _in_chain(needle: BaseException, exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if cur is needle:
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _is_library_file(filename: str) -> bool:
    fn = os.path.abspath(filename)
    in_stdlib = fn.startswith(_STDLIB_DIR) and "-packages" + os.sep not in fn
    return filename.startswith("<") or fn.startswith(_TORCH_DIR) or in_stdlib or fn == _THIS_FILE


def _caller_location() -> str | None:
    """``file:line`` of the user's code creating the current node (cheap: walks live frames)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename == __file__ or os.path.abspath(filename) == _THIS_FILE:
            return None
        if not _is_library_file(filename):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the user's code (not torch, stdlib or us)."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        if not _is_library_file(fr.filename):
            return fr
    return frames[-1] if frames else None


def _where(exc: BaseException) -> str:
    fr = _user_frame(exc)
    if fr is None:
        return "unknown location"
    line = (fr.line or linecache.getline(fr.filename, fr.lineno or 0)).strip()
    text = f"{fr.filename}:{fr.lineno} in {fr.name}"
    return f"{text}: {line}" if line else text


def _trace_error(model: nn.Module, failure: _Failure | None, exc: BaseException,
                 on_untraceable: str) -> TraceError:
    where = _where(failure.exc if failure else exc)
    reason = short_reason(failure.exc if failure else exc)
    if failure is None:
        msg = (f"cannot trace the top-level forward of {type(model).__name__}: {reason}\n"
               f"  at {where}\n"
               f"  fix: pass concrete_args={{...}} for the argument that decides this branch, rewrite the "
               f"data-dependent code with tensor ops (e.g. torch.where), or move it into a submodule and "
               f"mark that submodule a leaf via leaf_modules=...")
        path, type_name = "", type(model).__name__
    else:
        path, type_name = failure.path, failure.type_name
        msg = (f"cannot trace module '{path}' ({type_name}): {reason}\n"
               f"  at {where}\n"
               f"  fix: keep it opaque with leaf_modules=['{path}'] (or leaf_modules=[{type_name}]), "
               f"pass concrete_args={{...}} for the argument that decides this branch, or trace with "
               f"on_untraceable='leaf'")
        if on_untraceable == "leaf":
            msg += " (already on: the same module failed again)"
    err = TraceError(msg)
    err.module_path = path  # type: ignore[attr-defined]
    err.module_type = type_name  # type: ignore[attr-defined]
    err.location = where  # type: ignore[attr-defined]
    return err


def _check_inputs(model: Any, example_inputs: Any, concrete_args: dict[str, Any] | None
                  ) -> tuple[torch.Tensor, ...]:
    if not isinstance(model, nn.Module):
        raise InputError(f"trace(model=...) expects a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise InputError(f"example_inputs must be a tuple of tensors (or one tensor), got "
                         f"{type(example_inputs).__name__}")
    inputs = tuple(example_inputs)
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"example_inputs[{i}] is a {type(t).__name__}, not a tensor; pass non-tensor "
                             f"arguments of forward via concrete_args={{name: value}}")
    if concrete_args is not None and not isinstance(concrete_args, dict):
        raise InputError(f"concrete_args must be a dict {{argument name: value}}, got "
                         f"{type(concrete_args).__name__}")
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return inputs
    params = [p for p in sig.parameters.values() if p.name not in (concrete_args or {})]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return inputs
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if not len(required) <= len(inputs) <= len(positional):
        names = ", ".join(p.name for p in positional) or "none"
        raise InputError(f"{type(model).__name__}.forward takes {len(required)} required tensor argument(s) "
                         f"({names}) but example_inputs has {len(inputs)}")
    return inputs


def _leaf_spec(model: nn.Module, leaf_modules: Iterable[Any]) -> tuple[tuple[type, ...], frozenset[str]]:
    types: list[type] = []
    paths: set[str] = set()
    names = dict(model.named_modules())
    for item in leaf_modules:
        if isinstance(item, str):
            if item not in names or item == "":
                known = ", ".join(n for n in names if n) or "none"
                raise InputError(f"leaf_modules: no submodule named '{item}' in {type(model).__name__}; "
                                 f"submodules are: {known}")
            paths.add(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise InputError(f"leaf_modules entries must be nn.Module subclasses or qualified submodule "
                             f"names, got {item!r}")
    return tuple(types), frozenset(paths)


def _opaque_modules(gm: GraphModule, user_types: tuple[type, ...], user_paths: frozenset[str],
                    untraceable: dict[str, str]) -> dict[str, str]:
    """Every opaque module called in the graph, in graph order, with why it is opaque."""
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in out:
            continue
        path = str(node.target)
        mod = gm.get_submodule(path)
        if path in untraceable:
            out[path] = untraceable[path]
        elif path in user_paths or (user_types and isinstance(mod, user_types)
                                    and not _is_torch_nn(mod)):
            out[path] = REASON_USER_LEAF
        elif isinstance(mod, DEFAULT_LEAF_TYPES):
            out[path] = REASON_DEFAULT_LEAF
    return out


def _is_torch_nn(mod: nn.Module) -> bool:
    m = type(mod).__module__
    return (m.startswith("torch.nn") or m.startswith("torch.ao.nn")) and not isinstance(mod, nn.Sequential)


class _NodeRunner(Interpreter):
    """Interpreter that remembers the node it is running, to name the one that fails."""

    current: Node | None = None

    def run_node(self, n: Node) -> Any:
        self.current = n
        return super().run_node(n)


def _describe(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        return f"node '{node.name}' (module '{node.target}': {type(mod).__name__})"
    if node.op in ("call_function", "call_method"):
        fn = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({node.op} {fn})"
    return f"node '{node.name}' ({node.op} {node.target})"


def _bind_concrete(gm: GraphModule, model: nn.Module, concrete_args: dict[str, Any]) -> None:
    """Fold each plain (non-tensor) concrete argument into the graph: drop the guards torch.fx adds
    on it (``_assert(x == value)``, ``_assert_is_none``), use the value where the graph still reads
    it, and remove its placeholder. The graph then takes exactly the example tensors, as
    ``gm(*example_inputs)``, ONNX export and the runners expect."""
    if not concrete_args:
        return
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return
    if len(names) != len(placeholders):
        return
    for name, node in zip(names, placeholders):
        if name not in concrete_args or isinstance(concrete_args[name], torch.Tensor):
            continue
        value = concrete_args[name]
        for user in list(node.users):
            _erase_guard(gm, user)
        for user in list(node.users):
            user.args = torch.fx.node.map_arg(user.args, lambda n, node=node: value if n is node else n)
            user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda n, node=node: value if n is node else n)
        gm.graph.erase_node(node)
    gm.recompile()


def _erase_guard(gm: GraphModule, node: Node) -> None:
    """Erase ``node`` if it is a torch.fx specialization guard on a concrete argument."""
    if node.op != "call_function":
        return
    if node.target is getattr(torch.fx._symbolic_trace, "_assert_is_none", None) and not node.users:
        gm.graph.erase_node(node)
    elif node.target is operator.eq and node.users and all(
            u.op == "call_function" and u.target is torch._assert and not u.users for u in node.users):
        for u in list(node.users):
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)


def _propagate(gm: GraphModule, inputs: tuple[Any, ...]) -> None:
    """Shape propagation; a failure becomes a TraceError naming the node and its source line."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            propagate_shapes(gm, inputs)
        return
    except Exception as exc:
        nodes = {n.name: n for n in gm.graph.nodes}
        node = nodes.get(getattr(exc, "node", None) or "")
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if node is None:
            node, cause = _locate_failure(gm, inputs, exc)
    shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else repr(t) for t in inputs)
    where = _describe(gm, node) if node is not None else "an unknown node"
    loc = node.meta.get("source_location") if node is not None else None
    src = f"\n  created at {loc}" if loc else ""
    err = TraceError(f"shape propagation failed at {where}: {short_reason(cause)}{src}\n"
                     f"  example_inputs had shapes [{shapes}]; check they match what the model expects")
    err.node = node.name if node is not None else None  # type: ignore[attr-defined]
    raise err from cause


def _locate_failure(gm: GraphModule, inputs: tuple[Any, ...], exc: BaseException
                    ) -> tuple[Node | None, BaseException]:
    runner = _NodeRunner(gm)
    try:
        with torch.no_grad():
            runner.run(*fresh_inputs(inputs))
    except Exception as again:
        return runner.current, again
    return None, exc


Frontend = Literal["auto", "fx", "export"]
FRONTENDS: tuple[str, ...] = ("auto", "fx", "export")


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    *,
    frontend: Frontend = "auto",
    dynamic_axes: Any = "batch",
    leaf_modules: Iterable[type[nn.Module] | str] = (),
    concrete_args: dict[str, Any] | None = None,
    on_untraceable: OnUntraceable = "leaf",
    train: bool = False,
    share_parameters: bool = False,
) -> GraphModule:
    """Capture a deep copy of ``model`` into a canonical GraphModule whose nodes carry shapes and dtypes.

    ``frontend``: ``"fx"`` symbolically traces (an untraceable submodule is kept as an opaque leaf,
    see ``on_untraceable``); ``"export"`` captures with ``torch.export.export(strict=False)`` below
    Python control flow; ``"auto"`` (default) traces, exports the whole model when its top level
    cannot be traced, and exports and inlines every submodule holding parameters that tracing left
    opaque (those the user named in ``leaf_modules`` stay leaves). Exported graphs are canonicalized
    (``fxcompress.canonicalize``) so every front end gives the same dialect. ``dynamic_axes``
    (``"batch"``, None or ``{input name: axes}``) says which input axes export keeps symbolic.
    ``gm.meta["opaque_modules"]`` maps each module no pass can look into to the reason;
    ``gm.meta["frontend"]`` says what captured the graph. ``share_parameters``: the copy's parameters
    share storage with ``model``'s (no weight memory; ``compile`` does this and gives its result
    copies of its own at the end); nothing fxcompress does writes into them.
    """
    with sharing_parameters(share_parameters):
        return _capture(model, example_inputs, frontend, dynamic_axes, leaf_modules, concrete_args, on_untraceable,
                        train)


def _capture(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, frontend: Frontend,
             dynamic_axes: Any, leaf_modules: Iterable[type[nn.Module] | str], concrete_args: dict[str, Any] | None,
             on_untraceable: OnUntraceable, train: bool) -> GraphModule:
    if on_untraceable not in ("leaf", "error"):
        raise InputError(f"on_untraceable must be 'leaf' or 'error', got {on_untraceable!r}")
    if frontend not in FRONTENDS:
        raise InputError(f"frontend must be one of {', '.join(map(repr, FRONTENDS))}, got {frontend!r}")
    inputs = _check_inputs(model, example_inputs, concrete_args)
    user_types, user_paths = _leaf_spec(model, leaf_modules)
    if frontend == "export":
        gm = export_trace(model, inputs, dynamic_axes=dynamic_axes, concrete_args=concrete_args, train=train)
    else:
        try:
            gm = _symbolic_trace(model, inputs, user_types, user_paths, concrete_args, on_untraceable, train)
        except TraceError as fx_error:
            if frontend == "fx" or getattr(fx_error, "module_path", "") != "":
                raise
            gm = export_fallback(model, inputs, fx_error, dynamic_axes=dynamic_axes, concrete_args=concrete_args,
                                 train=train)
        else:
            gm.meta["frontend"] = "fx"
            if frontend == "auto":
                inline_opaque(gm, inputs, dynamic_axes=dynamic_axes, user_paths=user_paths, user_types=user_types)
    lift_addmm_linears(gm)
    _propagate(gm, inputs)
    return gm


def _symbolic_trace(model: nn.Module, inputs: tuple[torch.Tensor, ...], user_types: tuple[type, ...],
                    user_paths: frozenset[str], concrete_args: dict[str, Any] | None, on_untraceable: str,
                    train: bool) -> GraphModule:
    leaf_types = tuple(user_types) + DEFAULT_LEAF_TYPES
    untraceable: dict[str, str] = {}
    max_attempts = sum(1 for _ in model.modules()) + 1
    for _ in range(max_attempts):
        root = deep_copy(model)
        root.train(train)
        tracer = _Tracer(leaf_types, user_paths | frozenset(untraceable))
        try:
            graph = tracer.trace(root, concrete_args=concrete_args)
        except Exception as exc:
            failure = tracer.failure
            if failure is not None and not _in_chain(failure.exc, exc):
                failure = None
            if failure is None or on_untraceable == "error" or failure.path in untraceable:
                raise _trace_error(model, failure, exc, on_untraceable) from exc
            untraceable[failure.path] = f"untraceable: {short_reason(failure.exc)} (at {_where(failure.exc)})"
            continue
        gm = GraphModule(root, graph, class_name=type(model).__name__)
        gm.train(train)  # the containers GraphModule creates for dotted paths start in train mode
        break
    else:  # pragma: no cover - each retry makes one more module opaque, so this cannot loop forever
        raise TraceError(f"tracing {type(model).__name__} did not converge")
    gm.meta["opaque_modules"] = _opaque_modules(gm, user_types, user_paths, untraceable)
    _bind_concrete(gm, model, concrete_args or {})
    return gm


#: set by ``trace(share_parameters=True)`` for the capture it runs
#: ``compile`` warns when opaque modules hold more than this share of the parameters
OPAQUE_WARN_SHARE = 0.10


def opaque_shares(gm: GraphModule) -> dict[str, float]:
    """Each opaque module's share of the graph's parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in gm.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return {path: (sum(p.numel() for p in gm.get_submodule(path).parameters()) / total if total else 0.0)
            for path in gm.meta.get("opaque_modules", {})}


def opaque_warning(gm: GraphModule) -> str | None:
    """The warning ``compile`` gives when opaque modules hold more than ``OPAQUE_WARN_SHARE`` of the
    parameters: no pass can compress what it cannot see. None otherwise."""
    shares = opaque_shares(gm)
    if sum(shares.values()) <= OPAQUE_WARN_SHARE:
        return None
    reasons = gm.meta.get("opaque_modules", {})
    lines = [f"  '{path}' ({type(gm.get_submodule(path)).__name__}, {share:.0%} of the parameters): {reasons[path]}"
             for path, share in sorted(shares.items(), key=lambda kv: -kv[1]) if share > 0]
    return (f"opaque modules hold {sum(shares.values()):.0%} of the parameters; no pass can rewrite them:\n"
            + "\n".join(lines) + "\n  fix: compile with frontend='export' (or 'auto', the default), drop them "
            "from leaf_modules=, or make their forward traceable")


__all__ = ["DEFAULT_LEAF_TYPES", "FRONTENDS", "OPAQUE_WARN_SHARE", "opaque_shares", "opaque_warning",
           "trace"]
