"""torch.export capture -> the canonical FX dialect every pass reads.

``torch.export.export(model, args, strict=False).module()`` is a GraphModule of aten overloads whose
parameters sit at the user's module paths and whose nodes carry ``nn_module_stack``. Canonicalization
rewrites it into the dialect symbolic tracing produces, so passes, options such as
``exclude=["classifier"]`` and golden files read the same whichever front end ran:

* parametrized aten ops (``aten.conv2d``, ``aten.linear``, ``aten.batch_norm``, ``aten.layer_norm``,
  ``aten.group_norm``, ``aten.embedding``, transposed convs) become ``call_module`` nodes of the
  standard module that produced them, named by its path (from ``nn_module_stack`` and the weight's
  qualified name);
* every other aten overload is written in its torch-level spelling from the op table
  (``aten.add.Tensor`` -> ``torch.add``, ``aten.view.default`` -> ``Tensor.view``), or kept when it
  has none;
* export's bookkeeping goes: input guards (``_guards_fn``), value-less asserts, and the
  ``lift_fresh_copy``/``detach_`` wrapping of tensor constants;
* outputs are flattened: one tensor, or a tuple of the model output's tensors in pytree order.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from . import ops
from .attrs import fetch_attr
from .errors import InputError, TraceError

aten = torch.ops.aten

#: how to lift an aten op to a module: (module classes it may come from, index of the activation
#: argument, index of the weight argument)
_LIFT: dict[Any, tuple[tuple[type[nn.Module], ...], int, int]] = {
    aten.conv1d.default: ((nn.Conv1d,), 0, 1),
    aten.conv2d.default: ((nn.Conv2d,), 0, 1),
    aten.conv3d.default: ((nn.Conv3d,), 0, 1),
    aten.conv1d.padding: ((nn.Conv1d,), 0, 1),
    aten.conv2d.padding: ((nn.Conv2d,), 0, 1),
    aten.conv3d.padding: ((nn.Conv3d,), 0, 1),
    aten.conv_transpose1d.default: ((nn.ConvTranspose1d,), 0, 1),
    aten.conv_transpose2d.input: ((nn.ConvTranspose2d,), 0, 1),
    aten.conv_transpose3d.input: ((nn.ConvTranspose3d,), 0, 1),
    aten.convolution.default: ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                nn.ConvTranspose3d), 0, 1),
    aten.linear.default: ((nn.Linear,), 0, 1),
    aten.batch_norm.default: ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), 0, 1),
    aten.layer_norm.default: ((nn.LayerNorm,), 0, 2),
    aten.group_norm.default: ((nn.GroupNorm,), 0, 2),
    aten.embedding.default: ((nn.Embedding,), 1, 0),
}


def _innermost_path(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _standard_module(root: nn.Module, path: str, classes: tuple[type[nn.Module], ...]) -> nn.Module | None:
    """The module at ``path`` when it is one of ``classes`` and runs their own forward (a subclass
    with another forward may compute something else with the same weight)."""
    try:
        mod = root.get_submodule(path)
    except AttributeError:
        return None
    cls = next((c for c in classes if isinstance(mod, c)), None)
    if cls is None or type(mod).forward is not cls.forward:
        return None
    return mod


def _lift_path(node: Node, root: nn.Module) -> str | None:
    """The module path ``node`` is lifted to, or None when it stays a function call."""
    spec = _LIFT.get(node.target)
    if spec is None:
        return None
    classes, x_index, w_index = spec
    path = _innermost_path(node)
    weight = node.args[w_index] if len(node.args) > w_index else None
    if path is None or not isinstance(weight, Node) or weight.op != "get_attr" or weight.target != f"{path}.weight":
        return None
    mod = _standard_module(root, path, classes)
    if mod is None or len(node.args) <= x_index:
        return None
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training")
        if training is not (mod.training or mod.running_mean is None):
            return None
    return path


def _is_constant_wrapper(node: Node) -> bool:
    return node.op == "call_function" and node.target in (aten.lift_fresh_copy.default, aten.detach_.default) \
        and isinstance(node.args[0], Node) and (node.args[0].op == "get_attr" or _is_constant_wrapper(node.args[0]))


def _output_nodes(value: Any) -> Any:
    leaves: list[Any] = []

    def visit(v: Any) -> None:
        if isinstance(v, (list, tuple)):
            for item in v:
                visit(item)
        elif isinstance(v, dict):
            for item in v.values():
                visit(item)
        elif v is not None:
            leaves.append(v)

    visit(value)
    return leaves[0] if len(leaves) == 1 else tuple(leaves)


def _structured(exported: GraphModule, flat: list[Any]) -> Any:
    info = getattr(exported.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        return flat[0] if len(flat) == 1 else tuple(flat)
    return pytree.tree_unflatten(flat, info.out_spec)


def _copy_meta(src: Node, dst: Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def rewrite_exported(exported: GraphModule, root: nn.Module, graph: Graph, args: Sequence[Any],
                     prefix: str = "", attrs: dict[str, Any] | None = None) -> Any:
    """Append the canonical form of ``exported``'s graph to ``graph``, with its placeholders bound to
    ``args`` (nodes of ``graph`` or constants). Module and attribute paths get ``prefix``; the
    objects behind them go into ``attrs`` (path -> module or tensor). Returns the output value:
    a node or a tuple of nodes."""
    attrs = {} if attrs is None else attrs
    env: dict[Node, Any] = {}
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        raise InputError(f"the exported graph takes {len(placeholders)} inputs, {len(args)} were given")
    env.update(zip(placeholders, args))
    result: Any = None

    def value(n: Node) -> Any:
        return env[n]

    for node in exported.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = list(map_arg(node.args[0], value))
            break
        if node.op == "call_module" and not node.users:
            continue  # export's input guards (_guards_fn)
        if node.op == "call_function" and ops.kind_of_target(node.target) == "assert" and not node.users:
            continue
        if _is_constant_wrapper(node):
            env[node] = env[node.args[0]]
            continue
        if node.op == "get_attr":
            path = prefix + str(node.target)
            attrs.setdefault(path, fetch_attr(exported, str(node.target)))
            new = graph.get_attr(path)
            env[node] = new
            _copy_meta(node, new)
            continue
        path = _lift_path(node, root) if node.op == "call_function" else None
        if node.target is aten.slice.Tensor and not node.kwargs:
            new = _emit_slice(graph, node, env)
        elif node.target is aten.diff.default and _first_order_diff(node):
            new = _emit_diff(graph, node, env)
        elif path is not None:
            full = prefix + path
            attrs[full] = root.get_submodule(path)
            x_index = _LIFT[node.target][1]
            new = graph.call_module(full, (env[node.args[x_index]],))
        else:
            op, target = node.op, node.target
            canonical = ops.canonical_target(target) if op == "call_function" else None
            if canonical is not None:
                op, target = canonical
            if op == "call_module":
                attrs[prefix + str(target)] = exported.get_submodule(str(target))
                target = prefix + str(target)
            kwargs = dict(map_arg(node.kwargs, value))
            if node.target is aten.cumsum.default and _val_dtype(node.args[0]) == torch.bool \
                    and kwargs.get("dtype") is None and len(node.args) < 3:
                kwargs["dtype"] = torch.int64  # torch promotes bool to int64; ONNX CumSum has no bool kernel
            new = graph.create_node(op, target, map_arg(node.args, value), kwargs, name=node.name)
        env[node] = new
        _copy_meta(node, new)
    return result


def _val_dtype(value: Any) -> torch.dtype | None:
    val = value.meta.get("val") if isinstance(value, Node) else None
    return getattr(val, "dtype", None)


_INT64_MAX = 2**63 - 1


def _emit_slice(graph: Graph, node: Node, env: dict[Node, Any]) -> Node:
    """``aten.slice.Tensor(x, dim, start, end, step)`` as ``x[..., start:end:step]``: indexing keeps a
    symbolic ``end`` symbolic in ONNX export (an aten call bakes in the traced value)."""
    x, dim, start, end, step = (list(map_arg(node.args, lambda n: env[n])) + [0, None, _INT64_MAX, 1][len(node.args) - 1:])[:5]
    end = None if end == _INT64_MAX else end
    start = None if start == 0 else start
    step = None if step == 1 else step
    index = slice(start, end, step)
    key = (slice(None),) * dim + (index,) if dim >= 0 else (Ellipsis, index) + (slice(None),) * (-dim - 1)
    return graph.call_function(operator.getitem, (x, key))


def _first_order_diff(node: Node) -> bool:
    n = node.args[1] if len(node.args) > 1 else node.kwargs.get("n", 1)
    return n == 1


def _emit_diff(graph: Graph, node: Node, env: dict[Node, Any]) -> Node:
    """``torch.diff(x, 1, dim, prepend, append)`` as ``y[1:] - y[:-1]`` along ``dim`` with
    ``y = cat([prepend, x, append])``: ONNX has no Diff operator."""
    names = ("input", "n", "dim", "prepend", "append")
    given = {**dict(zip(names, node.args)), **node.kwargs}
    dim = given.get("dim", -1)
    parts = [map_arg(given[k], lambda n: env[n]) for k in ("prepend", "input", "append") if given.get(k) is not None]
    x = parts[0] if len(parts) == 1 else graph.call_function(torch.cat, (parts, dim))
    hi = graph.call_function(aten.slice.Tensor, (x, dim, 1, 2**63 - 1))
    lo = graph.call_function(aten.slice.Tensor, (x, dim, 0, -1))
    return graph.call_function(torch.sub, (hi, lo))


def canonicalize(exported: GraphModule, root: nn.Module, class_name: str) -> GraphModule:
    """A new GraphModule in the canonical dialect from ``exported`` (``ExportedProgram.module()``);
    ``root`` is the module that was exported (the source of the standard modules)."""
    graph = Graph()
    inputs = [graph.placeholder(n.name) for n in exported.graph.nodes if n.op == "placeholder"]
    attrs: dict[str, Any] = {}
    out = rewrite_exported(exported, root, graph, inputs, attrs=attrs)
    graph.output(_output_nodes(out))
    _drop_unused_attrs(graph)
    return GraphModule(_attr_root(graph, attrs), graph, class_name=class_name)


def _drop_unused_attrs(graph: Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _attr_root(graph: Graph, attrs: dict[str, Any]) -> dict[str, Any]:
    """The ``{target: object}`` dict GraphModule builds its attributes from: every call_module and
    get_attr target of ``graph``. A get_attr under a lifted module's path resolves on that module."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            root[str(node.target)] = attrs[str(node.target)]
    return root


def replace_with_graph(gm: GraphModule, node: Node, exported: GraphModule, module: nn.Module,
                       args: Sequence[Any]) -> Callable[[], None]:
    """Inline ``exported`` (the capture of the submodule ``node`` calls) in place of ``node``.
    Returns a function registering the new attributes on ``gm`` (call it before ``recompile``)."""
    prefix = str(node.target) + "."
    attrs: dict[str, Any] = {}
    with gm.graph.inserting_before(node):
        out = _structured(exported, rewrite_exported(exported, module, gm.graph, args, prefix=prefix, attrs=attrs))
    if isinstance(out, (tuple, list, dict)):
        for user in list(node.users):
            field = _field_read(user, node, out)
            if field is not None:
                user.replace_all_uses_with(field)
                gm.graph.erase_node(user)
        if node.users:
            kind = "mapping (a ModelOutput)" if isinstance(out, dict) else "tuple"
            raise TraceError(f"the module's {kind} output is used other than by reading its items")
    else:
        node.replace_all_uses_with(out)
    gm.graph.erase_node(node)

    def install() -> None:
        for path, obj in attrs.items():
            _install(gm, path, obj)

    return install


def lift_addmm_linears(gm: GraphModule) -> list[str]:
    """Every ``torch.addmm(bias, x, weight)`` over a module's own ``bias`` [out] and ``weight`` [in, out],
    that module used nowhere else (Hugging Face ``Conv1D``: GPT-2's projections), becomes a
    ``call_module`` of an ``nn.Linear`` installed at that module's path, its weight the transposed view
    of the same storage (no copy). Passes that know ``Linear`` (quantization, pruning) then see these
    layers, whichever front end captured them. Returns the lifted paths."""
    readers: dict[str, list[Node]] = {}  # module path -> the nodes reading it or anything below it
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            parts = str(n.target).split(".")
            for k in range(1, len(parts) + 1):
                readers.setdefault(".".join(parts[:k]), []).append(n)
    lifted = []
    for node in list(gm.graph.nodes):
        found = _addmm_layer(gm, node, readers)
        if found is None:
            continue
        path, weight, bias, w, b = found
        for read in [u for u in weight.users if u is not node]:  # static: the shape of a parameter
            _substitute(read, _shape_value(read, w))
        old = gm.get_submodule(path)
        with torch.device("meta"):
            linear = nn.Linear(w.shape[0], w.shape[1])
        linear.weight = nn.Parameter(w.detach().t(), requires_grad=w.requires_grad)
        linear.bias = nn.Parameter(b.detach(), requires_grad=b.requires_grad)
        linear.train(old.training)
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, linear)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[1],))
        _copy_meta(node, call)
        node.replace_all_uses_with(call)
        for dead in (node, weight, bias):
            gm.graph.erase_node(dead)
        lifted.append(path)
    if lifted:
        gm.recompile()
    return lifted


def _addmm_layer(gm: GraphModule, node: Node, readers: dict[str, list[Node]]
                 ) -> tuple[str, Node, Node, nn.Parameter, nn.Parameter] | None:
    """``(module path, weight node, bias node, weight, bias)`` when ``node`` is a liftable ``addmm``
    (see above); ``readers``: every module path -> the graph nodes reading it or below it."""
    if not (node.op == "call_function" and node.target in (torch.addmm, aten.addmm.default)
            and len(node.args) == 3 and not node.kwargs):
        return None
    bias, _, weight = node.args
    if not (isinstance(bias, Node) and isinstance(weight, Node) and bias.op == weight.op == "get_attr"
            and len(bias.users) == 1 and all(u is node or _shape_read(u) for u in weight.users)):
        return None
    path, _, wname = str(weight.target).rpartition(".")
    bpath, _, bname = str(bias.target).rpartition(".")
    if not path or path != bpath or (wname, bname) != ("weight", "bias"):
        return None
    module = fetch_attr(gm, path, default=None)
    w, b = fetch_attr(gm, str(weight.target), default=None), fetch_attr(gm, str(bias.target), default=None)
    if (not isinstance(module, nn.Module) or isinstance(module, nn.Linear) or list(module.children())
            or not isinstance(w, nn.Parameter) or not isinstance(b, nn.Parameter)
            or w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[1]
            or {n for n, _ in module.named_parameters()} != {"weight", "bias"}):
        return None
    return (path, weight, bias, w, b) if set(readers.get(path, ())) == {weight, bias} else None


def _shape_read(node: Node) -> bool:
    """Whether ``node`` only reads the shape of its first argument (``w.size(d)``, ``w.size()``, ``w.shape``)."""
    if node.op == "call_method" and node.target == "size" and not node.kwargs:
        return len(node.args) == 1 or (len(node.args) == 2 and isinstance(node.args[1], int))
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)


def _shape_value(node: Node, tensor: torch.Tensor) -> Any:
    return tensor.size(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], int) else tensor.size()


def _substitute(node: Node, value: Any) -> None:
    """Replace every use of ``node`` by the constant ``value`` and erase it."""
    for user in list(node.users):
        user.args = map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = map_arg(user.kwargs, lambda a: value if a is node else a)
    node.graph.erase_node(node)


def _field_read(user: Node, node: Node, out: Any) -> Node | None:
    """The inlined value ``user`` reads from ``node``'s structured output ``out``: ``out[i]`` of a tuple;
    ``out["key"]``, ``out.key`` or ``out[i]`` (the i-th present field, as ``ModelOutput`` indexes) of a
    mapping. None when ``user`` reads it some other way."""
    if user.op != "call_function" or len(user.args) != 2 or user.args[0] is not node or user.kwargs:
        return None
    key = user.args[1]
    if isinstance(out, dict):
        if isinstance(key, str) and user.target in (operator.getitem, getattr):
            value = out.get(key)
        elif isinstance(key, int) and user.target is operator.getitem:
            present = [v for v in out.values() if v is not None]
            value = present[key] if -len(present) <= key < len(present) else None
        else:
            return None
    elif isinstance(key, int) and user.target is operator.getitem and -len(out) <= key < len(out):
        value = out[key]
    else:
        return None
    return value if isinstance(value, Node) else None


def _install(gm: GraphModule, path: str, obj: Any) -> None:
    """Make ``path`` resolve to ``obj`` on ``gm`` (the inlined module's own parameters and submodules
    already do; export's lifted constants become buffers)."""
    parent: nn.Module = gm
    *parents, name = path.split(".")
    for part in parents:
        child = getattr(parent, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            setattr(parent, part, child)
        parent = child
    if getattr(parent, name, None) is obj:
        return
    if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter) and name not in parent._parameters:
        parent.register_buffer(name, obj)
    else:
        setattr(parent, name, obj)


__all__ = ["canonicalize", "lift_addmm_linears", "replace_with_graph", "rewrite_exported"]
