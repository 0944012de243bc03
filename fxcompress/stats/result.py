"""What statistics are: ``LayerStats`` and ``GraphStats``, their comparison, and the tally both the FX
and the ONNX side fill (see ``fxcompress.stats`` for the conventions)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fxcompress.units import format_bytes, format_count


@dataclass
class LayerStats:
    """One layer: a called module (by module path), a function node (by node name) or an ONNX node."""

    name: str
    kind: str
    params: int = 0
    nonzero: int = 0
    macs: int = 0
    bytes: int = 0
    shape: str | None = None
    macs_known: bool = True
    #: this layer's storage by dtype name; sums to ``bytes``
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params, "nonzero": self.nonzero,
                "sparsity": self.sparsity, "macs": self.macs, "bytes": self.bytes,
                "bytes_by_dtype": dict(sorted(self.bytes_by_dtype.items())), "shape": self.shape,
                "macs_known": self.macs_known}


@dataclass
class GraphStats:
    """Totals and per-layer rows; ``sum(l.params for l in layers) == params`` (same for the rest)."""

    params: int
    nonzero: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    macs: int
    layers: list[LayerStats] = field(default_factory=list)
    macs_unknown: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.params if self.params else 0.0

    @property
    def compression_ratio(self) -> float:
        """params / nonzero: 1.0 for a dense model, ``inf`` when every weight is zero."""
        if self.nonzero:
            return self.params / self.nonzero
        return math.inf if self.params else 1.0

    @property
    def pruned_params(self) -> int:
        return self.params - self.nonzero

    @property
    def active_params(self) -> int:
        return self.nonzero

    def layer(self, name: str) -> LayerStats:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r}; layers are: {', '.join(l.name for l in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (no NaN/inf: an infinite compression ratio is written as null)."""
        ratio = self.compression_ratio
        return {
            "params": self.params, "nonzero": self.nonzero, "pruned_params": self.pruned_params,
            "active_params": self.active_params, "sparsity": self.sparsity,
            "compression_ratio": None if math.isinf(ratio) else ratio,
            "bytes": self.bytes, "bytes_by_dtype": dict(sorted(self.bytes_by_dtype.items())),
            "macs": self.macs, "macs_unknown": list(self.macs_unknown),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GraphStats:
        """Inverse of ``to_dict`` (derived fields are recomputed, not read)."""
        fields = ("name", "kind", "params", "nonzero", "macs", "bytes", "shape", "macs_known")
        layers = [LayerStats(**{k: row[k] for k in fields if k in row},
                             bytes_by_dtype={str(k): int(v) for k, v in row.get("bytes_by_dtype", {}).items()})
                  for row in data.get("layers", ())]
        return cls(params=int(data["params"]), nonzero=int(data["nonzero"]), bytes=int(data["bytes"]),
                   bytes_by_dtype={str(k): int(v) for k, v in data["bytes_by_dtype"].items()},
                   macs=int(data["macs"]), layers=layers, macs_unknown=list(data.get("macs_unknown", ())))

    @staticmethod
    def compare(before: GraphStats, after: GraphStats) -> dict[str, Any]:
        """Before/after numbers and ``after / before`` ratios, in total and per layer name."""
        return compare(before, after)

    def summary(self) -> str:
        return (f"params {format_count(self.params)} (nonzero {format_count(self.nonzero)}, "
                f"sparsity {self.sparsity:.1%}), {format_bytes(self.bytes)}, MACs {format_count(self.macs)}")

    def __str__(self) -> str:
        return self.summary()


def _ratio(before: int, after: int) -> float | None:
    if before:
        return after / before
    return 1.0 if not after else None


def compare(before: GraphStats, after: GraphStats) -> dict[str, Any]:
    """``{params,nonzero,bytes,macs}_{before,after,ratio}`` plus ``layers: {name: {...}}``.

    A ratio is ``after / before`` (0.5 = halved); it is None when ``before`` is 0 and ``after`` is not.
    A layer present on one side only has 0 on the other.
    """
    out: dict[str, Any] = {}
    for key in ("params", "nonzero", "bytes", "macs"):
        b, a = getattr(before, key), getattr(after, key)
        out[f"{key}_before"], out[f"{key}_after"], out[f"{key}_ratio"] = b, a, _ratio(b, a)
    out["sparsity_before"], out["sparsity_after"] = before.sparsity, after.sparsity
    rows_b = {layer.name: layer for layer in before.layers}
    rows_a = {layer.name: layer for layer in after.layers}
    names = list(rows_b) + [name for name in rows_a if name not in rows_b]
    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        lb, la = rows_b.get(name), rows_a.get(name)
        row: dict[str, Any] = {"kind": (lb or la).kind}  # type: ignore[union-attr]
        for key in ("params", "nonzero", "macs", "bytes"):
            b, a = (getattr(lb, key) if lb else 0), (getattr(la, key) if la else 0)
            row[f"{key}_before"], row[f"{key}_after"], row[f"{key}_ratio"] = b, a, _ratio(b, a)
        layers[name] = row
    out["layers"] = layers
    return out


# ----------------------------------------------------------------------------- accounting


class _Tally:
    """Collects tensors (each once, by key) and MACs into ordered layers."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerStats] = {}
        self.seen: set[Any] = set()
        self.bytes_by_dtype: dict[str, int] = {}

    def layer(self, name: str, kind: str) -> LayerStats:
        if name not in self.layers:
            self.layers[name] = LayerStats(name=name, kind=kind)
        return self.layers[name]

    def add_tensor(self, layer: LayerStats, key: Any, *, numel: int, nonzero: int, nbytes: int,
                   dtype: str, is_param: bool) -> None:
        if key in self.seen:
            return
        self.seen.add(key)
        layer.bytes += nbytes
        layer.bytes_by_dtype[dtype] = layer.bytes_by_dtype.get(dtype, 0) + nbytes
        self.bytes_by_dtype[dtype] = self.bytes_by_dtype.get(dtype, 0) + nbytes
        if is_param:
            layer.params += numel
            layer.nonzero += nonzero

    def finish(self) -> GraphStats:
        layers = list(self.layers.values())
        return GraphStats(
            params=sum(l.params for l in layers), nonzero=sum(l.nonzero for l in layers),
            bytes=sum(l.bytes for l in layers), bytes_by_dtype=dict(sorted(self.bytes_by_dtype.items())),
            macs=sum(l.macs for l in layers), layers=layers,
            macs_unknown=[l.name for l in layers if not l.macs_known])


def _shape_str(shape: Sequence[int] | None) -> str | None:
    if shape is None:
        return None
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def _owner(start: Any, users: Callable[[Any], Iterable[Any]], is_mac: Callable[[Any], bool],
           is_const: Callable[[Any], bool]) -> tuple[Any, Any]:
    """(first MAC consumer reached through constant-only ops, first other consumer) of a stored tensor.

    A weight often reaches its layer through a dequantize/transpose/cast chain that depends only on
    constants; following only such chains never attributes a bias added to an activation to the
    next layer downstream.
    """
    queue, visited, fallback = deque(users(start)), set(), None
    while queue:
        node = queue.popleft()
        if node in visited:
            continue
        visited.add(node)
        if is_mac(node):
            return node, fallback
        if is_const(node):
            queue.extend(users(node))
        elif fallback is None:
            fallback = node
    return None, fallback
