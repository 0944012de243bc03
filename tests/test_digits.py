"""fxcompress.digits: the real-data helpers (scikit-learn digits, residual CNN, trainer, accuracy)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from fxcompress.digits import (CALIBRATION_SAMPLES, DigitsResNet, accuracy, digits_loaders,
                               load_digits_tensors, train_classifier)
from fxcompress.trace import trace


def test_split_is_stratified_deterministic_and_scaled() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed=0)
    assert x_tr.shape == (1437, 1, 8, 8) and x_te.shape == (360, 1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    counts_tr = torch.bincount(y_tr, minlength=10).float() / len(y_tr)
    counts_te = torch.bincount(y_te, minlength=10).float() / len(y_te)
    assert (counts_tr - counts_te).abs().max() < 0.01
    again = load_digits_tensors(seed=0)
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)
    other = load_digits_tensors(seed=1)
    assert not torch.equal(other[2], x_te)


def test_loaders_batches_and_calibration_subset() -> None:
    data = digits_loaders(batch_size=50, seed=0)
    x, y = next(iter(data.train))
    assert x.shape == (50, 1, 8, 8) and y.shape == (50,)
    assert sum(len(b[1]) for b in data.calibration) == CALIBRATION_SAMPLES
    first = [b[1] for b in data.test]
    second = [b[1] for b in data.test]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert sum(len(b) for b in first) == 360


def test_training_is_deterministic_and_restores_global_rng() -> None:
    data = digits_loaders(batch_size=128, seed=0)
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        model = DigitsResNet(width=4)
        state = torch.get_rng_state()
        train_classifier(model, data.train, epochs=1, seed=7)
        assert torch.equal(state, torch.get_rng_state())
        assert not model.training
        models.append(model)
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), k


class _Oracle(nn.Module):
    """Logits that are right for labels below ``cut`` and predict class 0 otherwise."""

    def __init__(self, labels_of: dict[bytes, int], cut: int) -> None:
        super().__init__()
        self.labels_of, self.cut = labels_of, cut

    def forward(self, x: Tensor) -> Tensor:
        labels = torch.tensor([self.labels_of[row.numpy().tobytes()] for row in x])
        labels = torch.where(labels < self.cut, labels, torch.zeros_like(labels))
        return nn.functional.one_hot(labels, 10).float()


def test_accuracy_counts_correct_top1() -> None:
    data = digits_loaders(seed=0)
    _, _, x_te, y_te = load_digits_tensors(seed=0)
    labels_of = {row.numpy().tobytes(): int(y) for row, y in zip(x_te, y_te)}
    assert accuracy(_Oracle(labels_of, 10), data.test) == 1.0
    expected = float(((y_te < 5) | (y_te == 0)).float().mean())
    assert accuracy(_Oracle(labels_of, 5), data.test) == pytest.approx(expected)
    assert accuracy(lambda x: (torch.ones(len(x), 10), None), data.test) == pytest.approx(
        float((y_te == 0).float().mean()))


def test_accuracy_leaves_a_train_mode_module_untouched() -> None:
    data = digits_loaders(seed=0)
    model = DigitsResNet(width=4).train()
    model.layer1.eval()
    flags = [m.training for m in model.modules()]
    stats = copy.deepcopy(model.bn1.running_mean)
    accuracy(model, data.test)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(stats, model.bn1.running_mean)


def test_trained_digits_cnn_is_accurate(digits) -> None:
    model, data = digits
    acc = accuracy(model, data.test)
    assert acc >= 0.95
    gm = trace(model, next(iter(data.test))[0][:2])
    assert accuracy(gm, data.test) == acc


@pytest.mark.parametrize("fixture", ["digits_mobilenet", "digits_transformer"])
def test_other_digits_architectures_train_and_trace(fixture: str, request: pytest.FixtureRequest) -> None:
    model, data = request.getfixturevalue(fixture)
    acc = accuracy(model, data.test)
    assert acc >= 0.94
    gm = trace(model, next(iter(data.test))[0][:2])
    assert accuracy(gm, data.test) == acc
