"""Writing your own pass: a pattern rewrite (``x * sigmoid(x)`` -> ``silu(x)``), registered,
used from a pipeline string, and verified by the pass manager because it declares ``exact``.

    python examples/custom_pass.py

Its golden test is ``examples/test_custom_pass.py`` (``pytest examples/test_custom_pass.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, subgraph_rewriter

import fxcompress as fxc


def _pattern(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _replacement(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


@fxc.register
@dataclass(frozen=True)
class FuseSiLU(fxc.Pass):
    """Rewrite ``x * sigmoid(x)`` into one ``silu`` call (fewer kernels, same values)."""

    name: ClassVar[str] = "fuse-silu"
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: fxc.PassContext) -> fxc.PassResult:
        matches = subgraph_rewriter.replace_pattern(gm, _pattern, _replacement)
        return fxc.PassResult(gm, stats={"rewritten": len(matches)})


class SwishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * torch.sigmoid(y)
        return self.fc(y.mean((2, 3)))


def main() -> fxc.Compiled:
    torch.manual_seed(0)
    model, x = SwishNet().eval(), torch.randn(2, 3, 8, 8)
    compiled = fxc.compile(model, (x,), "fuse-silu,eliminate-dead-code", target="onnxruntime")
    print(compiled.report)
    print("after fuse-silu:\n" + compiled.snapshots[1].text)
    assert compiled.report[1].stats["rewritten"] == 1
    return compiled


if __name__ == "__main__":
    main()
