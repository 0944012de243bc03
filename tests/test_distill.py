"""Distill: the KD loss against a hand computation, the teacher left frozen and untouched, feature
distillation through 1x1 projections, pipeline strings, and on real data (digits) a pruned student
that distillation repairs better than plain fine-tuning."""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fxcompress as fxc
from fxcompress.digits import DigitsResNet, accuracy, load_digits_tensors
from fxcompress.errors import PassError, PipelineError
from fxcompress.pass_base import PassContext
from fxcompress.registry import parse_pipeline
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from fxcompress.verify import error_metrics
from passes import FineTune, PruneChannels
from passes.distill import Distill, distillation_loss, kd_loss, make_projection, tapped


@contextmanager
def one_thread() -> Iterator[None]:
    """Same float results whatever the machine's core count (training is tiny anyway)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_digits_loader(n: int = 192, batch_size: int = 32) -> DataLoader:
    x, y, _, _ = load_digits_tensors(0)
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size, shuffle=True)


def small_student_and_teacher(seed: int = 0) -> tuple[GraphModule, nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = DigitsResNet(width=8).eval()
        student = DigitsResNet(width=4)
    x = torch.rand(2, 1, 8, 8)
    return trace(student, (x,)), teacher, x


# ----------------------------------------------------------------------------- the loss

def test_kd_loss_equals_hand_computation() -> None:
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.5]])
    y = torch.tensor([1, 2])
    temp, alpha = 3.0, 0.6

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = softmax(srow), softmax(trow)
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    kl /= 2
    ce = 0.0
    for srow, label in zip(s.tolist(), y.tolist()):
        ce += -(srow[label] - math.log(sum(math.exp(v) for v in srow)))
    ce /= 2
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = kd_loss(s, t, y, temperature=temp, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    got = distillation_loss(s, t, y, temperature=temp, alpha=alpha)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    # without labels only the soft term remains, with weight 1
    soft_only = kd_loss(s, t, None, temperature=temp, alpha=alpha)
    assert float(soft_only) == pytest.approx(temp ** 2 * kl, rel=1e-6)
    # identical logits, alpha 1: zero loss
    assert float(kd_loss(s, s, y, temperature=temp, alpha=1.0)) == pytest.approx(0.0, abs=1e-7)


def test_regression_outputs_and_missing_labels_use_mse() -> None:
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.5, 2.0], [2.0, 5.0]])
    mse_t = ((0.5 ** 2) + 0 + 1 + 1) / 4
    assert float(distillation_loss(s, t)) == pytest.approx(mse_t)  # 2-D, no labels
    y = torch.tensor([[1.0, 2.0], [3.0, 3.0]])  # float targets: regression
    mse_y = 1 / 4
    got = distillation_loss(s, t, y, alpha=0.25)
    assert float(got) == pytest.approx(0.25 * mse_t + 0.75 * mse_y)
    s3, t3 = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)  # non-2-D output, integer labels ignored
    assert float(distillation_loss(s3, t3, torch.tensor([0, 1]))) == pytest.approx(1.0)
    # forcing KD on unlabeled logits
    assert float(distillation_loss(s, t, None, kind="kd", temperature=2.0)) == pytest.approx(
        float(kd_loss(s, t, None, temperature=2.0)))
    with pytest.raises(PassError, match="differ"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))


def test_projection_shapes() -> None:
    assert isinstance(make_projection((2, 8, 4, 4), (2, 8, 4, 4), ("a", "b")), nn.Identity)
    conv = make_projection((2, 4, 4, 4), (2, 8, 4, 4), ("a", "b"))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 8
    conv1d = make_projection((2, 4, 10), (2, 6, 10), ("a", "b"))
    assert isinstance(conv1d, nn.Conv1d) and conv1d.kernel_size == (1,)
    linear = make_projection((2, 4), (2, 6), ("a", "b"))
    assert isinstance(linear, nn.Linear)
    for proj, student, teacher in ((conv, (2, 4, 4, 4), (2, 8, 4, 4)), (conv1d, (2, 4, 10), (2, 6, 10)),
                                   (linear, (2, 4), (2, 6))):
        assert tuple(proj(torch.zeros(student)).shape) == teacher
    with pytest.raises(PassError, match="spatial"):
        make_projection((2, 4, 4, 4), (2, 8, 2, 2), ("layer1_relu_1", "layer2"))


# ----------------------------------------------------------------------------- the pass

def test_pipeline_string_round_trips() -> None:
    p = Distill(epochs=2, temperature=1, alpha=0.5)
    assert str(p) == "distill{epochs=2}"  # temperature 1 and alpha 0.5 are the defaults
    (back,) = parse_pipeline(str(p))
    assert back == p
    q = Distill(epochs=3, temperature=2.5, alpha=0.9, features=(("layer1_relu_1", "layer1"),), max_batches=4)
    (back,) = parse_pipeline(str(q))
    assert back == q and back.features == (("layer1_relu_1", "layer1"),)
    (parsed,) = parse_pipeline("distill{epochs=2,temperature=1,alpha=0.5}")
    assert parsed == p
    assert "teacher" not in str(Distill(teacher=nn.Linear(2, 2)))


def test_bad_options_are_errors() -> None:
    with pytest.raises(PipelineError, match="alpha"):
        Distill(alpha=1.5)
    with pytest.raises(PipelineError, match="temperature"):
        Distill(temperature=0)
    with pytest.raises(PipelineError, match="optimizer"):
        Distill(optimizer="lbfgs")
    with pytest.raises(PipelineError, match="no option 'temprature'"):
        parse_pipeline("distill{temprature=2}")


def test_needs_train_data_and_teacher() -> None:
    gm, teacher, x = small_student_and_teacher()
    with pytest.raises(PassError, match="train_data"):
        Distill().run(gm, PassContext((x,), original=teacher))
    with pytest.raises(PassError, match="no teacher"):
        Distill().run(gm, PassContext((x,), train_data=tiny_digits_loader()))


def test_repeat_prune_then_distill_with_its_own_data() -> None:
    """The issue's schedule, written with names from ``passes`` only: Distill brings its data, so
    compile() needs no train_data=; every round removes channels and records losses and the
    agreement (top-1) with the original model."""
    from passes import Repeat

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsResNet(width=8).eval()
    loader = tiny_digits_loader(n=32, batch_size=16)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    distill = Distill(data=loader, epochs=1)
    assert str(distill) == "distill{epochs=1}" and distill.requires == () and Distill.requires == ("train-data",)
    with one_thread():
        compiled = fxc.compile(model, (x,), [Repeat(2, [PruneChannels(ratio=0.25), distill])], target="fx",
                               progress=False)
    prunes = [r for r in compiled.report if r.name.startswith("repeat[") and "/prune-channels" in r.name]
    distills = [r for r in compiled.report if "/distill" in r.name]
    assert [r.name.split("]")[0] for r in prunes + distills] == ["repeat[1/2", "repeat[2/2"] * 2
    first, second = (p.stats["layers"] for p in prunes)
    assert first["conv1"]["channels_before"] == 8
    for name, row in second.items():  # round 2 starts where round 1 ended and shrinks again
        assert row["channels_before"] == first[name]["channels_after"], name
    shrunk = [n for n in first if n != "fc"]
    assert all(first[n]["channels_after"] < first[n]["channels_before"] for n in shrunk)
    assert all(second[n]["channels_after"] < second[n]["channels_before"] for n in shrunk)
    assert compiled.graph_module.conv1.out_channels == second["conv1"]["channels_after"] < 8
    for record in distills:
        stats = record.stats
        assert stats["steps"] == len(loader) and stats["epochs"] == 1
        assert math.isfinite(stats["first_loss"]) and math.isfinite(stats["last_loss"])
        assert stats["epoch_losses"] == [stats["last_loss"]]
        assert 0.0 <= record.error["top1"] <= 1.0 and record.error["max_abs"] > 0
    with torch.no_grad():  # the last round's recorded error is the final graph's, measured against the original
        final = error_metrics(model(x), compiled.graph_module(x)).to_dict()
    assert distills[-1].error == pytest.approx(final)
    with pytest.raises(PipelineError, match="one-shot iterator"):
        Distill(data=iter(loader))
    with pytest.raises(PipelineError, match="iterable of"):
        Distill(data=torch.zeros(3))


def test_teacher_frozen_unchanged_and_student_trained() -> None:
    gm, teacher, x = small_student_and_teacher()
    teacher.train()  # a user's model in training mode: used in eval mode, its flag restored
    before_teacher = copy.deepcopy(teacher.state_dict())
    before_student = copy.deepcopy(gm.state_dict())
    seen_modes: list[bool] = []
    hook = teacher.register_forward_hook(lambda m, a, o: seen_modes.append(m.training))
    ctx = PassContext((x,), train_data=tiny_digits_loader(), seed=0)
    with one_thread():
        result = Distill(teacher=teacher, epochs=2, lr=5e-3).run(gm, ctx)
    hook.remove()
    assert seen_modes and not any(seen_modes)  # teacher ran in eval mode on every batch
    assert teacher.training and all(m.training for m in teacher.modules())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k]), k  # incl. BatchNorm running stats
    assert all(p.grad is None for p in teacher.parameters())
    assert isinstance(result.graph, GraphModule) and result.graph is gm
    assert not any(m.training for m in gm.modules())  # eval after training
    changed = [k for k, v in gm.state_dict().items() if not torch.equal(v, before_student[k])]
    assert "conv1.weight" in changed and "fc.weight" in changed
    stats = result.stats
    assert stats["steps"] == 2 * 6 and stats["teacher"] == "DigitsResNet" and stats["projections"] == 0
    assert stats["last_loss"] < stats["first_loss"]


def test_original_is_the_default_teacher_and_training_mode_during_training() -> None:
    gm, teacher, x = small_student_and_teacher()
    modes: list[bool] = []
    hook = gm.get_submodule("bn1").register_forward_hook(lambda m, a, o: modes.append(m.training))
    ctx = PassContext((x,), train_data=tiny_digits_loader(), original=teacher, seed=0)
    result = Distill(epochs=1, max_batches=3).run(gm, ctx)
    hook.remove()
    assert modes[:3] == [True, True, True]  # the student trained in train mode
    assert result.stats["teacher"] == "original" and result.stats["steps"] == 3


def test_progress_bar_shows_the_running_loss() -> None:
    gm, teacher, x = small_student_and_teacher()
    calls: list[tuple[str, float | None, dict]] = []

    class Bar:
        def __init__(self, description: str, total: float | None) -> None:
            self.description, self.total = description, total

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def advance(self, n: float = 1, **fields: object) -> None:
            calls.append((self.description, self.total, dict(fields)))

    ctx = PassContext((x,), train_data=tiny_digits_loader(), original=teacher, seed=0)
    ctx.progress = lambda description="", total=None: Bar(description, total)
    result = Distill(epochs=2, max_batches=4).run(gm, ctx)
    assert len(calls) == result.stats["steps"] == 8
    assert all(c[0] == "distill" and c[1] == 8 for c in calls)
    losses = [c[2]["loss"] for c in calls]
    assert all(isinstance(v, float) and v > 0 for v in losses)
    assert losses[0] == pytest.approx(result.stats["first_loss"])


def test_unlabeled_batches_and_plain_lists() -> None:
    gm, teacher, x = small_student_and_teacher()
    xs, _, _, _ = load_digits_tensors(0)
    batches = [xs[i:i + 16] for i in range(0, 64, 16)]  # bare input tensors, no labels: MSE to the teacher
    with torch.no_grad():
        before = teacher(xs[:64])
        err_before = float(((gm(xs[:64]) - before) ** 2).mean())
    ctx = PassContext((x,), train_data=batches, original=teacher, seed=0)
    with one_thread():
        result = Distill(epochs=5, lr=5e-3).run(gm, ctx)
    with torch.no_grad():
        err_after = float(((gm(xs[:64]) - before) ** 2).mean())
    assert result.stats["steps"] == 20
    assert err_after < 0.5 * err_before


def test_deterministic_for_a_seed() -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        gm, teacher, x = small_student_and_teacher()
        ctx = PassContext((x,), train_data=tiny_digits_loader(), original=teacher, seed=seed)
        with one_thread():
            Distill(epochs=1, features=(("layer1_relu_1", "layer1"),)).run(gm, ctx)
        return gm.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_feature_distillation_projection_learned_then_discarded() -> None:
    gm, teacher, x = small_student_and_teacher()
    nodes_before = [n.name for n in gm.graph.nodes]
    params_before = {k for k, _ in gm.named_parameters()}
    ctx = PassContext((x,), train_data=tiny_digits_loader(), original=teacher, seed=0)
    # student width 4 vs teacher width 8: both pairs need a 1x1 projection; a module name and a
    # call_module target name are both accepted
    features = (("layer1_relu_1", "layer1"), ("layer2.relu", "layer2"))
    with one_thread():
        plain = copy.deepcopy(gm)
        plain_ctx = PassContext((x,), train_data=tiny_digits_loader(), original=teacher, seed=0)
        Distill(epochs=1).run(plain, plain_ctx)
        result = Distill(epochs=1, features=features, feature_weight=1.0).run(gm, ctx)
    assert result.stats["projections"] == 2
    assert [n.name for n in gm.graph.nodes] == nodes_before  # projections are not part of the graph
    assert {k for k, _ in gm.named_parameters()} == params_before
    # the feature term changed training: the weights differ from plain KD
    weight = "layer1.conv1.weight"
    assert not torch.equal(plain.get_parameter(weight), gm.get_parameter(weight))


def test_feature_names_in_traced_teacher_and_errors() -> None:
    gm, teacher, x = small_student_and_teacher()
    ctx = PassContext((x,), train_data=tiny_digits_loader(), original=teacher, seed=0)
    # "add" is an FX node (not a module) of the teacher: the teacher is traced to reach it
    result = Distill(max_batches=2, features=(("add", "add"),)).run(gm, ctx)
    assert result.stats["projections"] == 1
    with pytest.raises(PassError, match="no FX node or module called 'nope'"):
        Distill(max_batches=1, features=(("nope", "layer1"),)).run(gm, ctx)


def test_tapped_shares_parameters() -> None:
    gm, _, x = small_student_and_teacher()
    t = tapped(gm, ["layer1_relu_1", "layer2.conv1"], "the student")
    out, (f1, f2) = t(x)
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    conv_out: list[torch.Tensor] = []
    hook = gm.get_submodule("layer2.conv1").register_forward_hook(lambda m, a, o: conv_out.append(o))
    with torch.no_grad():
        expected = Recorder(gm).run(x)
    hook.remove()
    assert torch.equal(out, expected) and torch.equal(out, gm(x))
    assert f1.shape == (2, 4, 8, 8) and f2.shape == (2, 8, 4, 4)
    assert torch.equal(f1, seen["layer1_relu_1"]) and torch.equal(f2, conv_out[0])
    assert t.get_submodule("layer1.conv1").weight is gm.get_submodule("layer1.conv1").weight


def test_compile_pipeline_string_with_distill() -> None:
    torch.manual_seed(0)
    model = DigitsResNet(width=4).eval()
    x = torch.rand(2, 1, 8, 8)
    before = copy.deepcopy(model.state_dict())
    compiled = fxc.compile(model, (x,), passes="distill{epochs=1,max-batches=3},fold-batchnorm",
                           train_data=tiny_digits_loader(), target="fx", progress=False)
    assert isinstance(compiled.graph_module, GraphModule)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # user's model untouched
    (row,) = compiled.report.find("distill")
    assert row.status == "ok" and row.weights_changed and row.stats["steps"] == 3


# ----------------------------------------------------------------------------- real data

class NoisyDigits(Dataset):
    """The digits training images with Gaussian pixel noise (sigma 0.15), drawn from the torch RNG,
    which the training loop seeds: a fixed seed gives the same noise."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sigma: float = 0.15) -> None:
        self.x, self.y, self.sigma = x, y, sigma

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        return (img + self.sigma * torch.randn_like(img)).clamp(0.0, 1.0), self.y[i]


@pytest.mark.slow
def test_distilling_a_pruned_student_beats_fine_tuning(digits) -> None:
    """Half the channels pruned; 5 epochs of distillation from the original vs 5 epochs of plain
    fine-tuning, same loop, same data (noise-augmented digits), same seed."""
    model, data = digits
    base = accuracy(model, data.test)
    x = next(iter(data.test))[0][:2]
    pruned = run_pass(PruneChannels(ratio=0.5), trace(model, (x,)), (x,)).graph
    x_tr, y_tr, _, _ = load_digits_tensors(0)
    train = DataLoader(NoisyDigits(x_tr, y_tr), batch_size=64, shuffle=True)

    def recover(p: FineTune | Distill) -> float:
        gm = copy.deepcopy(pruned)
        ctx = PassContext((x,), train_data=train, original=copy.deepcopy(model), seed=0)
        with one_thread():
            out = p.run(gm, ctx).graph
        return accuracy(out, data.test)

    pruned_acc = accuracy(pruned, data.test)
    fine_tuned = recover(FineTune(epochs=5, lr=1e-2))
    distilled = recover(Distill(epochs=5, lr=1e-2, temperature=4, alpha=0.9))
    print(f"\ndigits: original {base:.4f}, pruned {pruned_acc:.4f}, fine-tuned {fine_tuned:.4f}, "
          f"distilled {distilled:.4f}")
    assert distilled > fine_tuned
    assert distilled >= base - 0.01
    assert accuracy(model, data.test) == base  # the session's model (the teacher) is untouched
