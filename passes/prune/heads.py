"""Structured attention-head pruning: remove whole heads from every attention block.

A block is found from its attention core (``F.scaled_dot_product_attention``, or matmul ->
softmax -> matmul) back to the Linear projections feeding q, k and v (separate, or one fused qkv
Linear whose output is cut into its parts by reshape + index, split, chunk or slices), and forward
to the output projection. Every tensor between them carries a *layout*: its dimensions as products
of atoms ``(label, size)``, labels ``H`` (heads), ``D`` (head dim), ``P`` (q/k/v part of a fused
projection) or None. Each op in between is checked to keep heads independent (reshapes keep ``H``
whole, matmuls never contract over it, broadcast operands are size 1 along it, softmax is not taken
over it, splits and slices cut only whole parts); then removing head ``h`` is removing its rows of
q/k/v (in every part), its input columns of the output projection, and rewriting the literal
sizes of reshapes, splits and slice bounds that count heads (``-1`` needs nothing). Whatever
cannot be proven safe is skipped with the reason in ``stats["skipped"]``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress import ops
from fxcompress.errors import PassError, PipelineError
from fxcompress.pass_base import Pass, PassContext, PassResult

from ._common import check_runs, graph_totals, need_shapes, pruned_layers, totals

__all__ = ["AttentionBlock", "PruneHeads", "find_blocks"]

Atom = tuple[str | None, int]
Dim = tuple[Atom, ...]
Layout = list[Dim]


class Unsafe(Exception):
    """A block whose heads cannot be proven independent (the message says why)."""


@dataclass
class AttentionBlock:
    """One attention block: q/k/v source Linears (``sources``: path -> atoms of their output
    features), output projections (``outputs``), heads, head dim and the literal sizes (of
    reshapes, splits, slice bounds) that count heads: ``(node, path into its args, size of one
    head's share)``, a path step being a position in a tuple/list or ``start``/``stop`` of a slice."""

    name: str
    sources: dict[str, tuple[Atom, ...]]
    outputs: list[str]
    heads: int
    head_dim: int
    sizes: list[tuple[Node, tuple[int | str, ...], int]]


class Pieces(tuple):
    """Layout of a split/chunk/unbind result: one layout per piece, taken out by getitem."""


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(s) for s in shape)


def _plain(shape: tuple[int, ...]) -> Layout:
    return [((None, s),) for s in shape]


def _labels(dim: Dim) -> tuple[str, ...]:
    return tuple(label for label, _ in dim if label is not None)


def _norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


# --------------------------------------------------------------------------- layout rules per op kind

def _reshape(layout: Layout, out: tuple[int, ...], where: str) -> Layout:
    """Output layout of a pure reshape: output dims are runs of the input's atoms (unlabeled
    atoms may be split); a labeled atom that would be split or merged out of order is unsafe."""
    atoms = [a for dim in layout for a in dim if not (a[0] is None and a[1] == 1)]
    result: Layout = []
    for n in out:
        group: list[Atom] = []
        prod = 1
        while prod < n:
            if not atoms:
                raise Unsafe(f"{where}: cannot follow the heads through reshape to {list(out)}")
            label, size = atoms.pop(0)
            if n % (prod * size) == 0:
                group.append((label, size))
                prod *= size
            elif label is None and size % (n // prod) == 0 and n % prod == 0:
                need = n // prod
                group.append((None, need))
                atoms.insert(0, (None, size // need))
                prod = n
            else:
                raise Unsafe(f"{where}: reshape to {list(out)} splits the {label or 'batch'} dimension")
        result.append(tuple(group))
    if any(label is not None for label, _ in atoms):
        raise Unsafe(f"{where}: reshape to {list(out)} drops the {atoms[0][0]} dimension")
    return result


def _size_args(node: Node) -> tuple[list[Any], tuple[int, ...]]:
    """The size arguments of a view/reshape and where they sit (``(1,)`` for a list in args[1],
    ``(1 + i,)`` for varargs)."""
    if "shape" in node.kwargs or "size" in node.kwargs:
        raise Unsafe(f"{node.name}: sizes given by keyword")
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1]), (1,)
    return list(node.args[1:]), ()


def _broadcast(node: Node, layouts: dict[Node, Layout]) -> Layout:
    """Elementwise ops with broadcasting: tracked operands must agree on the head layout, and an
    untracked operand must be size 1 (broadcast) along the heads."""
    out = _shape(node)
    if out is None:
        raise Unsafe(f"{node.name}: no shape")
    result: Layout = _plain(out)
    operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, Node) and _shape(a) is not None]
    for arg in (a for a in operands if a in layouts):
        for i, dim in enumerate(reversed(layouts[arg])):
            pos = len(out) - 1 - i
            if _labels(dim):
                if _labels(result[pos]) and result[pos] != dim:
                    raise Unsafe(f"%{node.name}: operands disagree on the head layout")
                result[pos] = dim
    for arg in (a for a in operands if a not in layouts):
        for i, size in enumerate(reversed(_shape(arg))):
            if size != 1 and "H" in _labels(result[len(out) - 1 - i]):
                raise Unsafe(f"%{node.name}: operand %{arg.name} differs per head")
    return result


def _matmul(a: Layout, b: Layout, where: str) -> Layout:
    if len(a) < 2 or len(b) < 2:
        raise Unsafe(f"{where}: matmul of vectors")
    if "H" in _labels(a[-1]) or "H" in _labels(b[-2]) or _labels(a[-1]) != _labels(b[-2]):
        raise Unsafe(f"{where}: matmul contracts over heads or unmatched dimensions")
    batch: Layout = []
    for i in range(max(len(a), len(b)) - 2, 0, -1):
        da = a[-2 - i] if i <= len(a) - 2 else ((None, 1),)
        db = b[-2 - i] if i <= len(b) - 2 else ((None, 1),)
        for mine, other in ((da, db), (db, da)):
            if _labels(mine) and other != mine and math.prod(s for _, s in other) != 1:
                raise Unsafe(f"{where}: matmul operand differs per head or disagrees on the head layout")
        batch.append(da if _labels(da) or math.prod(s for _, s in da) != 1 else db)
    return [*batch, a[-2], b[-1]]


def _transpose(layout: Layout, d0: int, d1: int) -> Layout:
    out = list(layout)
    d0, d1 = _norm_dim(d0, len(out)), _norm_dim(d1, len(out))
    out[d0], out[d1] = out[d1], out[d0]
    return out


def _dim_arg(node: Node, pos: int, name: str, default: Any = None) -> Any:
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def _section(dim: Dim, start: int, stop: int, where: str) -> Dim:
    """Atoms of ``dim[start:stop]``: any range of an unlabeled dim, else whole parts of a fused
    projection (the dim is ``P`` x the rest, the range a multiple of one part)."""
    total = math.prod(s for _, s in dim)
    if not _labels(dim) or (start, stop) == (0, total):
        return dim if (start, stop) == (0, total) else ((None, stop - start),)
    part = math.prod(s for _, s in dim[1:])
    if dim[0][0] != "P" or start % part or (stop - start) % part or stop <= start:
        raise Unsafe(f"{where}: cuts the {'x'.join(_labels(dim))} dimension at {start}:{stop}, "
                     "not at whole parts")
    count = (stop - start) // part
    return ((("P", count),) if count > 1 else ()) + dim[1:]


def _count(node: Node, value: Any, path: tuple[Any, ...], size: int, heads: int, sizes: list) -> None:
    """Record a literal size or bound along ``size`` elements that count heads: it scales with the
    heads kept (None and bounds past the end need nothing)."""
    if value is None or isinstance(value, int) and value > size:
        return
    if not isinstance(value, int):
        raise Unsafe(f"%{node.name}: a size or bound along the heads is computed at run time (%{value})")
    sizes.append((node, path, value // heads))


def _split(node: Node, lay: Layout, sizes: list, heads: int) -> Pieces:
    """Pieces of split / chunk / unbind: along an unlabeled dim, or into whole parts of a fused
    projection; literal split sizes along the heads are recorded for rewriting."""
    name, where = ops.op_name(node.target), f"%{node.name}"
    dim = _dim_arg(node, 1 if name == "unbind" else 2, "dim", 0)
    if not isinstance(dim, int) or name == "tensor_split" or len(node.args) < (1 if name == "unbind" else 2):
        raise Unsafe(f"{where}: {name} is not followed")
    dim = _norm_dim(dim, len(lay))
    total = math.prod(s for _, s in lay[dim])
    if name == "unbind":
        if _labels(lay[dim]) not in ((), ("P",)):
            raise Unsafe(f"{where}: unbinds the {_labels(lay[dim])} dimension")
        return Pieces(lay[:dim] + lay[dim + 1:] for _ in range(total))
    arg = node.args[1]
    if name == "chunk":
        if not isinstance(arg, int):
            raise Unsafe(f"{where}: chunk count computed at run time")
        step = -(-total // arg)
        lengths, paths = [min(step, total - i) for i in range(0, total, step)], []
    elif isinstance(arg, int):
        lengths, paths = [min(arg, total - i) for i in range(0, total, arg)], [(1,)]
    else:
        lengths, paths = list(arg), [(1, i) for i in range(len(arg))]
    if any(not isinstance(n, int) for n in lengths):
        raise Unsafe(f"{where}: split sizes computed at run time")
    pieces, start = [], 0
    for n in lengths:
        pieces.append(lay[:dim] + [_section(lay[dim], start, start + n, where)] + lay[dim + 1:])
        start += n
    if _labels(lay[dim]):
        for path in paths:
            _count(node, arg if len(path) == 1 else arg[path[1]], path, total, heads, sizes)
    return Pieces(pieces)


def _index_items(node: Node, rank: int) -> list[tuple[Any, tuple[Any, Any] | None]]:
    """Per input dim of a getitem / select: its index item and where its slice bounds sit in the
    node's args (None where there are none)."""
    name = ops.op_name(node.target)
    if name == "select":
        if not isinstance(node.args[1], int):
            raise Unsafe(f"%{node.name}: indexing is not followed")
        return [(slice(None), None)] * _norm_dim(node.args[1], rank) + [(node.args[2], None)]
    index = node.args[1]
    if not isinstance(index, tuple):
        return [(index, ((1, "start"), (1, "stop")))]
    items: list[tuple[Any, tuple[Any, Any] | None]] = []
    for i, item in enumerate(index):
        if item is Ellipsis:
            items += [(slice(None), None)] * (rank - len(index) + 1)
        else:
            items.append((item, ((1, i, "start"), (1, i, "stop"))))
    return items


def _index(node: Node, lay: Layout, sizes: list, heads: int) -> Layout:
    """Layout after getitem (ints, slices, ``...``) or select: an int may drop an
    unlabeled or ``P`` dim, a slice keeps whole parts (its literal bounds are recorded)."""
    where = f"%{node.name}"
    items = _index_items(node, len(lay))
    result: Layout = []
    for i, dim in enumerate(lay):
        item, paths = items[i] if i < len(items) else (slice(None), None)
        if isinstance(item, int) and not isinstance(item, bool):
            if _labels(dim) not in ((), ("P",)):
                raise Unsafe(f"{where}: indexes the {_labels(dim)} dimension")
            continue
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise Unsafe(f"{where}: indexing is not followed")
        size = math.prod(s for _, s in dim)
        start, stop, _ = item.indices(size)
        result.append(_section(dim, start, stop, where))
        if _labels(dim) and paths is not None:
            for value, path in zip((item.start, item.stop), paths):
                _count(node, value, path, size, heads, sizes)
    return result


def _step(node: Node, layouts: dict[Node, Layout], root: nn.Module, block_sizes: list, heads: int
          ) -> Layout | None:
    """Layout of ``node``'s output given tracked inputs, or None for a non-tensor result."""
    kind = ops.kind(node, root)
    name = ops.op_name(node.target) if node.op != "call_module" else None
    x = node.args[0] if node.args else None
    lay = layouts.get(x) if isinstance(x, Node) else None
    where = f"%{node.name}"
    if isinstance(lay, Pieces) and name == "getitem" and isinstance(node.args[1], int):
        return lay[node.args[1]]
    if any(isinstance(layouts.get(a), Pieces) for a in node.all_input_nodes):
        raise Unsafe(f"{where}: {name or node.target} of a split result is not followed")
    if kind == "shape":
        return None
    if lay is not None and name == "cumsum" and "H" in _labels(lay[_norm_dim(_dim_arg(node, 1, "dim"), len(lay))]):
        raise Unsafe(f"{where}: cumsum over the heads dimension")
    if lay is not None and name in ("tril", "triu") and any("H" in _labels(d) for d in lay[-2:]):
        raise Unsafe(f"{where}: {name} over the heads dimension")
    scan_checked = kind == "scan" and name in ("cumsum", "tril", "triu")
    if (kind in ("elementwise", "broadcast", "activation", "dropout", "cast") or scan_checked) \
            and node.op != "call_module" \
            or (node.op == "call_module" and kind in ("activation", "dropout", "elementwise")):
        return _broadcast(node, layouts)
    if kind == "softmax" and lay is not None:
        dim = _dim_arg(node, 1, "dim")
        if not isinstance(dim, int) or "H" in _labels(lay[_norm_dim(dim, len(lay))]):
            raise Unsafe(f"{where}: softmax over the heads dimension")
        return list(lay)
    if kind == "permute" and lay is not None:
        if name in ("transpose", "swapaxes"):
            return _transpose(lay, node.args[1], node.args[2])
        if name == "t":
            return _transpose(lay, 0, 1)
        if name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            return [lay[_norm_dim(d, len(lay))] for d in dims]
        raise Unsafe(f"{where}: {name} is not followed")
    if kind == "reshape" and lay is not None and name in ("view", "reshape", "flatten", "squeeze", "unsqueeze",
                                                          "_unsafe_view"):
        out = _shape(node)
        result = _reshape(lay, out, where)
        if name in ("view", "reshape", "_unsafe_view"):
            sizes, pos = _size_args(node)
            if len(sizes) != len(out):
                raise Unsafe(f"{where}: {len(sizes)} sizes for a {len(out)}-d result")
            for i, dim in enumerate(result):
                if "H" not in _labels(dim) or sizes[i] == -1:
                    continue
                if not isinstance(sizes[i], int):
                    raise Unsafe(f"{where}: size {i} counts heads but is computed at run time (%{sizes[i]})")
                block_sizes.append((node, (*pos, i) if pos else (1 + i,), sizes[i] // heads))
        return result
    if kind == "split" and lay is not None:
        return _split(node, lay, block_sizes, heads)
    if kind == "index" and lay is not None and name in ("getitem", "select"):
        return _index(node, lay, block_sizes, heads)
    if kind == "matmul" and name in ("matmul", "bmm") and not node.kwargs:
        a, b = (layouts.get(v) or _plain(_shape(v)) for v in node.args[:2])
        return _matmul(a, b, where)
    if kind == "attention" and name == "scaled_dot_product_attention":
        if node.kwargs.get("enable_gqa"):
            raise Unsafe(f"{where}: grouped-query attention")
        q, k, v = (layouts.get(v) for v in node.args[:3])
        if q is None or k is None or v is None:
            raise Unsafe(f"{where}: q, k and v do not all come from the block's projections")
        scores = _matmul(q, _transpose(k, -2, -1), where)
        mask = _dim_arg(node, 3, "attn_mask")
        if isinstance(mask, Node):
            shape = _shape(mask) or ()
            for i, size in enumerate(reversed(shape)):
                if size != 1 and "H" in _labels(scores[len(scores) - 1 - i]):
                    raise Unsafe(f"{where}: attention mask %{mask.name} differs per head")
        return _matmul(scores, v, where)
    raise Unsafe(f"{where}: {kind or node.op} op {name or node.target} on head activations is not followed")


# --------------------------------------------------------------------------- block discovery

_THROUGH = ("reshape", "permute", "index", "split", "cast", "dropout", "elementwise")


def _source(node: Any, root: nn.Module) -> Node | None:
    """The Linear call a q/k/v operand comes from, through reshapes, transposes and part selection."""
    while isinstance(node, Node):
        kind = ops.kind(node, root)
        if node.op == "call_module" and kind == "linear":
            return node
        if kind not in _THROUGH or not node.args:
            return None
        node = node.args[0]
    return None


def _cores(gm: GraphModule) -> list[tuple[Node, tuple[Any, Any, Any]]]:
    """Attention cores and their (q, k, v) operands: SDPA calls, and matmul -> softmax -> matmul."""
    found = []
    for node in gm.graph.nodes:
        kind = ops.kind(node, gm)
        if kind == "attention" and ops.op_name(node.target) == "scaled_dot_product_attention":
            found.append((node, tuple(node.args[:3])))
        elif kind == "softmax" and node.op != "call_module":
            mm1 = node.args[0]  # back through scaling and masking to q @ k^T
            while isinstance(mm1, Node) and ops.kind(mm1, gm) in ("broadcast", "elementwise", "cast"):
                mm1 = mm1.args[0]
            users = [u for u in node.users if ops.kind(u, gm) == "matmul"]
            seen = node
            while not users and len(seen.users) == 1:  # dropout between softmax and matmul
                seen = next(iter(seen.users))
                if ops.kind(seen, gm) not in ("dropout", "cast", "elementwise"):
                    break
                users = [u for u in seen.users if ops.kind(u, gm) == "matmul"]
            if isinstance(mm1, Node) and ops.kind(mm1, gm) == "matmul" and len(users) == 1 \
                    and len(mm1.args) >= 2 and len(users[0].args) >= 2:
                found.append((users[0], (mm1.args[0], mm1.args[1], users[0].args[1])))
    return found


def _common_prefix(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths]
    prefix: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix) or ",".join(sorted(paths))


def _analyse(gm: GraphModule, core: Node, qkv: tuple[Any, Any, Any]) -> AttentionBlock:
    srcs = [_source(x, gm) for x in qkv]
    if any(s is None for s in srcs):
        raise Unsafe(f"%{core.name}: q, k or v does not come from a Linear through reshapes")
    q_shape = _shape(qkv[0])
    if q_shape is None or len(q_shape) != 4:
        raise Unsafe(f"%{core.name}: q is not (batch, heads, seq, head_dim)")
    heads, head_dim = q_shape[1], q_shape[3]
    if heads < 2:
        raise Unsafe(f"%{core.name}: one head")
    layouts: dict[Node, Layout] = {}
    sources: dict[str, tuple[Atom, ...]] = {}
    for s in dict.fromkeys(srcs):
        out = _shape(s)
        parts, rest = divmod(out[-1], heads * head_dim)
        if rest or parts not in (1, 2, 3):
            raise Unsafe(f"{s.target}: {out[-1]} output features are not (parts x {heads} heads x {head_dim})")
        atoms = (((("P", parts),) if parts > 1 else ()) + (("H", heads), ("D", head_dim)))
        sources[str(s.target)] = atoms
        layouts[s] = [*_plain(out[:-1]), atoms]
    sizes: list = []
    outputs: list[str] = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = min(order[s] for s in srcs)
    for node in list(gm.graph.nodes)[start + 1:]:
        ins = [a for a in node.all_input_nodes if a in layouts]
        if not ins or node in layouts:
            continue
        if node.op == "output":
            raise Unsafe(f"%{ins[0].name}: head activations are a model output")
        if node.op == "call_module" and ops.kind(node, gm) == "linear" and node.args[0] in layouts:
            lay = layouts[node.args[0]]
            if _labels(lay[-1]) != ("H", "D") or any(_labels(d) for d in lay[:-1]):
                raise Unsafe(f"{node.target}: takes head activations that are not (..., heads x head_dim)")
            outputs.append(str(node.target))
            continue
        lay = _step(node, layouts, gm, sizes, heads)
        if lay is not None:
            layouts[node] = lay
    if not outputs:
        raise Unsafe(f"%{core.name}: the heads do not reach an output projection Linear")
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    for path in (*sources, *outputs):
        if calls[path] != 1:
            raise Unsafe(f"{path}: module called {calls[path]} times")
    return AttentionBlock(_common_prefix([*sources, *outputs]), sources, outputs, heads, head_dim, sizes)


def find_blocks(gm: GraphModule) -> tuple[list[AttentionBlock], dict[str, str]]:
    """Attention blocks whose heads can be removed safely, and the skipped ones with the reason
    (keyed by the core node). Nodes must carry shapes."""
    blocks: list[AttentionBlock] = []
    skipped: dict[str, str] = {}
    for core, qkv in _cores(gm):
        try:
            block = _analyse(gm, core, qkv)
        except Unsafe as exc:
            skipped[f"%{core.name}"] = str(exc)
            continue
        if any(set(block.sources) & set(b.sources) for b in blocks):
            skipped[block.name] = "shares a projection with another block"
            continue
        blocks.append(block)
    return blocks, skipped


# --------------------------------------------------------------------------- importance and rewrite

def _heads_of(x: torch.Tensor, block: AttentionBlock) -> torch.Tensor:
    return x.detach().double().reshape(-1, block.heads, block.head_dim)


def head_scores(gm: GraphModule, blocks: list[AttentionBlock], criterion: str, data: Iterable[Any], *,
                argument: str, pass_name: str, batches: int) -> dict[str, torch.Tensor]:
    """Per-block head scores: L2 norm of each head's slice of the output projection's input
    (``norm``), or ``sum |activation * grad|`` of the same slice (``taylor``)."""
    from passes.data import explain_failure, input_specs, iter_batches, to_device

    from .importance import _loss

    scores = {b.name: torch.zeros(b.heads, dtype=torch.float64) for b in blocks}
    taken: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}

    def hook(block: AttentionBlock):
        def pre(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if criterion == "taylor" and x.requires_grad:
                x.retain_grad()
            taken[block.name].append(x)
        return pre

    handles = [gm.get_submodule(p).register_forward_pre_hook(hook(b)) for b in blocks for p in b.outputs]
    params = list(gm.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(criterion == "taylor")
        specs = input_specs(gm)
        with torch.set_grad_enabled(criterion == "taylor"):
            for i, (inputs, target) in enumerate(iter_batches(data, gm, argument=argument, pass_name=pass_name,
                                                              limit=batches)):
                with explain_failure(inputs, specs, argument=argument, pass_name=pass_name, index=i):
                    out = gm(*inputs)
                if criterion == "taylor":
                    _loss(out, to_device(target, None)).backward()
                for block in blocks:
                    for x in taken[block.name]:
                        if criterion == "norm":
                            scores[block.name] += _heads_of(x, block).pow(2).sum((0, 2))
                        elif x.grad is not None:
                            scores[block.name] += (_heads_of(x, block) * _heads_of(x.grad, block)).abs().sum((0, 2))
                    taken[block.name].clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
    return {k: v.sqrt() if criterion == "norm" else v for k, v in scores.items()}


def _keep_index(atoms: tuple[Atom, ...], kept: torch.Tensor) -> torch.Tensor:
    sizes = [s for _, s in atoms]
    axis = [label for label, _ in atoms].index("H")
    return torch.arange(math.prod(sizes)).reshape(sizes).index_select(axis, kept).flatten()


def _replace_linear(gm: GraphModule, path: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    old = gm.get_submodule(path)
    w = old.weight.detach()
    w = w if rows is None else w.index_select(0, rows)
    w = w if cols is None else w.index_select(1, cols)
    new = torch.nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=old.bias is not None,
                                   device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w.clone(), requires_grad=old.weight.requires_grad)
    if old.bias is not None:
        b = old.bias.detach()
        new.bias = nn.Parameter((b if rows is None else b.index_select(0, rows)).clone(),
                                requires_grad=old.bias.requires_grad)
    new.train(old.training)
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, new)


def _put(args: Any, path: tuple[Any, ...], value: int) -> Any:
    """``args`` with the item at ``path`` (tuple/list positions, ``start``/``stop`` of a slice) replaced."""
    head, rest = path[0], path[1:]
    if isinstance(args, slice):
        fields = {"start": args.start, "stop": args.stop, "step": args.step}
        fields[head] = _put(fields[head], rest, value) if rest else value
        return slice(fields["start"], fields["stop"], fields["step"])
    items = list(args)
    items[head] = _put(items[head], rest, value) if rest else value
    return type(args)(items)


def remove_heads(gm: GraphModule, block: AttentionBlock, kept: torch.Tensor) -> None:
    """Remove every head of ``block`` not in ``kept`` (sorted head indices) from ``gm``."""
    for path, atoms in block.sources.items():
        _replace_linear(gm, path, _keep_index(atoms, kept), None)
    for path in block.outputs:
        _replace_linear(gm, path, None, _keep_index((("H", block.heads), ("D", block.head_dim)), kept))
    for node, path, per_head in block.sizes:
        node.args = _put(node.args, path, per_head * len(kept))


@dataclass(frozen=True)
class PruneHeads(Pass):
    """Remove ``ratio`` of the attention heads of every attention block (at least ``min_heads``
    kept), the least important first.

    ``importance``: ``norm`` (L2 norm of each head's output, the output projection's input, on
    calibration data, else train_data, else the example inputs; ``batches`` of them) or
    ``taylor`` (``sum |activation * grad|`` of the same slice; needs train_data or calibration).
    ``exclude``: module path patterns; a block with a matching projection is kept whole.
    Blocks whose heads cannot be proven independent are listed in ``stats["skipped"]`` with the
    reason. With ``ratio=0`` nothing is removed and the instance is ``exact``.
    """

    name: ClassVar[str] = "prune-heads"
    shares_weights: ClassVar[bool] = True
    exact: ClassVar[bool] = False

    ratio: float = 0.5
    importance: Literal["norm", "taylor"] = "norm"
    exclude: tuple[str, ...] = ()
    min_heads: int = 1
    batches: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "exact", self.ratio == 0.0)
        if not 0.0 <= self.ratio < 1.0:
            raise PipelineError(f"prune-heads: ratio={self.ratio} must be in [0, 1)")
        if self.min_heads < 1 or self.batches < 1:
            raise PipelineError("prune-heads: min_heads and batches must be >= 1")

    def n_remove(self, heads: int) -> int:
        return max(0, min(int(math.floor(self.ratio * heads + 1e-9)), heads - self.min_heads))

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        need_shapes(gm, ctx.example_inputs, self.name)
        before = graph_totals(gm)
        result = PassResult(graph=gm)
        found, skipped = find_blocks(gm)
        blocks = []
        for block in found:
            hit = [p for p in (*block.sources, *block.outputs) if any(fnmatch.fnmatchcase(p, x) for x in self.exclude)]
            if hit:
                skipped[block.name] = f"excluded by pattern ({', '.join(hit)})"
            elif self.n_remove(block.heads) == 0:
                skipped[block.name] = f"ratio={self.ratio} of {block.heads} heads (min_heads={self.min_heads}) removes none"
            else:
                blocks.append(block)
        for where, reason in skipped.items():
            result.info(f"not pruned: {reason}", node=where)
        rows: dict[str, dict[str, Any]] = {}
        if blocks:
            data, argument = ((ctx.calibration, "calibration") if ctx.calibration is not None else
                              (ctx.train_data, "train_data") if ctx.train_data is not None else
                              ([ctx.example_inputs], "example_inputs"))
            if self.importance == "taylor" and argument == "example_inputs":
                raise PassError("prune-heads: importance='taylor' needs data: pass train_data= or calibration= "
                                "to fxcompress.compile(), or choose importance='norm'", pass_name=self.name)
            scores = head_scores(gm, blocks, self.importance, data, argument=argument, pass_name=self.name,
                                 batches=self.batches)
            for block in blocks:
                params = sum(gm.get_submodule(p).weight.numel() + (gm.get_submodule(p).bias.numel()
                             if gm.get_submodule(p).bias is not None else 0) for p in (*block.sources, *block.outputs))
                order = sorted(range(block.heads), key=lambda h: (float(scores[block.name][h]), h))
                removed = sorted(order[:self.n_remove(block.heads)])
                kept = torch.tensor([h for h in range(block.heads) if h not in removed], dtype=torch.long)
                remove_heads(gm, block, kept)
                after = sum(p.numel() for path in (*block.sources, *block.outputs)
                            for p in gm.get_submodule(path).parameters())
                rows[block.name] = {"heads_before": block.heads, "heads_after": len(kept), "head_dim": block.head_dim,
                                    "removed_heads": removed, "projections": [*block.sources, *block.outputs],
                                    "params_before": params, "params_after": after,
                                    "scores": [round(float(s), 6) for s in scores[block.name]]}
            check_runs(gm, ctx.example_inputs, self.name)
        elif not found:
            reason = "; ".join(skipped.values()) or "no attention core (scaled_dot_product_attention or " \
                                                     "matmul -> softmax -> matmul) in the graph"
            result.warn(f"no attention block found: {reason}")
        else:
            result.warn("no head removed: every attention block was skipped (see stats['skipped'])")
        after = graph_totals(gm)
        result.stats = {**totals(before, after), "blocks": rows, "skipped": skipped, "importance": self.importance,
                        "ratio": self.ratio}
        result.layers = pruned_layers(rows, "heads", "heads_before", "heads_after", kind="attention")
        return result
