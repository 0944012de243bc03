"""ONNX constant folding (onnx-graphsurgeon's ``fold_constants``, evaluated in ONNX Runtime). Exact.

Quantized weights are the one thing folding must not touch: a weight's ``DequantizeLinear``
on constants would fold into a float tensor, losing the INT8 weights (and the Q/DQ TensorRT and
ORT need to pick integer kernels). So ``DequantizeLinear`` is never folded (onnx-graphsurgeon
0.6 already refuses to fold Q/DQ; the exclusion below keeps that true on other versions).
The weight's ``QuantizeLinear`` (float weight -> INT8) is folded by this pass itself, by
default: the model then stores INT8 weights (4x smaller) read by ``DequantizeLinear``, the
form ONNX Runtime's own quantizer writes and TensorRT's ONNX parser accepts for explicit
quantization (checked with the TensorRT-RTX parser and builder). The INT8 values are computed
by ONNX Runtime's own QuantizeLinear kernel, so they are exactly what the Q node would produce
at run time. ``fold_weight_quantize=False`` keeps float weight -> Q -> DQ instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from fxcompress.backends.onnxruntime import run_onnx
from fxcompress.pass_base import OnnxPass, PassContext, PassResult

from ._gs_utils import op_counts, redirect_readers, removed_ops

__all__ = ["OnnxFoldConstants"]


@dataclass(frozen=True)
class OnnxFoldConstants(OnnxPass):
    """Replace every subgraph that depends only on constants by its value (and ``Shape`` of
    statically shaped tensors by constants when ``fold_shapes``). ``max_bytes`` > 0 skips
    results larger than that (e.g. an ``Expand`` of a small constant), so the model does not
    bloat."""

    name: ClassVar[str] = "onnx-fold-constants"
    exact: ClassVar[bool] = True

    fold_shapes: bool = True
    fold_weight_quantize: bool = True
    max_bytes: int = 0

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        before = op_counts(graph)
        keep_quantize = not self.fold_weight_quantize

        def exclude(node: gs.Node) -> bool:
            # a Transpose of a weight other nodes read too (tied weights) would store it twice
            shared = node.op == "Transpose" and any(isinstance(t, gs.Constant) and len(t.outputs) > 1
                                                    for t in node.inputs)
            return shared or node.op == "DequantizeLinear" or (keep_quantize and node.op == "QuantizeLinear")

        graph.toposort()
        graph.fold_constants(
            fold_shapes=self.fold_shapes, partitioning="basic", error_ok=True,
            size_threshold=self.max_bytes or None, should_exclude_node=exclude,
        )
        folded_weights = _fold_weight_quantize(graph) if self.fold_weight_quantize else []
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        after = op_counts(graph)
        return PassResult(graph=graph, stats={
            "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
            "removed": removed_ops(before, after),
            "dequantize_kept": after.get("DequantizeLinear", 0),
            "weights_stored_quantized": folded_weights})


def _fold_weight_quantize(graph: gs.Graph) -> list[str]:
    """Replace every QuantizeLinear whose inputs are all constants by its INT8/UINT8 result,
    computed in one ONNX Runtime run; returns the names of the weights so stored."""
    todo = [n for n in graph.nodes
            if n.op == "QuantizeLinear" and (n.domain or "") in ("", "ai.onnx") and len(n.outputs) == 1
            and n.inputs and all(isinstance(t, gs.Constant) for t in n.inputs if not t.is_empty())
            and not any(o is n.outputs[0] for o in graph.outputs)]
    if not todo:
        return []
    inits, nodes, outputs = [], [], []
    for i, node in enumerate(todo):
        names = []
        for j, t in enumerate(node.inputs):
            if t.is_empty():
                names.append("")
                continue
            names.append(f"q{i}_in{j}")
            inits.append(numpy_helper.from_array(np.asarray(t.values), names[-1]))
        attrs = {k: v for k, v in node.attrs.items()}
        nodes.append(onnx.helper.make_node("QuantizeLinear", names, [f"q{i}_out"], **attrs))
        zp = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        elem = (onnx.helper.np_dtype_to_tensor_dtype(np.asarray(zp.values).dtype) if zp is not None
                else onnx.TensorProto.UINT8)
        outputs.append(onnx.helper.make_tensor_value_info(f"q{i}_out", elem, None))
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "fold_weight_quantize", [], outputs, initializer=inits),
        opset_imports=[onnx.helper.make_opsetid("", graph.opset)])
    model.ir_version = graph.ir_version or onnx.helper.find_min_ir_version_for(list(model.opset_import))
    values = run_onnx(model, {})
    taken = set(graph.tensors())
    stored: list[str] = []
    for node, value in zip(todo, values):
        weight, out = node.inputs[0], node.outputs[0]
        base = name = f"{weight.name}_quantized"
        k = 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        const = gs.Constant(name, np.asarray(value))
        redirect_readers(out, const)
        node.outputs.clear()
        node.inputs.clear()
        stored.append(weight.name)
    return stored
