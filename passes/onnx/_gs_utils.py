"""Helpers for ONNX passes on onnx-graphsurgeon graphs: op counts, tensor dtypes, bypassing a node."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def op_counts(graph: gs.Graph) -> Counter[str]:
    return Counter(n.op for n in graph.nodes)


def removed_ops(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Per op type, how many nodes fewer ``after`` has than ``before`` (only decreases)."""
    return {op: before[op] - after.get(op, 0) for op in sorted(before) if before[op] > after.get(op, 0)}


def np_dtype(tensor: gs.Tensor) -> np.dtype | None:
    """The numpy dtype of a tensor when gs knows it, else None."""
    dtype = tensor.values.dtype if isinstance(tensor, gs.Constant) else tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except Exception:  # noqa: BLE001 - a type numpy lacks (bfloat16, float8...)
            return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None


def subgraph_names(graph: gs.Graph) -> set[str]:
    """Names of tensors read inside subgraphs (If/Loop/Scan bodies), which gs does not link to
    their outer producers: renaming or bypassing those tensors would break the subgraph."""
    names: set[str] = set()

    def visit(g: Any) -> None:
        for node in g.nodes:
            for value in node.attrs.values():
                subs = value if isinstance(value, list) else [value]
                for sub in subs:
                    if isinstance(sub, gs.Graph):
                        for inner in sub.nodes:
                            names.update(t.name for t in inner.inputs)
                        visit(sub)

    visit(graph)
    return names


def bypass(graph: gs.Graph, node: gs.Node, src: gs.Tensor, dst: gs.Tensor, protected: set[str]) -> bool:
    """Remove ``node`` whose output ``dst`` equals its input ``src``: readers of ``dst`` read
    ``src``. When ``dst`` is a graph output, its name is kept: ``src``'s producer writes ``dst``
    directly. Returns False (graph untouched) when that is impossible (``src`` is a graph input,
    constant or graph output itself, or a subgraph reads one of them)."""
    if src.name in protected or dst.name in protected:
        return False
    graph_outputs = {id(t) for t in graph.outputs}
    if id(dst) in graph_outputs:
        if (isinstance(src, gs.Constant) or id(src) in graph_outputs or len(src.inputs) != 1
                or any(t is src for t in graph.inputs)):
            return False
        producer = src.inputs[0]
        index = next(i for i, t in enumerate(producer.outputs) if t is src)
        readers = [r for r in list(src.outputs) if r is not node]
        node.outputs.clear()
        node.inputs.clear()
        redirect_readers(src, dst, readers)
        producer.outputs[index] = dst
        return True
    redirect_readers(dst, src)
    node.outputs.clear()
    node.inputs.clear()
    return True


def redirect_readers(old: Any, new: Any, readers: Any = None) -> None:
    """Make every node that reads tensor ``old`` (or just ``readers``) read ``new`` instead."""
    for reader in list(old.outputs if readers is None else readers):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new
