"""Every zoo model through the whole clean-up pipeline: FX and ONNX Runtime outputs equal eager,
and the canonical text of the rewritten FX graph and of the final ONNX graph are golden."""

from __future__ import annotations

import torch

import fxcompress as fxc
from fxcompress.testing import GraphCheck

CLEANUP = "remove-dropout,remove-identity,fold-batchnorm,fold-constants,eliminate-dead-code"
ONNX_CLEANUP = "onnx-cleanup,onnx-fold-constants,onnx-remove-identity"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _bn_after_conv(gm: torch.fx.GraphModule) -> list[str]:
    """BatchNorms fed by a conv/linear (pre-activation BNs, as in DenseNet, cannot be folded)."""
    mods = dict(gm.named_modules())
    return [n.name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(mods[n.target], torch.nn.modules.batchnorm._BatchNorm)
            and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_module"
            and isinstance(mods[n.args[0].target], (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))]


def test_zoo_cleanup_to_onnxruntime(zoo_case, golden) -> None:  # type: ignore[no-untyped-def]
    name, model, inputs = zoo_case
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*inputs)
    compiled = fxc.compile(model, inputs, f"{CLEANUP},{ONNX_CLEANUP}", target="onnxruntime")

    with torch.no_grad():
        assert _close(compiled.graph_module(*inputs), expected)
    assert _close(compiled(*inputs), expected)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the user's model was mutated"
    GraphCheck(compiled.graph_module).count({"Dropout": 0, "Identity": 0})
    assert _bn_after_conv(compiled.graph_module) == [], "a foldable BatchNorm is left"
    assert [r.status for r in compiled.report if r.name != "input"].count("rolled-back") == 0
    assert compiled.report[-1].error["cosine"] > 0.99999

    golden.check(compiled.graph_module, f"zoo_{name}_cleanup")
    golden.check(compiled.onnx_model, f"zoo_{name}_onnx")


def test_dynamic_batch_runs_other_batch_sizes(zoo_case) -> None:  # type: ignore[no-untyped-def]
    name, model, inputs = zoo_case
    compiled = fxc.compile(model, inputs, "fold-batchnorm", target="onnxruntime")
    bigger = tuple(torch.cat([t, t, t]) for t in inputs)
    with torch.no_grad():
        assert _close(compiled(*bigger), model(*bigger))
