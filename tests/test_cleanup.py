"""EliminateDeadCode, RemoveDropout, RemoveIdentity, FoldConstants on small targeted models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.testing import run_pass
from _passes_util import (assert_same_outputs, assert_untouched, call_module_types, node_targets,
                          outputs, snapshot)
from passes.cleanup import EliminateDeadCode, FoldConstants, RemoveDropout, RemoveIdentity

torch.manual_seed(0)


# --------------------------------------------------------------------------- dead code

class DeadCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.dead = nn.Linear(4, 5)
        self.dead_scale = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        _ = self.dead(x) * self.dead_scale
        _ = x.sin()
        return self.used(x)


def test_dead_code_removes_nodes_modules_and_parameters() -> None:
    model, inputs = DeadCode().eval(), (torch.randn(2, 4), torch.randn(1))
    before = snapshot(model)
    res = run_pass(EliminateDeadCode(), model, inputs)
    gm = res.graph
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "placeholder", "call_module", "output"]
    assert set(res.stats["removed_nodes"]) == {"dead", "dead_scale", "mul", "sin"}
    assert {"dead", "dead_scale"} <= set(res.stats["removed_attributes"])
    assert not hasattr(gm, "dead") and not hasattr(gm, "dead_scale")
    assert [name for name, _ in gm.named_parameters()] == ["used.weight", "used.bias"]
    assert_same_outputs(model, gm, inputs, exact=True)
    assert_untouched(model, before)


class InPlaceUnused(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y.add_(1.0)
        torch.relu_(y)
        return y * 2


def test_dead_code_keeps_in_place_ops_whose_result_is_unused() -> None:
    model, inputs = InPlaceUnused(), (torch.randn(3, 2),)
    gm = run_pass(EliminateDeadCode(), model, inputs).graph
    assert "add_" in node_targets(gm) and "relu_" in node_targets(gm)
    assert_same_outputs(model, gm, inputs, exact=True)


# --------------------------------------------------------------------------- dropout

class Dropouts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.d = nn.Dropout(0.5)
        self.d2 = nn.Dropout1d(0.3)
        self.ad = nn.AlphaDropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.d(self.lin(x))
        x = F.dropout(x, 0.4, training=self.training)
        x = self.ad(x) + F.alpha_dropout(x, 0.3)     # alpha_dropout defaults to training=False
        return self.d2(x.unsqueeze(-1)).squeeze(-1)


def test_remove_dropout_in_eval() -> None:
    model, inputs = Dropouts().eval(), (torch.randn(4, 6),)
    before = snapshot(model)
    res = run_pass(RemoveDropout(), model, inputs)
    gm = res.graph
    assert call_module_types(gm) == {"Linear": 1}
    assert not any("dropout" in t for t in node_targets(gm))
    assert sorted(res.stats["removed"]) == ["ad", "alpha_dropout", "d", "d2", "dropout"]
    assert res.stats["skipped"] == {} and not res.diagnostics
    assert not hasattr(gm, "d") and not hasattr(gm, "ad")
    assert_same_outputs(model, gm, inputs, exact=True)
    assert_untouched(model, before)
    assert isinstance(model.d, nn.Dropout)


class ActiveDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.train_drop = nn.Dropout(0.5).train()
        self.zero_drop = nn.Dropout(0.0).train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.zero_drop(self.train_drop(x)), 0.1)   # F.dropout defaults to training=True


def test_active_dropout_is_kept_and_reported() -> None:
    model, inputs = ActiveDropout(), (torch.randn(4, 6),)
    res = run_pass(RemoveDropout(), model, inputs)
    assert res.stats["removed"] == ["zero_drop"]
    assert set(res.stats["skipped"]) == {"train_drop", "dropout"}
    assert {d.node for d in res.diagnostics} == {"train_drop", "dropout"}
    assert all(d.severity == "warning" and "eval()" in d.message for d in res.diagnostics)
    assert call_module_types(res.graph) == {"Dropout": 1}


# --------------------------------------------------------------------------- identities

class Identities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.id = nn.Identity()
        self.flat = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.id(self.lin(x)) * 1
        y = 1.0 * (y / 1) - 0
        y = torch.flatten(y, 1).view(4, 5).reshape((4, 5))
        y = self.flat(y).float().to(torch.float32).type_as(x)
        return torch.relu(y.contiguous()) + 1


def test_remove_identity_removes_every_provable_noop() -> None:
    model, inputs = Identities().eval(), (torch.randn(4, 5),)
    before = snapshot(model)
    res = run_pass(RemoveIdentity(), model, inputs)
    gm = res.graph
    assert call_module_types(gm) == {"Linear": 1}
    assert node_targets(gm) == ["lin", "relu", "add"]
    assert sorted(set(res.stats["removed"].values())) == ["arithmetic", "cast", "copy", "flatten", "identity",
                                                          "reshape"]
    assert not hasattr(gm, "id") and not hasattr(gm, "flat")
    assert_same_outputs(model, gm, inputs, exact=True)
    assert_untouched(model, before)


class NotIdentities(nn.Module):
    def forward(self, x: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = x + 0                       # -0.0 + 0 == +0.0: not bit-exact
        b = n / 1                       # int64 -> float32
        c = n * 1.0                     # int64 -> float32
        d = torch.flatten(x, 0)         # (3, 4) -> (12,)
        e = x.detach()                  # matters for training
        f = x.view(-1, 4)               # -1 is not the literal shape
        g = x.clone()                   # a graph output: would alias the input
        h = (x - 2) * 2 / 3             # not neutral scalars
        return a, b, c, d, e, f, g, h


def test_remove_identity_keeps_what_is_not_provably_exact() -> None:
    model, inputs = NotIdentities(), (torch.randn(3, 4), torch.arange(6))
    res = run_pass(RemoveIdentity(), model, inputs)
    assert res.stats["removed"] == {}
    assert node_targets(res.graph) == ["add", "truediv", "mul", "flatten", "detach", "view", "clone", "sub",
                                       "mul", "truediv"]
    assert_same_outputs(model, res.graph, inputs, exact=True)


class ShuffleView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        y = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        z = x.transpose(2, 3).clone(memory_format=torch.contiguous_format).view(b, c, -1)
        return y.contiguous() * 2 + z.clone().view(b, c, h, w)


def test_contiguous_is_kept_where_a_view_needs_the_copy() -> None:
    """The channel shuffle's ``contiguous`` after a transpose is a real copy (the next ``view``
    fails without it), as is a ``clone`` to the contiguous format; ``contiguous`` of an already
    contiguous value and a plain ``clone`` go."""
    model, inputs = ShuffleView(), (torch.randn(2, 4, 3, 3),)
    res = run_pass(RemoveIdentity(), model, inputs)
    assert res.stats["removed"] == {"contiguous_1": "copy", "clone_1": "copy"}
    assert node_targets(res.graph).count("contiguous") == 1 and node_targets(res.graph).count("clone") == 1
    assert_same_outputs(model, res.graph, inputs, exact=True)


class CloneBeforeMutation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y.mul_(2)
        return x.contiguous() + y


def test_copies_are_kept_when_the_graph_mutates() -> None:
    model, inputs = CloneBeforeMutation(), (torch.randn(3),)
    res = run_pass(RemoveIdentity(), model, inputs)
    assert res.stats["removed"] == {}
    x = inputs[0].clone()
    res.graph(x)
    assert torch.equal(x, inputs[0])


def test_remove_identity_without_shapes_only_does_shape_free_rewrites() -> None:
    model, inputs = Identities().eval(), (torch.randn(4, 5),)
    res = run_pass(RemoveIdentity(), model, inputs, shapes=False)
    # contiguous() is removed only where shapes prove its input contiguous (a later view needs it)
    assert set(res.stats["removed"].values()) == {"identity"}
    assert any("shape information" in d.message for d in res.diagnostics)
    assert_same_outputs(model, res.graph, inputs, exact=True)


# --------------------------------------------------------------------------- constant folding

class Constants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))
        self.log_scale = nn.Parameter(torch.randn(3))
        self.proj = nn.Linear(3, 3)
        self.register_buffer("anchor", torch.randn(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.w.t().t()) * self.log_scale.exp()
        y = y + self.proj(self.anchor).sum(0)
        return y.reshape(-1, self.w.size(0))


def test_fold_constants_folds_parameter_only_subgraphs() -> None:
    model, inputs = Constants().eval(), (torch.randn(4, 5),)
    before = snapshot(model)
    res = run_pass(FoldConstants(), model, inputs)
    gm = res.graph
    # w.t().t() (a new view), exp, proj(anchor).sum(0) and w.size(0) depend on no input
    assert res.stats["folded"] == {"t_1": "t_1_folded", "exp": "exp_folded", "sum_1": "sum_1_folded",
                                   "size": "3"}
    assert call_module_types(gm) == {}
    assert node_targets(gm) == ["linear", "mul", "add", "reshape"]
    assert [n.args[1:] for n in gm.graph.nodes if n.target == "reshape"] == [(-1, 3)]
    assert set(res.stats["removed_attributes"]) == {"w", "log_scale", "anchor", "proj"}
    assert not hasattr(gm, "proj")
    params = dict(gm.named_parameters())
    # computed from Parameters (or a module with parameters) -> a trainable Parameter
    assert set(params) == {"t_1_folded", "exp_folded", "sum_1_folded"}
    assert all(p.requires_grad for p in params.values())
    assert torch.allclose(params["exp_folded"], model.log_scale.exp())
    assert_same_outputs(model, gm, inputs)
    assert_untouched(model, before)


def test_fold_constants_from_buffers_gives_a_buffer() -> None:
    root = nn.Module()
    root.register_buffer("offset", torch.randn(3))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    offset = graph.get_attr("offset")
    scaled = graph.call_function(torch.mul, (offset, 2.0))
    graph.output(graph.call_function(torch.add, (x, graph.call_method("sigmoid", (scaled,)))))
    gm = torch.fx.GraphModule(root, graph)
    inputs = (torch.randn(3),)
    expected = outputs(gm, inputs)
    res = run_pass(FoldConstants(), gm, inputs)
    assert res.stats["folded"] == {"sigmoid": "sigmoid_folded"}
    assert dict(res.graph.named_parameters()) == {}
    assert list(dict(res.graph.named_buffers())) == ["sigmoid_folded"]
    assert torch.equal(res.graph.sigmoid_folded, torch.sigmoid(root.offset * 2.0))
    assert [n.op for n in res.graph.graph.nodes] == ["placeholder", "get_attr", "call_function", "output"]
    assert torch.equal(outputs(res.graph, inputs)[0], expected[0])


class RandomConstants(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(self.w) + F.dropout(self.w, 0.5) + torch.empty_like(self.w).zero_()


def test_fold_constants_never_folds_randomness_or_mutation() -> None:
    model, inputs = RandomConstants(), (torch.randn(3),)
    res = run_pass(FoldConstants(), model, inputs)
    assert res.stats["folded"] == {}
    assert node_targets(res.graph) == ["rand_like", "add", "dropout", "add", "empty_like", "zero_", "add"]


def test_fold_constants_respects_max_bytes() -> None:
    model, inputs = Constants().eval(), (torch.randn(4, 5),)
    res = run_pass(FoldConstants(max_bytes=8), model, inputs)
    assert set(res.stats["folded"]) == {"size"}
    assert any("max_bytes=8" in d.message for d in res.diagnostics)
    assert_same_outputs(model, res.graph, inputs)


class SharedSource(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.contiguous() + x @ self.w.t()


def test_fold_constants_reuses_identical_tensors_and_keeps_used_sources() -> None:
    model, inputs = SharedSource(), (torch.randn(2, 4),)
    res = run_pass(FoldConstants(), model, inputs)
    gm = res.graph
    assert res.stats["folded"] == {"contiguous": "w", "t": "t_folded"}
    assert res.stats["removed_attributes"] == []
    assert sorted(n.target for n in gm.graph.nodes if n.op == "get_attr") == ["t_folded", "w"]
    assert_same_outputs(model, gm, inputs)
    out_before = outputs(gm, inputs)[0]
    with torch.no_grad():
        gm.w.add_(1)
    assert not torch.equal(outputs(gm, inputs)[0], out_before)   # the fold made a copy, not a view
    assert torch.equal(gm.t_folded, model.w.detach().t())
