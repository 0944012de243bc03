"""ONNX-level clean-up: dead nodes + topological order, and removal of no-op nodes. Both exact.

Graph output names never change (users, manifests and the ORT runner know them by name), and
QuantizeLinear/DequantizeLinear are never touched: they are not no-ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from fxcompress.pass_base import OnnxPass, PassContext, PassResult

from ._gs_utils import bypass, np_dtype, op_counts, removed_ops, subgraph_names

__all__ = ["OnnxCleanup", "OnnxRemoveIdentity"]


@dataclass(frozen=True)
class OnnxCleanup(OnnxPass):
    """Remove nodes and tensors nothing reads (graph inputs are kept) and sort topologically."""

    name: ClassVar[str] = "onnx-cleanup"
    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = op_counts(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        after = op_counts(graph)
        return PassResult(graph=graph, stats={
            "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
            "removed": removed_ops(before, after)})


@dataclass(frozen=True)
class OnnxRemoveIdentity(OnnxPass):
    """Remove nodes that return their input unchanged: Identity, inference-mode Dropout (mask
    unused), Cast to the input's own type, Reshape to the input's own shape, Transpose with the
    identity permutation. A node is only removed when that is provable from known dtypes and
    shapes; otherwise it stays."""

    name: ClassVar[str] = "onnx-remove-identity"
    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = op_counts(graph)
        protected = subgraph_names(graph)
        kept: list[str] = []
        for node in list(graph.nodes):
            src = _noop_source(node)
            if src is None:
                continue
            if not bypass(graph, node, src, node.outputs[0], protected):
                kept.append(node.name)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        after = op_counts(graph)
        result = PassResult(graph=graph, stats={
            "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
            "removed": removed_ops(before, after)})
        for name in kept:
            result.info("no-op kept: it links a graph input/constant straight to a graph output", name)
        return result


def _noop_source(node: gs.Node) -> gs.Tensor | None:
    """The input a no-op node passes through unchanged, or None if the node is not a no-op."""
    if not node.inputs or not node.outputs or (node.domain or "") not in ("", "ai.onnx"):
        return None
    src = node.inputs[0]
    if node.op == "Identity":
        return src
    if node.op == "Dropout":
        used_mask = len(node.outputs) > 1 and node.outputs[1].outputs
        if used_mask or not _inference_dropout(node):
            return None
        return src
    if node.op == "Cast":
        want, have = node.attrs.get("to"), np_dtype(src)
        if want is None or have is None:
            return None
        try:
            import onnx

            target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(want)))
        except Exception:  # noqa: BLE001 - a type numpy lacks
            return None
        return src if target == have else None
    if node.op == "Reshape" and len(node.inputs) >= 2:
        return src if _same_shape_reshape(node) else None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        shape = src.shape
        if perm is not None and list(perm) == list(range(len(perm))):
            return src
        if perm is None and shape is not None and len(shape) <= 1:
            return src
    return None


def _inference_dropout(node: gs.Node) -> bool:
    """True when the Dropout is in inference mode (no training_mode input, or a constant False)."""
    if len(node.inputs) < 3 or node.inputs[2].name == "":
        return True
    mode = node.inputs[2]
    return isinstance(mode, gs.Constant) and not bool(np.asarray(mode.values).any())


def _same_shape_reshape(node: gs.Node) -> bool:
    src, shape_t = node.inputs[0], node.inputs[1]
    if not isinstance(shape_t, gs.Constant) or src.shape is None:
        return False
    target = [int(v) for v in np.asarray(shape_t.values).reshape(-1)]
    dims: list[Any] = list(src.shape)
    if len(target) != len(dims):
        return False
    allowzero = int(node.attrs.get("allowzero", 0))
    unmatched = 0
    for want, have in zip(target, dims):
        if want == 0 and not allowzero:
            continue  # copies the input dimension
        if isinstance(have, (int, np.integer)) and have >= 0 and want == have:
            continue
        if want == -1:
            unmatched += 1
            continue
        return False
    return unmatched <= 1 and (unmatched == 0 or _all_known_except_one(target, dims, allowzero))


def _all_known_except_one(target: list[int], dims: list[Any], allowzero: int) -> bool:
    """With one -1 and every other dimension equal to the input's, the -1 resolves to the
    input's remaining dimension, so the shape is unchanged."""
    return all(w == -1 or (w == 0 and not allowzero) or (isinstance(d, (int, np.integer)) and w == d)
               for w, d in zip(target, dims))
