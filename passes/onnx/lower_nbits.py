"""``LowerMatMulNBits`` (ONNX pass): ONNX Runtime's blockwise weight-only contrib ops -> standard ONNX.

``quantize-weight-only`` lowers to ``com.microsoft::MatMulNBits`` and ``GatherBlockQuantized``,
which only ONNX Runtime runs. For other runtimes (TensorRT, which takes blockwise INT4 weights
from ``DequantizeLinear``) this pass writes each as opset-21 ``DequantizeLinear`` (INT4/INT8
weights, ``block_size``, no zero point) -> ``MatMul`` / ``Gather``, raising the model to opset 21
first (``to_opset_21``). The weights stay packed: INT4 initializers hold two per
byte. Exact: both forms dequantize the same integers with the same scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from fxcompress.errors import PassError
from fxcompress.pass_base import OnnxPass, PassContext, PassResult

OPSET = 21
_OPS = ("MatMulNBits", "GatherBlockQuantized")
_DTYPES = {4: onnx.TensorProto.INT4, 8: onnx.TensorProto.INT8}


def _signed(packed: np.ndarray, bits: int, rows: int, k: int) -> np.ndarray:
    """Signed integers ``[rows, k]`` of ONNX Runtime's offset uint8 packing (low nibble first)."""
    flat = packed.reshape(rows, -1).astype(np.int16)
    if bits == 4:
        flat = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(rows, -1)
    return (flat[:, :k] - (1 << (bits - 1))).astype(np.int8)


def _integer_constant(name: str, q: np.ndarray, bits: int) -> gs.Constant:
    """An INT4 (two per byte, low nibble first) or INT8 initializer of ``q``, as raw bytes
    (onnx-graphsurgeon would write INT4 one per byte)."""
    flat = q.astype(np.uint8).ravel()
    if bits == 4:
        flat = np.pad(flat, (0, flat.size % 2)) & 0x0F
        flat = flat[0::2] | (flat[1::2] << 4)
    proto = onnx.helper.make_tensor(name, _DTYPES[bits], q.shape, flat.tobytes(), raw=True)
    return gs.Constant(name, gs.ir.tensor.LazyValues(proto))


#: ops whose ``axes`` attribute became an input in opset 18
_REDUCE_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceSumSquare")


def to_opset_21(graph: gs.Graph) -> None:
    """Raise ``graph`` (opset 13..20) to opset 21, in place. The only changes between them that
    alter how an existing node reads are opset 18's: Reduce* ``axes`` moved from an attribute to
    an input, and Split without a ``split`` input needs ``num_outputs``. (``onnx.version_converter``
    was not used: on a transformer exported with a dynamic batch it froze shapes to the batch of 1.)"""
    for node in graph.nodes:
        if node.domain not in (None, "", "ai.onnx"):
            continue
        if node.op in _REDUCE_18 and "axes" in node.attrs:
            axes = np.asarray(node.attrs.pop("axes"), dtype=np.int64)
            data = node.inputs[0]
            node.inputs.clear()
            node.inputs.extend([data, gs.Constant(f"{node.name}_axes", axes)])
        elif node.op == "Split" and len([t for t in node.inputs[1:] if t.name]) == 0 and "num_outputs" not in node.attrs:
            node.attrs["num_outputs"] = len(node.outputs)
    graph.opset = OPSET
    graph.import_domains = [onnx.helper.make_opsetid("", OPSET)] + [
        d for d in (graph.import_domains or []) if d.domain not in ("", "ai.onnx")]


def _check(node: gs.Node) -> tuple[int, int]:
    bits, block = int(node.attrs.get("bits", 4)), int(node.attrs["block_size"])
    consts = node.inputs[1:3] if node.op == "MatMulNBits" else [node.inputs[0], node.inputs[2]]
    if bits not in _DTYPES or not all(isinstance(t, gs.Constant) for t in consts) or (
            len(node.inputs) > 3 and node.inputs[3].name):
        raise PassError(f"lower-matmul-nbits: node '{node.name}' ({node.op}) has bits={bits}, a zero point or a weight "
                        f"computed at run time; only constant symmetric 4/8-bit weights (as quantize-weight-only "
                        f"writes them) lower to DequantizeLinear", pass_name="lower-matmul-nbits", node=node.name)
    return bits, block


@dataclass(frozen=True)
class LowerMatMulNBits(OnnxPass):
    """Rewrite MatMulNBits / GatherBlockQuantized as DequantizeLinear (opset 21, blocked) -> MatMul / Gather."""

    name: ClassVar[str] = "lower-matmul-nbits"
    exact: ClassVar[bool] = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # type: ignore[override]
        if not any(n.op in _OPS for n in graph.nodes):
            result = PassResult(graph=graph, stats={"lowered": []})
            result.info("no MatMulNBits / GatherBlockQuantized node (quantize-weight-only writes them); nothing to lower")
            return result
        if graph.opset < OPSET:
            to_opset_21(graph)
        lowered = []
        for node in [n for n in graph.nodes if n.op in _OPS]:
            bits, block = _check(node)
            out = node.outputs[0]
            if node.op == "MatMulNBits":
                k, n = int(node.attrs["K"]), int(node.attrs["N"])
                q = _signed(node.inputs[1].values, bits, n, k).T.copy()  # [K, N]
                scales = node.inputs[2].values.reshape(n, -1).T.copy()  # [K/block, N]
                axis, x = 0, node.inputs[0]
            else:
                rows = node.inputs[0].values.shape[0]
                scales = node.inputs[2].values
                q = _signed(node.inputs[0].values, bits, rows, scales.shape[1] * block)
                axis, x = 1, node.inputs[1]
            w = gs.Variable(f"{node.name}_weight", dtype=scales.dtype)
            dq = gs.Node("DequantizeLinear", f"{node.name}_dq",
                         inputs=[_integer_constant(f"{node.name}_weight_q", q, bits), gs.Constant(f"{node.name}_scales", scales)],
                         outputs=[w], attrs={"axis": axis, "block_size": block})
            op = (gs.Node("MatMul", f"{node.name}_matmul", inputs=[x, w], outputs=[out]) if node.op == "MatMulNBits"
                  else gs.Node("Gather", f"{node.name}_gather", inputs=[w, x], outputs=[out], attrs={"axis": 0}))
            node.outputs.clear()
            graph.nodes.extend([dq, op])
            lowered.append(node.name)
        graph.cleanup().toposort()
        if not any(n.domain == "com.microsoft" for n in graph.nodes):
            graph.import_domains = [d for d in (graph.import_domains or []) if d.domain != "com.microsoft"]
        return PassResult(graph=graph, stats={"lowered": lowered, "opset": OPSET})
