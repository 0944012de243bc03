"""Helpers for the clean-up / fusion pass tests: compare outputs, count node kinds, snapshot a model.
Running a pass is ``fxcompress.testing.run_pass``."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule


RTOL, ATOL = 1e-4, 1e-5


def outputs(model: Any, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def assert_same_outputs(a: Any, b: Any, inputs: Sequence[torch.Tensor], *, exact: bool = False) -> None:
    for x, y in zip(outputs(a, inputs), outputs(b, inputs), strict=True):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


def call_module_types(gm: GraphModule) -> Counter[str]:
    """How many call_module nodes call each module type."""
    mods = dict(gm.named_modules())
    return Counter(type(mods[str(n.target)]).__name__ for n in gm.graph.nodes if n.op == "call_module")


def node_targets(gm: GraphModule) -> list[str]:
    """Targets of the call nodes, as text (``'flatten'``, ``'<built-in function mul>'``...)."""
    return [str(n.target) if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            for n in gm.graph.nodes if n.op.startswith("call")]


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a pass must not change in the user's model."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modules": [(name, type(m), m.training) for name, m in model.named_modules()]}


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial eval statistics and affine parameters for every BatchNorm in ``model``."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
