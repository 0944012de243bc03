"""FoldBatchNorm: every producer kind, the functional form, and each reason to skip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.testing import run_pass
from fxcompress.pass_base import PassContext
from fxcompress.trace import trace
from _passes_util import (assert_same_outputs, assert_untouched, call_module_types, randomize_bn,
                          snapshot)
from passes.fuse import FoldBatchNorm

GEN = torch.Generator().manual_seed(0)

# producer, BatchNorm, input shape
CASES = {
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, bias=b), nn.BatchNorm1d, (2, 4, 9)),
    "conv2d_groups": (lambda b: nn.Conv2d(4, 6, 3, groups=2, padding=1, bias=b),
                      nn.BatchNorm2d, (2, 4, 6, 6)),
    "conv3d": (lambda b: nn.Conv3d(2, 4, 2, bias=b), nn.BatchNorm3d, (1, 2, 4, 4, 4)),
    "convT1d": (lambda b: nn.ConvTranspose1d(4, 6, 3, stride=2, bias=b), nn.BatchNorm1d, (2, 4, 5)),
    "convT2d_groups": (lambda b: nn.ConvTranspose2d(4, 6, 3, groups=2, stride=2, output_padding=1, bias=b),
                       nn.BatchNorm2d, (2, 4, 4, 4)),
    "convT2d_depthwise": (lambda b: nn.ConvTranspose2d(4, 8, 2, groups=4, bias=b),
                          nn.BatchNorm2d, (2, 4, 3, 3)),
    "convT3d": (lambda b: nn.ConvTranspose3d(2, 4, 2, bias=b), nn.BatchNorm3d, (1, 2, 3, 3, 3)),
    "linear": (lambda b: nn.Linear(5, 7, bias=b), nn.BatchNorm1d, (4, 5)),
}


class ProducerBN(nn.Module):
    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.producer, self.bn = producer, bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.producer(x)))


def _folded_by_hand(producer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """W' = W * s and b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel
    (a ConvTranspose stores output channels in dim 1, per group)."""
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        w = producer.weight.double()
        if isinstance(producer, nn.modules.conv._ConvTransposeNd):
            g = producer.groups
            grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            s = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
            w = (grouped * s).reshape(w.shape)
        else:
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        b = producer.bias.double() if producer.bias is not None else torch.zeros_like(scale)
        b = (b - bn.running_mean.double()) * scale
        if bn.bias is not None:
            b = b + bn.bias.double()
    return w.float(), b.float()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", list(CASES))
def test_fold_each_producer(case: str, bias: bool, affine: bool) -> None:
    make, bn_type, shape = CASES[case]
    producer = make(bias)
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    model = ProducerBN(producer, bn_type(channels, affine=affine)).eval()
    randomize_bn(model, GEN)
    inputs = (torch.randn(*shape, generator=GEN),)
    before = snapshot(model)
    res = run_pass(FoldBatchNorm(), model, inputs)
    gm = res.graph
    assert res.stats == {"folded": [("producer", "bn")], "skipped": {}}
    assert call_module_types(gm) == {type(producer).__name__: 1}
    assert not hasattr(gm, "bn")
    assert gm.producer.bias is not None and gm.producer.bias.requires_grad
    assert gm.producer.weight.dtype == torch.float32
    want_w, want_b = _folded_by_hand(producer, model.bn)
    torch.testing.assert_close(gm.producer.weight.detach(), want_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.producer.bias.detach(), want_b, rtol=1e-5, atol=1e-6)
    assert_same_outputs(model, gm, inputs)
    assert_untouched(model, before)


class FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def test_fold_functional_batch_norm() -> None:
    model, inputs = FunctionalBN().eval(), (torch.randn(2, 3, 6, 6),)
    res = run_pass(FoldBatchNorm(), model, inputs)
    gm = res.graph
    assert res.stats["folded"] == [("conv", "batch_norm")]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert {name for name, _ in gm.named_parameters()} == {"conv.weight", "conv.bias"}
    assert dict(gm.named_buffers()) == {}
    assert_same_outputs(model, gm, inputs)


class TwoUsers(nn.Module):
    """conv output feeds BN and a residual add: not foldable. bn2's output used twice: fine."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = self.bn1(y) + y
        w = self.bn2(self.conv2(z))
        return w * torch.sigmoid(w)


def test_conv_output_with_other_users_is_skipped() -> None:
    model = TwoUsers().eval()
    randomize_bn(model, GEN)
    inputs = (torch.randn(2, 4, 5, 5),)
    res = run_pass(FoldBatchNorm(), model, inputs)
    assert res.stats["folded"] == [("conv2", "bn2")]
    assert set(res.stats["skipped"]) == {"bn1"}
    assert "also used by add" in res.stats["skipped"]["bn1"]
    assert [(d.severity, d.node) for d in res.diagnostics] == [("warning", "bn1")]
    assert call_module_types(res.graph) == {"Conv2d": 2, "BatchNorm2d": 1}
    assert_same_outputs(model, res.graph, inputs)


class Reasons(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a, self.bn_train = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4).train()
        self.conv_b, self.bn_nostats = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.bn_after_relu = nn.BatchNorm2d(3)
        self.lin, self.bn_seq = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, seq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Linear on (N, L, C) -> BN1d over dim 1 normalizes L, not the Linear's features
        return (self.bn_train(self.conv_a(x)), self.bn_nostats(self.conv_b(x)),
                self.bn_after_relu(torch.relu(x)), self.bn_seq(self.lin(seq)))


def test_every_skip_reason_is_reported() -> None:
    model = Reasons().eval()
    model.bn_train.train()
    randomize_bn(model, GEN)
    inputs = (torch.randn(2, 3, 4, 4), torch.randn(2, 6, 4))
    before = snapshot(model)
    res = run_pass(FoldBatchNorm(), model, inputs)
    skipped = res.stats["skipped"]
    assert res.stats["folded"] == []
    assert set(skipped) == {"bn_train", "bn_nostats", "bn_after_relu", "bn_seq"}
    assert "training mode" in skipped["bn_train"]
    assert "track_running_stats=False" in skipped["bn_nostats"]
    assert "not a Conv/ConvTranspose/Linear" in skipped["bn_after_relu"]
    assert "relu" in skipped["bn_after_relu"]
    assert "not its 6 output channels" in skipped["bn_seq"]
    assert {d.node for d in res.diagnostics} == set(skipped)
    assert call_module_types(res.graph)["BatchNorm2d"] == 3
    assert_untouched(model, before)
    assert_same_outputs(model, res.graph, inputs)   # (running bn_train updates the model's statistics)


class SharedConv(nn.Module):
    """One conv module called twice, each call followed by its own BN: two distinct folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_b(self.conv(self.bn_a(self.conv(x))))


def test_shared_conv_gets_a_new_module_per_fold() -> None:
    model = SharedConv().eval()
    randomize_bn(model, GEN)
    inputs = (torch.randn(1, 3, 5, 5),)
    gm = trace(model, inputs, frontend="fx")
    old_conv, old_weight = gm.conv, gm.conv.weight.detach().clone()
    res = FoldBatchNorm().run(gm, PassContext(inputs))  # on this graph itself: its modules must stay as they were
    gm = res.graph
    gm.recompile()  # run() called directly, not through the manager
    assert res.stats["folded"] == [("conv", "bn_a"), ("conv_1", "bn_b")]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(set(targets)) == 2
    assert not torch.equal(gm.get_submodule(targets[0]).weight, gm.get_submodule(targets[1]).weight)
    assert torch.equal(old_conv.weight, old_weight)     # folding never edits a module in place
    assert_same_outputs(model, gm, inputs)


def test_fold_precision_with_extreme_statistics() -> None:
    model = ProducerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-8)).eval()
    with torch.no_grad():
        model.bn.running_var.copy_(torch.tensor([1e-6, 1e-2, 1.0, 1e4]))
        model.bn.running_mean.copy_(torch.tensor([1e3, -5.0, 0.0, 2.0]))
    inputs = (torch.randn(2, 3, 6, 6, generator=GEN),)
    gm = run_pass(FoldBatchNorm(), model, inputs).graph
    ref64 = model.double()(inputs[0].double())
    got = gm(inputs[0]).double()
    torch.testing.assert_close(got, ref64, rtol=1e-5, atol=1e-6 * ref64.abs().max().item())
