"""Golden tests for your own model: pin the graph your compression pipeline produces.

Installing fxcompress gives pytest a ``golden`` fixture. ``golden.check(graph, name)`` compares
the canonical text (.fxg) of an FX graph or ONNX model with ``goldens/<name>.fxg`` (the
``fxcompress_goldens`` ini option; ``tests/goldens`` by default) and fails with a unified diff.
Accept an intended change with ``pytest --update-goldens`` and review the diff in git.
"""

from __future__ import annotations

import torch
from torch import nn

import fxcompress as fxc
from fxcompress.testing import GraphCheck


class MyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.drop(self.bn(self.conv(x)))) + x


def test_my_block_after_cleanup(golden) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    compiled = fxc.compile(MyBlock().eval(), (torch.randn(1, 4, 8, 8),),
                           "remove-dropout,fold-batchnorm,eliminate-dead-code", target="onnx")
    GraphCheck(compiled.graph_module).count({"BatchNorm2d": 0, "Dropout": 0}).order(["conv", "relu", "add"])
    golden.check(compiled.graph_module, "my_block_fx")
    golden.check(compiled.onnx_model, "my_block_onnx")
