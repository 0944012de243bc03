"""Shared fixtures: the model zoo and a digits classifier trained once per session.

The golden-graph plugin is not registered here: it comes from the ``pytest11`` entry point.

Hypothesis runs under the ``fxcompress`` profile by default: derandomized (the same examples on
every machine and run, so random draws never decide whether CI passes), no example database
written into the tree, no deadline and no too-slow health check (both time the machine, and shared CI
machines are noisy). ``FXCOMPRESS_HYPOTHESIS=random``
selects the ``random`` profile for bug hunting: fresh examples each run, failures kept in
``.hypothesis/`` and replayed.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Iterator, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from torch import Tensor, nn

from fxcompress.digits import (DigitsData, DigitsMobileNet, DigitsResNet, DigitsTransformer, digits_loaders,
                               train_classifier)
from zoo import ZOO, ZOO_NAMES

DIGITS_WIDTH = 16
DIGITS_EPOCHS = 6
DIGITS_SEED = 0

#: examples per property test unless the test states its own ``max_examples``
HYPOTHESIS_MAX_EXAMPLES = 25
HYPOTHESIS_PROFILE_ENV = "FXCOMPRESS_HYPOTHESIS"

settings.register_profile("fxcompress", derandomize=True, database=None, max_examples=HYPOTHESIS_MAX_EXAMPLES,
                          deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("random", derandomize=False, max_examples=HYPOTHESIS_MAX_EXAMPLES, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "fxcompress"))
if settings.default.database is None:   # hypothesis also caches constants on disk: not in the tree either
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "fxcompress-hypothesis"))


class TrainedDigits(NamedTuple):
    """A trained ``DigitsResNet`` (eval mode; shared by the session, never mutate it) and its data."""

    model: nn.Module
    data: DigitsData


class ZooCase(NamedTuple):
    name: str
    model: nn.Module
    inputs: tuple[Tensor, ...]


@pytest.fixture(scope="session")
def digits() -> TrainedDigits:
    """``(model, data)``: a DigitsResNet trained once per session (a few seconds on a CPU).
    Deep-copy the model (or use ``digits_model``) before changing it."""
    data = digits_loaders(batch_size=64, seed=DIGITS_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DIGITS_SEED)
        model = DigitsResNet(width=DIGITS_WIDTH)
    train_classifier(model, data.train, epochs=DIGITS_EPOCHS, seed=DIGITS_SEED)
    return TrainedDigits(model.eval(), data)


def _trained(cls: type[nn.Module], epochs: int) -> TrainedDigits:
    data = digits_loaders(batch_size=64, seed=DIGITS_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DIGITS_SEED)
        model = cls()
    train_classifier(model, data.train, epochs=epochs, seed=DIGITS_SEED)
    return TrainedDigits(model.eval(), data)


@pytest.fixture(scope="session")
def digits_mobilenet() -> TrainedDigits:
    """``(model, data)``: a depthwise ``DigitsMobileNet`` trained once per session. Deep-copy before changing."""
    return _trained(DigitsMobileNet, epochs=8)


@pytest.fixture(scope="session")
def digits_transformer() -> TrainedDigits:
    """``(model, data)``: a ``DigitsTransformer`` (rows as tokens) trained once per session. Deep-copy
    before changing."""
    return _trained(DigitsTransformer, epochs=12)


@pytest.fixture
def digits_model(digits: TrainedDigits) -> nn.Module:
    """A private deep copy of the session's trained digits model, free to mutate."""
    return copy.deepcopy(digits.model)


@pytest.fixture(params=ZOO_NAMES)
def zoo_case(request: pytest.FixtureRequest) -> ZooCase:
    """Every zoo model in turn, freshly built: ``(name, model, example_inputs)``."""
    model, inputs = ZOO[request.param]()
    return ZooCase(request.param, model, inputs)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread meanwhile: for tests of many small graph runs, where on 2 shared cores one
    thread is several times faster than two (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
