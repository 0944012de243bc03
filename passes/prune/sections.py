"""Keep every channel section at its share: ``split``/``chunk``/``tensor_split`` pieces and channel
slices keep at least ``1 - ratio`` of their channel units, and never none.

A channel section is a stretch of a tracked axis that the graph hands on as a value of its own
(the pieces of ``x.chunk(2, dim=1)`` in a ShuffleNetV2 unit, ``x[:, 4:]``). The analysis maps
every removal through splits and channel shuffles exactly, so a section may lose any of its
channels, but not all of them: a layer fed a zero-channel tensor is not a smaller layer (torch's
``Conv2d(0, n)`` even returns zero channels rather than its bias), and a piece pruned far more
than its sibling turns a balanced block into a lopsided one. Importance sums over every layer of
a class, and in a ShuffleNetV2 stage the classes of the pass-through half reach more layers than
those of the computed half, so ranking alone would strip the computed half first. The selection
therefore skips a class whose removal would leave a section fewer than ``(1 - ratio)`` of its
classes (and at least one), and takes the next least important class instead.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .depgraph import DependencyGraph

__all__ = ["SectionGuard"]


def channel_sections(dg: DependencyGraph) -> list[tuple[str, np.ndarray]]:
    """``(node, classes)`` for every split piece and channel slice recorded by the analysis."""
    comp = dg.comp
    out: list[tuple[str, np.ndarray]] = []
    for fix in dg.fixes:
        if fix.kind == "split":
            pieces = fix.labels
        elif fix.kind == "slice":
            start, stop = fix.sizes
            pieces = [fix.labels[0][start:stop]]
        else:
            continue
        out.extend((fix.node, np.unique(comp[labels])) for labels in pieces if len(labels))
    return out


class SectionGuard:
    """Tracks, while classes are removed one by one, how many classes each section still keeps."""

    def __init__(self, dg: DependencyGraph) -> None:
        self.size: list[int] = []
        self.alive: list[int] = []
        self.sections_of: dict[int, list[int]] = defaultdict(list)
        self.nodes: list[str] = []
        for node, classes in channel_sections(dg):
            index = len(self.alive)
            self.size.append(len(classes))
            self.alive.append(len(classes))
            self.nodes.append(node)
            for c in classes:
                self.sections_of[int(c)].append(index)
        #: node -> number of classes kept because removing them would thin out one of its sections
        self.spared: dict[str, int] = defaultdict(int)

    def try_remove(self, cls: int, keep_fraction: float) -> bool:
        """Account for removing ``cls`` unless a section would keep fewer than ``keep_fraction``
        of its classes, or none (then record which node and say no)."""
        sections = self.sections_of.get(cls, ())
        short = [s for s in sections
                 if self.alive[s] - 1 < max(1, math.ceil(keep_fraction * self.size[s] - 1e-9))]
        if short:
            self.spared[self.nodes[short[0]]] += 1
            return False
        for s in sections:
            self.alive[s] -= 1
        return True

    def choose(self, order: list[int], n_remove: int, keep_fraction: float) -> list[int]:
        """The first ``n_remove`` classes of ``order`` (least important first) that may go."""
        chosen: list[int] = []
        for cls in order:
            if len(chosen) == n_remove:
                break
            if self.try_remove(cls, keep_fraction):
                chosen.append(cls)
        return chosen
