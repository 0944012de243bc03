"""``ConvertFP16``: weights and activations in float16, numerically touchy ops kept in float32.

Conv/ConvTranspose/Linear/Embedding modules and constant tensors feeding only float16 ops become
float16; ops in ``keep_fp32`` (softmax, normalizations, reductions, exp/log by default) and
modules with no float16 rule (LSTM, attention leaves, user leaves) run in float32 with casts
around them; everything else follows its inputs. Inputs are cast to float16 after the graph
boundary and outputs back to float32, so the model still takes and returns float32. For
TensorRT, ``precision="fp16"`` on the builder is the main route; this pass makes the ONNX file
itself half precision (half the weight bytes) for ONNX Runtime GPU / other runtimes.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.attrs import fetch_attr
from fxcompress.pass_base import Pass, PassContext, PassResult

from .. import _fx_utils as fxu
from .ptq import ensure_shapes

HALF, FLOAT = torch.float16, torch.float32
_HALF_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear, nn.Embedding)
DEFAULT_KEEP = ("*softmax*", "*norm*", "mean", "sum", "var", "std", "var_mean", "exp", "log", "log1p", "pow",
                "sqrt", "rsqrt", "cumsum", "prod", "logsumexp", "*Norm*", "Softmax", "LogSoftmax")


def _target_name(node: Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


@dataclass(frozen=True)
class ConvertFP16(Pass):
    """Float16 weights and activations, with ``keep_fp32`` (fnmatch patterns of function/method
    names, module types, node names or module paths) kept in float32."""

    name: ClassVar[str] = "convert-fp16"
    shares_weights: ClassVar[bool] = True

    keep_fp32: tuple[str, ...] = DEFAULT_KEEP

    def _keep(self, gm: GraphModule, node: Node) -> bool:
        names = [node.name, _target_name(node)]
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            names.append(type(mod).__name__)
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.keep_fp32)

    def _want(self, gm: GraphModule, node: Node) -> str:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if self._keep(gm, node):
                return "fp32"
            if isinstance(mod, _HALF_MODULES):
                return "fp16"
            has_state = any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
            if has_state or not type(mod).__module__.startswith("torch.nn"):
                return "fp32"
            return "follow"
        if node.op in ("call_function", "call_method"):
            if _target_name(node) in ("to", "float", "double", "half", "type", "type_as"):
                return "none"
            return "fp32" if self._keep(gm, node) else "follow"
        return "none"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        ensure_shapes(gm, ctx)
        graph = gm.graph
        dtype: dict[Node, torch.dtype | None] = {}
        casts: dict[tuple[Node, torch.dtype], Node] = {}
        kept: list[str] = []
        halved: list[str] = []

        def meta_dtype(n: Node) -> torch.dtype | None:
            d = fxu.meta_dtype(n)
            return d if isinstance(d, torch.dtype) and d.is_floating_point else None

        def cast(a: Node, to: torch.dtype, before: Node) -> Node:
            key = (a, to)
            if key not in casts:
                with graph.inserting_after(a) if a.op != "placeholder" else graph.inserting_before(before):
                    casts[key] = graph.call_method("to", (a, to))
                dtype[casts[key]] = to
            return casts[key]

        for node in list(graph.nodes):
            if node in dtype:
                continue
            if node.op in ("placeholder", "get_attr"):
                dtype[node] = meta_dtype(node) or (FLOAT if node.op == "get_attr" and isinstance(
                    _attr(gm, node), torch.Tensor) and _attr(gm, node).is_floating_point() else None)
                continue
            if node.op == "output":
                node.args = torch.fx.node.map_arg(node.args, lambda a: cast(a, FLOAT, node)
                                                  if dtype.get(a) == HALF else a)
                continue
            want = self._want(gm, node)
            inputs = [a for a in node.all_input_nodes if dtype.get(a) in (HALF, FLOAT)]
            if want == "none":
                target = None
            elif want == "follow":
                target = HALF if any(dtype[a] == HALF for a in inputs) else None
            else:
                target = HALF if want == "fp16" else FLOAT
            if target is not None:
                mapping = {a: cast(a, target, node) for a in inputs if dtype[a] != target}
                if mapping:
                    node.args = torch.fx.node.map_arg(node.args, lambda a: mapping.get(a, a))
                    node.kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: mapping.get(a, a))
            if want == "fp16" and node.op == "call_module":
                fxu.replace_call_module(gm, node, copy.deepcopy(gm.get_submodule(str(node.target))).half())
                halved.append(node.name)
            elif want == "fp32":
                kept.append(node.name)
            out = meta_dtype(node)
            dtype[node] = (target if out is not None and target is not None else out)

        folded = self._fold_constant_casts(gm)
        fxu.eliminate_dead_code(gm)
        fxu.delete_unused_attributes(gm)
        result = PassResult(graph=gm)
        result.stats = {"fp16_modules": halved, "kept_fp32": kept, "casts": sum(
            1 for n in graph.nodes if n.op == "call_method" and n.target == "to"), "fp16_constants": folded}
        return result

    @staticmethod
    def _fold_constant_casts(gm: GraphModule) -> int:
        """A float32 constant read only through ``.to(float16)`` becomes a float16 constant."""
        count = 0
        for node in list(gm.graph.nodes):
            if node.op != "get_attr":
                continue
            value = _attr(gm, node)
            users = list(node.users)
            if not (isinstance(value, torch.Tensor) and value.dtype == FLOAT and users and all(
                    u.op == "call_method" and u.target == "to" and u.args[1:] == (HALF,) for u in users)):
                continue
            name = fxu.register_tensor(gm, f"{str(node.target).replace('.', '_')}_fp16", value.detach().half())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(name)
            for u in users:
                u.replace_all_uses_with(new)
                gm.graph.erase_node(u)
            gm.graph.erase_node(node)
            count += 1
        return count


def _attr(gm: GraphModule, node: Node) -> Any:
    return fetch_attr(gm, str(node.target), None)
