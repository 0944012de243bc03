"""Recovery with default options: the demo's DigitsResNet (width 32) loses 70% of its channels
(accuracy falls to chance) and ``distill`` / ``fine-tune`` at their defaults bring it back.

Measured with ``bench/recovery.py`` (seeds 0-4): distill 98.7% mean, fine-tune 98.9%, each
seed within two test images of the other; lr 1e-3 with T 4 (the old defaults) gave 59% in 2 epochs."""

from __future__ import annotations

import copy
from typing import Iterator

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.digits import DigitsData, DigitsResNet, accuracy, digits_loaders, train_classifier
from passes import Distill, FineTune

PRUNE = "prune-channels{ratio=0.7}"
#: distill may trail fine-tune by at most two of the 360 test images: on this data the teacher is
#: right on the whole training set, so its targets carry little beyond the labels and the two tie
TOLERANCE = 2 / 360


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Training these tiny batches on one thread is as fast and stays fast on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_model() -> tuple[nn.Module, DigitsData]:
    """DigitsResNet(width=32) trained as ``fxcompress demo`` trains it (10 epochs, seed 0)."""
    data = digits_loaders(batch_size=64, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsResNet(width=32)
    return train_classifier(model, data.train, epochs=10, seed=0), data


def _recover(model: nn.Module, data: DigitsData, pipeline: str) -> tuple[float, fxc.Compiled]:
    x = next(iter(data.test))[0][:1]
    compiled = fxc.compile(model, (x,), pipeline, target="fx", train_data=data.train, seed=0)
    return accuracy(compiled.graph_module, data.test), compiled


@pytest.mark.slow
def test_default_recovery_after_pruning_70_percent(demo_model: tuple[nn.Module, DigitsData],
                                                   one_thread: None) -> None:
    model, data = demo_model
    assert Distill().epochs == FineTune().epochs <= 3
    before = copy.deepcopy(model.state_dict())
    base = accuracy(model, data.test)
    pruned, _ = _recover(model, data, PRUNE)
    distilled, compiled = _recover(model, data, f"{PRUNE},distill,fold-batchnorm")
    fine_tuned, _ = _recover(model, data, f"{PRUNE},fine-tune,fold-batchnorm")
    print(f"\ndigits width 32: original {base:.4f}, pruned 70% {pruned:.4f}, distilled {distilled:.4f}, "
          f"fine-tuned {fine_tuned:.4f}")
    assert base > 0.98 and pruned < 0.5
    assert compiled.report.find("distill")[0].stats["epochs"] == Distill().epochs
    assert distilled >= 0.97
    assert distilled >= fine_tuned - TOLERANCE, (distilled, fine_tuned)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the teacher is never trained
