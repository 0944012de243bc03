"""Graph lint, shape propagation, numeric comparison and first-divergent-node search."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphModule:
    """Run ShapeProp so every node carries ``meta["tensor_meta"]`` (shape, dtype); returns ``gm``."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return gm
