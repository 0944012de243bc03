"""Helpers shared by the pruning passes: which layers to prune, the classifier head, and the
before/after totals every pruning pass reports."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.errors import PassError
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import PassResult

from .._fx_utils import unmatched_patterns

WEIGHT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")

#: ops a classifier head's output may pass through on its way to the model output
_HEAD_PASS_METHODS = {"view", "reshape", "flatten", "squeeze", "contiguous", "float", "to", "softmax",
                      "log_softmax", "sigmoid"}


def _weight_layer(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))


def head_layers(gm: GraphModule) -> set[str]:
    """Module paths of the last Linear/Conv producing each model output (the classifier head),
    found by walking back from the output through single-input ops."""
    modules = dict(gm.named_modules())
    heads: set[str] = set()
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    stack: list[Node] = []
    torch.fx.node.map_arg(output.args, lambda n: stack.append(n) or n)
    seen: set[Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            mod = modules[str(node.target)]
            if _weight_layer(mod):
                heads.add(str(node.target))
                continue
            if any(True for _ in mod.parameters()) and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                continue
        elif node.op == "call_method" and node.target not in _HEAD_PASS_METHODS:
            continue
        elif node.op not in ("call_module", "call_function", "call_method"):
            continue
        tensors = [a for a in node.args if isinstance(a, Node) and a.meta.get("tensor_meta") is not None]
        if len(tensors) == 1:
            stack.append(tensors[0])
    return heads


def select_layers(gm: GraphModule, *, types: Sequence[str], include: Sequence[str], exclude: Sequence[str],
                  exclude_head: bool) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """Called modules whose type name is in ``types``, whose path matches an ``include`` pattern and
    no ``exclude`` pattern (nor the classifier head when ``exclude_head``); and the skipped ones
    with the reason."""
    heads = head_layers(gm) if exclude_head else set()
    called = list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"))
    chosen: list[tuple[str, nn.Module]] = []
    skipped: dict[str, str] = {}
    seen_weights: set[int] = set()
    for path in called:
        mod = gm.get_submodule(path)
        if type(mod).__name__ not in types or getattr(mod, "weight", None) is None:
            continue
        if path in heads:
            skipped[path] = "classifier head (set exclude_head=False to prune it)"
        elif not any(fnmatch.fnmatchcase(path, p) for p in include):
            skipped[path] = "not matched by include patterns"
        elif any(fnmatch.fnmatchcase(path, p) for p in exclude):
            skipped[path] = "excluded by pattern"
        elif not mod.weight.is_floating_point():
            skipped[path] = f"weight dtype {mod.weight.dtype} is not floating point"
        elif id(mod.weight) in seen_weights:
            skipped[path] = "shares its weight with an earlier layer"
        else:
            seen_weights.add(id(mod.weight))
            chosen.append((path, mod))
    return chosen, skipped


def warn_unmatched(result: PassResult, gm: GraphModule, *, include: Sequence[str] = ("*",),
                   exclude: Sequence[str] = ()) -> None:
    """Warn (in ``result``) about ``include`` / ``exclude`` patterns that match no module path of ``gm``."""
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    for option, patterns, consequence in (("include", include, "they select no layer to prune"),
                                          ("exclude", exclude, "they keep no layer from being pruned")):
        message = unmatched_patterns(option, patterns, called, consequence=consequence)
        if message:
            result.warn(message)


def tied_owners(gm: nn.Module, tensor: torch.Tensor) -> list[str]:
    """Qualified names (``module.attr``) of every parameter of ``gm`` that is ``tensor`` (tied weights)."""
    return [name for name, p in gm.named_parameters(remove_duplicate=False) if p is tensor]


def replace_weight(mod: nn.Module, value: torch.Tensor, gm: nn.Module | None = None) -> list[str]:
    """Give ``mod`` a new weight Parameter (never writes into a tensor someone else may share). With
    ``gm``, every other parameter tied to the old weight (an embedding and its output head) gets
    the same new Parameter, so the tie holds; returns the names of those others."""
    old = mod.weight
    new = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
    tied = [n for n in tied_owners(gm, old) if gm.get_submodule(n.rpartition(".")[0]) is not mod] \
        if gm is not None else []
    mod.weight = new
    for name in tied:
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent), attr, new)
    return tied


def graph_totals(gm: GraphModule) -> Any:
    """``fxcompress.stats.graph_stats`` of ``gm`` (nodes must carry shapes)."""
    from fxcompress.stats import graph_stats

    return graph_stats(gm)


def _numbers(params_before: int, params_after: int, active: int, macs_before: int, macs_after: int
             ) -> dict[str, Any]:
    """The pruning numbers of a layer or a whole graph, relative to the parameters before the pass."""
    pruned = params_before - active
    return {
        "params_before": params_before, "params_after": params_after,
        "total_params": params_before, "pruned_params": pruned, "active_params": active,
        "sparsity": pruned / params_before if params_before else 0.0,
        "compression_ratio": params_before / active if active else None,
        "macs_before": macs_before, "macs_after": macs_after,
    }


def totals(before: Any, after: Any) -> dict[str, Any]:
    """The totals every pruning pass reports: ``params_before/after``, ``total_params`` (before),
    ``pruned_params`` and ``active_params`` (non-zero after), ``sparsity`` (pruned / total),
    ``compression_ratio`` (total / active, None when nothing is left), ``macs_before/after``."""
    return _numbers(before.params, after.params, after.nonzero, before.macs, after.macs)


def layer_totals(before: Any, after: Any, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The same numbers as ``totals`` for each layer in ``names`` (module paths), from
    ``fxcompress.stats.compare`` of the graph stats before and after the pass."""
    from fxcompress.stats import compare

    rows = compare(before, after)["layers"]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        r = rows.get(name, {})
        out[name] = _numbers(r.get("params_before", 0), r.get("params_after", 0), r.get("nonzero_after", 0),
                             r.get("macs_before", 0), r.get("macs_after", 0))
    return out


def layer_rows(gm: GraphModule, before: Any, after: Any, weight_zeros: dict[str, tuple[int, int]]
               ) -> dict[str, dict[str, Any]]:
    """Per-layer stats of an unstructured pruning pass: ``kind``, the ``layer_totals`` numbers
    (weight and bias together) and ``weight_zeros`` / ``weight_sparsity`` of the pruned weight
    alone (what ``amount`` or N:M asks for; biases are never pruned). ``weight_zeros`` maps a
    module path to ``(zeros, numel)`` of its new weight."""
    numbers = layer_totals(before, after, weight_zeros)
    return {path: {"kind": type(gm.get_submodule(path)).__name__, **numbers[path], "weight_zeros": z,
                   "weight_sparsity": z / n if n else 0.0}
            for path, (z, n) in weight_zeros.items()}


def pruned_layers(rows: dict[str, dict[str, Any]], unit: str, before: str, after: str, kind: str = ""
                  ) -> list[PassLayerRow]:
    """The typed per-layer table of a pruning pass from its ``stats`` rows (by layer): ``unit``
    counted before and after (row keys ``before`` / ``after``) and the layer's ``sparsity``, the
    share of its parameters removed or zeroed (the row's own, else from ``params_before/after``)."""
    out = []
    for path, row in rows.items():
        share = row.get("sparsity")
        if share is None:
            share = 1.0 - row["params_after"] / row["params_before"] if row["params_before"] else 0.0
        out.append(PassLayerRow(path, kind=str(row.get("kind", kind)), unit=unit, before=row[before],
                            after=row[after], metrics={"sparsity": float(share)}, key_metric="sparsity"))
    return out


def check_runs(gm: GraphModule, example_inputs: Iterable[Any], pass_name: str) -> None:
    """Re-propagate shapes on the rewritten graph; a clear ``PassError`` if it no longer runs."""
    from fxcompress.verify import propagate_shapes

    try:
        propagate_shapes(gm, tuple(example_inputs))
    except Exception as exc:  # the pass broke the graph: say so, keep the cause
        raise PassError(f"{pass_name}: the pruned graph does not run on the example inputs ({exc}); "
                        f"exclude the layers involved with exclude=[...] and report the model",
                        pass_name=pass_name) from exc


def need_shapes(gm: GraphModule, example_inputs: Sequence[Any], pass_name: str) -> None:
    """Make sure every node carries ``tensor_meta`` (propagating from the example inputs if not)."""
    if all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op in ("call_module", "placeholder")):
        return
    if not example_inputs:
        raise PassError(f"{pass_name} needs shapes: pass example_inputs to fxcompress.compile() "
                        f"(or PassContext)", pass_name=pass_name)
    check_runs(gm, example_inputs, pass_name)


#: ``(layers, skipped, result) -> {path: new weight}``: the pruning rule of an unstructured pass
WeightRule = Callable[[list[tuple[str, nn.Module]], dict[str, str], PassResult], dict[str, torch.Tensor]]


def prune_weights(gm: GraphModule, ctx: Any, pass_: Any, rule: WeightRule
                  ) -> tuple[PassResult, dict[str, Any], dict[str, tuple[int, int]]]:
    """The skeleton of an unstructured pruning pass (``prune-magnitude``, ``prune-nm``): select the
    layers by ``pass_.types / include / exclude / exclude_head``, let ``rule`` compute their new
    weights, write them (tied weights stay one tensor, said in an info row), and return the result
    with the statistics every such pass reports (totals, per-layer rows, skipped layers) and, per
    pruned layer, ``(zero weights, weights)``."""
    need_shapes(gm, ctx.example_inputs, pass_.name)
    before = graph_totals(gm)
    layers, skipped = select_layers(gm, types=pass_.types, include=pass_.include, exclude=pass_.exclude,
                                    exclude_head=pass_.exclude_head)
    result = PassResult(graph=gm)
    warn_unmatched(result, gm, include=pass_.include, exclude=pass_.exclude)
    new_weights = rule(layers, skipped, result)
    zeros: dict[str, tuple[int, int]] = {}
    for path, mod in layers:
        if path not in new_weights:
            continue
        new = new_weights[path]
        tied = replace_weight(mod, new, gm)
        if tied:
            result.info(f"weight tied with {', '.join(tied)}: pruned together, still one tensor", node=path)
        zeros[path] = int((new == 0).sum()), new.numel()
    after = graph_totals(gm)
    stats = {**totals(before, after), "layers": layer_rows(gm, before, after, zeros), "skipped": skipped}
    result.layers = pruned_layers(stats["layers"], "active params", "params_before", "active_params")
    return result, stats, zeros
