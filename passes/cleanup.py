"""Clean-up passes: dead code, eval-mode dropout, identities, constant folding. All exact.

Each rewrite is one that provably keeps the outputs: where that depends on shapes or dtypes
it reads ``meta["tensor_meta"]`` (shape propagation) and leaves the node alone when unknown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from fxcompress import ops
from fxcompress.pass_base import Pass, PassContext, PassResult

from ._fx_utils import (
    call_arg,
    delete_submodules_if_unused,
    delete_unused_attributes,
    eliminate_dead_code,
    get_attr_value,
    get_module,
    is_impure,
    is_inplace,
    meta_dtype,
    meta_shape,
    register_tensor,
    replace_node,
    replace_uses_with_literal,
)

__all__ = ["EliminateDeadCode", "FoldConstants", "RemoveDropout", "RemoveIdentity"]


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove nodes whose value nobody uses and that have no side effects, then the submodules,
    parameters and buffers no node refers to any more. Placeholders are always kept."""

    name: ClassVar[str] = "eliminate-dead-code"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        before = [n.name for n in gm.graph.nodes]
        eliminate_dead_code(gm)
        kept = {n.name for n in gm.graph.nodes}
        removed_attrs = delete_unused_attributes(gm)
        removed_nodes = [name for name in before if name not in kept]
        return PassResult(graph=gm,
                          stats={"removed_nodes": removed_nodes, "removed_attributes": removed_attrs})


# --------------------------------------------------------------------------- dropout

# function -> (index of the ``training`` argument, its name, its default when absent)
_DROPOUT_FUNCTIONS: dict[Any, tuple[int, str, bool | None]] = {
    F.dropout: (2, "training", True), F.dropout1d: (2, "training", True), F.dropout2d: (2, "training", True),
    F.dropout3d: (2, "training", True), F.alpha_dropout: (2, "training", False),
    F.feature_alpha_dropout: (2, "training", False),
    torch.dropout: (2, "train", None), torch.alpha_dropout: (2, "train", None),
    torch.feature_dropout: (2, "train", None), torch.feature_alpha_dropout: (2, "train", None),
}


def _dropout_state(gm: GraphModule, node: Node) -> tuple[bool, float] | None:
    """(training, p) of a dropout node, or None when the node is not dropout."""
    if node.op == "call_module":
        mod = get_module(gm, node)
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            return bool(mod.training), float(mod.p)
        return None
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        index, name, default = _DROPOUT_FUNCTIONS[node.target]
        training = call_arg(node, index, name, default)
        p = call_arg(node, 1, "p", 0.5)
        if not isinstance(training, bool) or not isinstance(p, (int, float)):
            return True, 1.0  # decided at run time: treat as active
        return training, float(p)
    return None


@dataclass(frozen=True)
class RemoveDropout(Pass):
    """Replace eval-mode dropout (``nn.Dropout*``, ``nn.AlphaDropout``, ``F.dropout(training=False)``
    and friends) by its input. Dropout that is active (training, p > 0) is random: it is kept
    and reported."""

    name: ClassVar[str] = "remove-dropout"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(graph=gm)
        removed: list[str] = []
        skipped: dict[str, str] = {}
        modules: set[str] = set()
        for node in list(gm.graph.nodes):
            state = _dropout_state(gm, node)
            if state is None:
                continue
            training, p = state
            if training and p > 0:
                reason = ("dropout is active (training mode, or training=True / not a constant); "
                          "put the model in eval()")
                skipped[node.name] = reason
                result.warn(reason, node.name)
                continue
            if not node.args or not isinstance(node.args[0], Node):
                kwargs_input = node.kwargs.get("input")
                if not isinstance(kwargs_input, Node):
                    continue
                replace_node(node, kwargs_input)
            else:
                replace_node(node, node.args[0])
            removed.append(node.name)
            if node.op == "call_module":
                modules.add(str(node.target))
        delete_submodules_if_unused(gm, modules)
        result.stats = {"removed": removed, "skipped": skipped}
        return result


# --------------------------------------------------------------------------- identities

_MUL = ("mul", "multiply")
_DIV = ("div", "true_divide", "divide")
_SUB = ("sub", "subtract")
_DTYPE_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                  "bfloat16": torch.bfloat16, "long": torch.int64, "int": torch.int32, "bool": torch.bool}


def _name(node: Node) -> str | None:
    """The op table's name (``fxcompress.ops``) of a function or method call that writes to none of
    its inputs, else None (``x.mul_(1)`` is not the identity ``x * 1`` is)."""
    if node.op not in ("call_function", "call_method") or is_inplace(node):
        return None
    return ops.op_name(node.target)


def _is_scalar(value: Any, wanted: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == wanted


def _same_meta(a: Any, b: Node) -> bool:
    """Both nodes have known, equal shape and dtype."""
    return (isinstance(a, Node) and meta_shape(a) is not None and meta_shape(a) == meta_shape(b)
            and meta_dtype(a) is not None and meta_dtype(a) == meta_dtype(b))


def _neutral_operand(node: Node) -> Node | None:
    """``x`` for ``x * 1``, ``1 * x``, ``x / 1``, ``x - 0`` when the result has x's shape and dtype.

    ``x + 0`` is not here: it turns -0.0 into +0.0. ``x - 0`` keeps every bit, NaN and -0.0 included.
    """
    if node.op not in ("call_function", "call_method") or len(node.args) != 2:
        return None
    a, b = node.args
    name = _name(node)
    if name in _MUL and not node.kwargs:
        x = a if _is_scalar(b, 1) else b if _is_scalar(a, 1) else None
    elif name in _DIV and not any(v is not None for v in node.kwargs.values()) \
            and set(node.kwargs) <= {"rounding_mode"}:
        x = a if _is_scalar(b, 1) else None
    elif name in _SUB and not node.kwargs:
        x = a if _is_scalar(b, 0) else None
    else:
        return None
    return x if _same_meta(x, node) else None


def _flatten_is_noop(gm: GraphModule, node: Node) -> Node | None:
    """``flatten`` whose start and end dims coincide (for the input's rank) does nothing."""
    if node.op == "call_module" and isinstance(get_module(gm, node), nn.Flatten):
        mod = get_module(gm, node)
        x, start, end = (node.args[0] if node.args else None), mod.start_dim, mod.end_dim
    elif _name(node) == "flatten":
        x = call_arg(node, 0, "input")
        start, end = call_arg(node, 1, "start_dim", 0), call_arg(node, 2, "end_dim", -1)
    else:
        return None
    shape = meta_shape(x)
    if shape is None or not shape or not isinstance(start, int) or not isinstance(end, int):
        return None
    rank = len(shape)
    return x if start % rank == end % rank else None


def _reshape_is_noop(node: Node) -> Node | None:
    """``x.view(*s)`` / ``x.reshape(s)`` / ``torch.reshape(x, s)`` with s literally x's own shape."""
    if _name(node) not in ("view", "reshape") or node.kwargs or len(node.args) < 2:
        return None
    x, dims = node.args[0], node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    shape = meta_shape(x)
    return x if shape is not None and tuple(dims) == shape else None


def _cast_is_noop(node: Node) -> Node | None:
    """``x.float()`` on a float32 x, ``x.to(dtype)`` / ``x.type_as(y)`` to x's own dtype: these return x."""
    if node.op != "call_method" or not node.args:
        return None
    x = node.args[0]
    if node.target in _DTYPE_METHODS and len(node.args) == 1 and not node.kwargs:
        wanted: Any = _DTYPE_METHODS[str(node.target)]
    elif node.target == "to" and len(node.args) == 2 and isinstance(node.args[1], torch.dtype) \
            and not node.kwargs:
        wanted = node.args[1]
    elif node.target == "to" and len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        wanted = node.kwargs["dtype"]
    elif node.target == "type_as" and len(node.args) == 2 and not node.kwargs:
        wanted = meta_dtype(node.args[1])
    else:
        return None
    return x if wanted is not None and meta_dtype(x) == wanted and _same_meta(x, node) else None


def _copy_is_noop(node: Node, graph_mutates: bool) -> Node | None:
    """``x.contiguous()`` / ``x.clone()``: same values. Kept when the graph has in-place ops (the copy
    may protect x) or the copy is a graph output (removing it would hand out an alias)."""
    if graph_mutates or any(u.op == "output" for u in node.users):
        return None
    if _name(node) not in ("contiguous", "clone") or not node.args or not isinstance(node.args[0], Node):
        return None
    if set(node.kwargs) - {"memory_format"}:
        return None
    if len(node.args) > 1 and not isinstance(node.args[1], torch.memory_format):
        return None
    if node.target == "contiguous" or node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        tm = node.args[0].meta.get("tensor_meta")  # a later view() may need the contiguous layout
        if getattr(tm, "memory_format", None) != torch.contiguous_format:
            return None
    return node.args[0]


@dataclass(frozen=True)
class RemoveIdentity(Pass):
    """Replace nodes that return their input unchanged by that input.

    Covered: ``nn.Identity``; ``x * 1``, ``1 * x``, ``x / 1``, ``x - 0`` (Python scalar, same shape and
    dtype after broadcasting); ``flatten`` over a single dim; ``view``/``reshape`` to the input's own
    literal shape; casts to the input's dtype; ``clone`` and ``contiguous`` of an already contiguous
    tensor (only in graphs without in-place ops and not as a graph output). ``detach`` is kept: it matters for training passes.
    ``x + 0`` is kept: it maps -0.0 to +0.0. Rewrites that need shapes are skipped when
    ``meta["tensor_meta"]`` is missing.
    """

    name: ClassVar[str] = "remove-identity"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(graph=gm)
        graph_mutates = any(is_inplace(n) for n in gm.graph.nodes)
        removed: dict[str, str] = {}
        modules: set[str] = set()
        for node in list(gm.graph.nodes):
            kind, x = self._match(gm, node, graph_mutates)
            if x is None:
                continue
            removed[node.name] = kind
            if node.op == "call_module":
                modules.add(str(node.target))
            replace_node(node, x)
        if not any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output"):
            result.info("graph has no shape information: shape-dependent identities were not looked for; "
                        "run fxcompress.verify.propagate_shapes first")
        delete_submodules_if_unused(gm, modules)
        result.stats = {"removed": removed}
        return result

    @staticmethod
    def _match(gm: GraphModule, node: Node, graph_mutates: bool) -> tuple[str, Node | None]:
        if node.op == "call_module" and isinstance(get_module(gm, node), nn.Identity):
            x = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            return "identity", x if isinstance(x, Node) else None
        for kind, match in (("arithmetic", _neutral_operand), ("reshape", _reshape_is_noop),
                            ("cast", _cast_is_noop)):
            x = match(node)
            if x is not None:
                return kind, x
        x = _flatten_is_noop(gm, node)
        if x is not None:
            return "flatten", x
        return "copy", _copy_is_noop(node, graph_mutates)


# --------------------------------------------------------------------------- constant folding

_NONDETERMINISTIC = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.normal, torch.poisson, torch.bernoulli, torch.multinomial, torch.empty,
    torch.empty_like, torch.empty_strided, F.gumbel_softmax, F.rrelu, *_DROPOUT_FUNCTIONS,
}
_NONDETERMINISTIC_METHODS = {"bernoulli", "multinomial", "new_empty", "new_empty_strided", "exponential",
                             "geometric", "cauchy", "log_normal", "random", "uniform", "normal"}
_LITERAL_TYPES = (int, float, bool, torch.dtype, type(None))


def _is_literal(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_literal(v) for v in value)
    return isinstance(value, _LITERAL_TYPES)


@dataclass(frozen=True)
class FoldConstants(Pass):
    """Evaluate once every subgraph that depends only on parameters, buffers and constants (not
    on any graph input) and replace it by one tensor on the root module, e.g. ``weight.t()``,
    ``self.scale.exp()``, ``torch.ones(3) * 2``; non-tensor results (``w.shape[0]``) become
    literals in their users.

    Never folded: random or uninitialised values (``rand*``, ``dropout``, ``empty``), in-place ops,
    modules in training mode and user-defined modules. A folded result computed from a Parameter
    is registered as a Parameter (training passes can still update it), otherwise as a buffer.
    Results larger than ``max_bytes`` are left in the graph.
    """

    name: ClassVar[str] = "fold-constants"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = True

    max_bytes: int = 64 * 2**20

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult(graph=gm)
        values, from_param = self._evaluate(gm, result)
        frontier = self._frontier(gm, values, result)
        sources_by_id = {id(values[n]): n for n in gm.graph.nodes if n.op == "get_attr" and n in values}
        folded: dict[str, str] = {}
        for node in frontier:
            value = values[node]
            if isinstance(value, torch.Tensor):
                source = sources_by_id.get(id(value))
                if source is not None:
                    node.replace_all_uses_with(source)
                    folded[node.name] = str(source.target)
                    continue
                stored = value.detach().clone(memory_format=torch.contiguous_format)
                name = register_tensor(gm, f"{node.name}_folded", stored, parameter=from_param[node])
                with gm.graph.inserting_before(node):
                    new = gm.graph.get_attr(name)
                new.meta = dict(node.meta)
                node.replace_all_uses_with(new)
                folded[node.name] = name
            else:
                value = tuple(value) if isinstance(value, torch.Size) else value
                replace_uses_with_literal(node, value)
                folded[node.name] = repr(value)
        sources: set[str] = set()
        modules: set[str] = set()
        for node in reversed(list(gm.graph.nodes)):
            if node in values and not node.users:
                if node.op == "get_attr":
                    sources.add(str(node.target))
                elif node.op == "call_module":
                    modules.add(str(node.target))
                gm.graph.erase_node(node)
        removed_attrs = delete_unused_attributes(gm, only=sources) + delete_submodules_if_unused(gm, modules)
        result.stats = {"folded": folded, "removed_attributes": removed_attrs}
        return result

    def _foldable(self, gm: GraphModule, node: Node) -> bool:
        if node.op not in ("call_function", "call_method", "call_module") or is_impure(gm, node):
            return False
        if node.op == "call_function":
            return node.target not in _NONDETERMINISTIC
        if node.op == "call_method":
            return str(node.target) not in _NONDETERMINISTIC_METHODS
        mod = get_module(gm, node)
        return not mod.training and not isinstance(mod, (nn.modules.dropout._DropoutNd, nn.RReLU))

    def _evaluate(self, gm: GraphModule, result: PassResult) -> tuple[dict[Node, Any], dict[Node, bool]]:
        """Values of every constant node (get_attr and foldable nodes fed only by constants)."""
        values: dict[Node, Any] = {}
        from_param: dict[Node, bool] = {}
        interp = Interpreter(gm)
        interp.env = values
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                values[node] = get_attr_value(gm, str(node.target))
                from_param[node] = isinstance(values[node], nn.Parameter)
                continue
            inputs = node.all_input_nodes
            if not all(i in values for i in inputs) or not self._foldable(gm, node):
                continue
            try:
                with torch.no_grad():
                    values[node] = interp.run_node(node)
            except Exception as exc:  # the graph itself would fail here at run time; leave it in place
                result.warn(f"could not evaluate constant node: {type(exc).__name__}: {exc}", node.name)
                continue
            from_param[node] = any(from_param[i] for i in inputs) or (
                node.op == "call_module" and any(True for _ in get_module(gm, node).parameters()))
        return values, from_param

    def _frontier(self, gm: GraphModule, values: dict[Node, Any], result: PassResult) -> list[Node]:
        """Constant nodes whose value is needed by a non-constant node; a value that cannot be
        stored (not a tensor or literal, too large) makes the node non-constant, and so on."""
        while True:
            frontier = [n for n in gm.graph.nodes if n in values and n.op != "get_attr"
                        and any(u not in values for u in n.users)]
            bad = [n for n in frontier if not self._storable(n, values[n], result)]
            if not bad:
                return frontier
            for node in bad:
                del values[node]

    def _storable(self, node: Node, value: Any, result: PassResult) -> bool:
        if isinstance(value, torch.Tensor):
            size = value.numel() * value.element_size()
            if size > self.max_bytes:
                result.info(f"constant of {size} bytes exceeds max_bytes={self.max_bytes}; not folded",
                            node.name)
                return False
            return True
        return _is_literal(value) and not any(u.op == "output" for u in node.users) and not (
            isinstance(value, float) and not math.isfinite(value))
