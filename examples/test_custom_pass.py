"""Golden test of the custom pass: the rewritten graph must stay exactly as reviewed.

    pytest examples/test_custom_pass.py                     # compare with examples/goldens/
    pytest examples/test_custom_pass.py --update-goldens    # accept a new graph
"""

from __future__ import annotations

import torch

import fxcompress as fxc
from fxcompress.testing import GraphCheck

from custom_pass import FuseSiLU, SwishNet  # noqa: F401  (registers the pass)


def test_fuse_silu_graph(golden) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    compiled = fxc.compile(SwishNet().eval(), (torch.randn(2, 3, 8, 8),), [FuseSiLU()], target="fx")
    GraphCheck(compiled.graph_module).count({"torch.sigmoid": 0, "torch.nn.functional.silu": 1})
    golden.check(compiled.graph_module, "swishnet_fused")
