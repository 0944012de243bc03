"""``FoldWeightQuantize`` (ONNX pass): ``QuantizeLinear(constant float weight)`` -> an INT8 initializer.

Graphs quantized elsewhere (or QAT graphs exported before freezing) carry FP32 weights followed
by QuantizeLinear -> DequantizeLinear: the file stays FP32-sized and every run re-quantizes the
weights. This pass computes the quantized values once (round half to even, saturate, per-axis
scales) so DequantizeLinear reads an INT8/UINT8 initializer, as ``quantize-int8`` emits directly.
Exact: DequantizeLinear sees the same integers as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from fxcompress.pass_base import OnnxPass, PassContext, PassResult

_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def quantize_constant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear on constants (UINT8 when there is no zero point, as the spec says)."""
    zp = zero_point if zero_point is not None else np.zeros_like(scale, dtype=np.uint8)
    qmin, qmax = _RANGES[np.dtype(zp.dtype)]
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = -1
        scale, zp_b = scale.reshape(shape), zp.reshape(shape).astype(np.int64)
    else:
        zp_b = zp.astype(np.int64)
    q = np.rint(x.astype(np.float32) / scale.astype(np.float32)) + zp_b
    return np.clip(q, qmin, qmax).astype(zp.dtype)


@dataclass(frozen=True)
class FoldWeightQuantize(OnnxPass):
    """Fold QuantizeLinear of constant weights into INT8 initializers (smaller file, no per-run work)."""

    name: ClassVar[str] = "fold-weight-quantize"
    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # type: ignore[override]
        folded: list[str] = []
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear" or not all(isinstance(t, gs.Constant) for t in node.inputs):
                continue
            x, scale = node.inputs[0], node.inputs[1]
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            if np.dtype(x.values.dtype).kind != "f" or (zp is not None and np.dtype(zp.values.dtype) not in _RANGES):
                continue
            values = quantize_constant(x.values, np.asarray(scale.values), None if zp is None else
                                       np.asarray(zp.values), int(node.attrs.get("axis", 1)))
            const = gs.Constant(f"{x.name}_quantized", values)
            out = node.outputs[0]
            for consumer in list(out.outputs):
                for i, t in enumerate(list(consumer.inputs)):
                    if t is out:
                        consumer.inputs[i] = const
            for i, g_out in enumerate(graph.outputs):
                if g_out is out:
                    graph.outputs[i] = const
            node.outputs.clear()
            folded.append(x.name)
        graph.cleanup().toposort()
        result = PassResult(graph=graph, stats={"folded": folded})
        if not folded:
            result.info("no QuantizeLinear on a constant weight; nothing to fold")
        return result
