"""Channel-dependency graph: which channels of which layers must be removed together.

Every output channel a layer produces (Conv/ConvTranspose/Linear/Embedding) is an *element*.
The analysis (``passes.prune.analysis``) walks the FX graph and records

* **couplings** between elements (an edge in a networkx graph): a residual ``add`` couples the
  channels of its two inputs index by index, a depthwise conv couples its output channel with
  its input channel, a head split couples every channel of one attention head, ...;
* **slices**: every parameter that has a dimension indexed by those channels (the producer's
  weight rows, the next layer's weight columns, BatchNorm statistics, a broadcast ``get_attr``),
  as a label array: position ``i`` of that dimension belongs to element ``labels[i]``;
* **shape fixes**: nodes whose arguments spell a channel count (``view``/``reshape`` sizes,
  ``split`` sections, slice bounds) and must be rewritten after pruning;
* **blocks**: elements that must not be removed, with the reason (they reach the model output,
  feed an op the analysis does not understand, are excluded by the user, ...).

A connected component of the coupling graph is a *class*: the unit that is kept or removed as a
whole. Classes whose elements come from the same layers form a *group*; a pruning ratio applies
per group (each group loses ``ratio`` of its classes). Removing a class removes every position
labelled with one of its elements, in every slice, which keeps all shapes consistent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

__all__ = ["DependencyGraph", "Group", "ModuleEdit", "ParamSlice", "ShapeFix", "Space", "Track",
           "dependency_graph"]

INPUT_KIND = "input"


@dataclass
class Track:
    """The channel axis of one tensor value: ``labels[i]`` is the element at position ``i`` of ``axis``."""

    axis: int
    labels: np.ndarray


@dataclass
class TupleTrack:
    """Tracks of the items of a tuple-valued node (``split``/``chunk`` results)."""

    items: list[Track | None]


@dataclass
class Space:
    """The output channels of one producer layer (or of an input nothing produces)."""

    name: str
    kind: str
    node: str
    start: int
    size: int

    @property
    def elements(self) -> np.ndarray:
        return np.arange(self.start, self.start + self.size)


@dataclass
class ParamSlice:
    """Dimension ``dim`` of a parameter is indexed by ``labels``.

    ``owner`` is a module path (for a ``call_module`` node) or an attribute path (a ``get_attr``
    tensor, then ``param`` is ``""``). ``role``: ``out`` (producer rows), ``in`` (consumer
    columns), ``norm`` (normalization affine/statistics) or ``param`` (a broadcast tensor).
    """

    owner: str
    param: str
    dim: int
    labels: np.ndarray
    role: str
    node: str


@dataclass
class ModuleEdit:
    """How one module changes when channels are removed (what ``rewrite`` rebuilds)."""

    path: str
    kind: str            # conv | conv_transpose | linear | embedding | norm | layernorm | groupnorm | prelu
    node: str
    in_labels: np.ndarray | None = None
    out_labels: np.ndarray | None = None
    out_dim: int = 0     # weight dimension of the output channels (1 for ConvTranspose / Embedding)
    mode: str = "dense"  # conv: dense | depthwise | grouped; groupnorm: groups | single | per-channel
    group_size: int = 1  # grouped conv: input channels per group; GroupNorm: channels per group
    norm: str | None = None  # BatchNorm/InstanceNorm right after this producer (folded into importance)


@dataclass
class ShapeFix:
    """A node whose arguments carry a channel count.

    ``reshape``/``unflatten``/``expand``: output ``axis`` gets the kept count of ``labels[0]``;
    the other output axes in ``block`` get their (unchanged) sizes from ``sizes``.
    ``split``: ``labels`` are the sections along dim ``axis``. ``slice``: ``labels[0]`` are the
    labels of the sliced axis before slicing and ``axis`` the position of the slice in the index.
    """

    node: str
    kind: str
    axis: int
    labels: list[np.ndarray]
    sizes: tuple[int, ...] = ()
    block: tuple[int, ...] = ()


@dataclass
class Group:
    """Classes coupled through shared layers; a ratio applies to a group as a whole."""

    index: int
    classes: list[int]
    layers: list[str]
    prunable: list[int]
    #: gcd of how many positions one class occupies in any layer (a head: head_dim, a channel: 1)
    block: int
    #: smallest number of positions one class occupies in a layer
    min_block: int


@dataclass
class DependencyGraph:
    """The result of the channel analysis of one GraphModule (see the module docstring)."""

    coupling: nx.Graph = field(default_factory=nx.Graph)
    spaces: dict[str, Space] = field(default_factory=dict)
    element_space: list[str] = field(default_factory=list)
    blocked: dict[int, str] = field(default_factory=dict)
    slices: list[ParamSlice] = field(default_factory=list)
    edits: dict[str, ModuleEdit] = field(default_factory=dict)
    fixes: list[ShapeFix] = field(default_factory=list)
    #: layer-level view: producer -> consumer edges labelled with the dependency kind
    layer_graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    _final: dict[str, Any] | None = None

    # ---------------------------------------------------------------- building

    @property
    def num_elements(self) -> int:
        return len(self.element_space)

    def new_space(self, name: str, kind: str, node: str, size: int) -> np.ndarray:
        """Fresh elements for the ``size`` output channels of ``name``; returns their labels."""
        if name in self.spaces:
            name = f"{name}@{node}"
        start = self.num_elements
        self.spaces[name] = Space(name, kind, node, start, size)
        self.element_space.extend([name] * size)
        self.coupling.add_nodes_from(range(start, start + size))
        self.layer_graph.add_node(name, kind=kind)
        self._final = None
        return np.arange(start, start + size, dtype=np.int64)

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        """Position ``i`` of ``a`` and of ``b`` must be removed together."""
        if len(a) != len(b):
            raise ValueError(f"cannot couple label arrays of lengths {len(a)} and {len(b)}")
        self.coupling.add_edges_from((int(x), int(y)) for x, y in zip(a, b) if x != y)
        self._final = None

    def couple_all(self, elements: np.ndarray) -> None:
        """All ``elements`` form one unit (a head, a whole group of a grouped conv)."""
        first = int(elements[0])
        self.coupling.add_edges_from((first, int(e)) for e in elements[1:] if e != first)
        self._final = None

    def block(self, labels: np.ndarray, reason: str) -> None:
        """``labels`` must be kept; the first reason given for an element wins."""
        for e in np.unique(labels):
            self.blocked.setdefault(int(e), reason)
        self._final = None

    def link(self, producer_labels: np.ndarray, consumer: str, kind: str) -> None:
        """Record in ``layer_graph`` that ``consumer`` depends on the layers owning ``labels``."""
        for space in {self.element_space[int(e)] for e in np.unique(producer_labels)}:
            self.layer_graph.add_edge(space, consumer, kind=kind)

    # ---------------------------------------------------------------- results

    def _finalize(self) -> dict[str, Any]:
        if self._final is not None:
            return self._final
        comp = np.full(self.num_elements, -1, dtype=np.int64)
        components = sorted((sorted(c) for c in nx.connected_components(self.coupling)), key=lambda c: c[0])
        for i, members in enumerate(components):
            comp[members] = i
        reasons: dict[int, str] = {}
        for e, reason in sorted(self.blocked.items()):
            reasons.setdefault(int(comp[e]), reason)
        # class -> space -> number of elements, and positions per class in every slice
        spaces_of: list[dict[str, int]] = [dict() for _ in components]
        for e, name in enumerate(self.element_space):
            d = spaces_of[comp[e]]
            d[name] = d.get(name, 0) + 1
        widths: list[set[int]] = [set() for _ in components]
        for s in self.slices:
            cls, counts = np.unique(comp[s.labels], return_counts=True)
            for c, n in zip(cls, counts):
                widths[int(c)].add(int(n))
        space_graph = nx.Graph()
        space_graph.add_nodes_from(self.spaces)
        for d in spaces_of:
            names = list(d)
            space_graph.add_edges_from(zip(names, names[1:]))
        groups: list[Group] = []
        by_space: dict[str, int] = {}
        for gi, names in enumerate(sorted((sorted(c, key=lambda n: self.spaces[n].start)
                                           for c in nx.connected_components(space_graph)),
                                          key=lambda c: self.spaces[c[0]].start)):
            for n in names:
                by_space[n] = gi
            groups.append(Group(gi, [], [n for n in names if self.spaces[n].kind != INPUT_KIND], [], 1, 1))
        for ci, members in enumerate(components):
            g = groups[by_space[self.element_space[members[0]]]]
            g.classes.append(ci)
            if ci not in reasons:
                g.prunable.append(ci)
        for g in groups:
            counts = {n for c in g.classes for n in widths[c]} | {n for c in g.classes for n in spaces_of[c].values()}
            g.block = math.gcd(*counts) if counts else 1
            g.min_block = min(counts) if counts else 1
        self._final = {"comp": comp, "classes": components, "reasons": reasons, "groups": groups,
                       "spaces_of": spaces_of}
        return self._final

    @property
    def comp(self) -> np.ndarray:
        """Class index of every element."""
        return self._finalize()["comp"]

    @property
    def classes(self) -> list[list[int]]:
        """Elements of every class (class ``i`` = ``classes[i]``), ordered by smallest element."""
        return self._finalize()["classes"]

    @property
    def class_reasons(self) -> dict[int, str]:
        """Blocked classes and why they must be kept."""
        return self._finalize()["reasons"]

    @property
    def groups(self) -> list[Group]:
        return self._finalize()["groups"]

    def kept_positions(self, labels: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """Positions of ``labels`` whose class is not in the boolean mask ``removed``."""
        return np.nonzero(~removed[self.comp[labels]])[0]

    def unpruned(self) -> dict[str, str]:
        """Producer layers with at least one channel that must be kept, and the reason."""
        out: dict[str, str] = {}
        reasons = self.class_reasons
        comp = self.comp
        for name, space in self.spaces.items():
            if space.kind == INPUT_KIND:
                continue
            own = next((self.blocked[int(e)] for e in space.elements if int(e) in self.blocked), None)
            coupled = next((reasons[int(comp[e])] for e in space.elements if int(comp[e]) in reasons), None)
            if own is not None or coupled is not None:
                out[name] = own if own is not None else coupled
        return out

    def summary(self) -> str:
        """One line per group: its layers, class count and how many classes may be removed."""
        lines = []
        for g in self.groups:
            if not g.layers:
                continue
            lines.append(f"group {g.index}: {len(g.classes)} units (block {g.block}), "
                         f"{len(g.prunable)} prunable: {', '.join(g.layers)}")
        return "\n".join(lines)


def dependency_graph(gm: Any, *, exclude: tuple[str, ...] = (), norm_stats: str = "block") -> DependencyGraph:
    """Analyse ``gm`` (nodes must carry ``meta["tensor_meta"]``); see ``passes.prune.analysis``."""
    from .analysis import analyse

    return analyse(gm, exclude=exclude, norm_stats=norm_stats)
