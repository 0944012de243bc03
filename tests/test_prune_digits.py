"""Real data: a residual CNN trained on scikit-learn's digits, half its channels pruned, then
fine-tuned: it ends within 1.5 points of the unpruned accuracy, at about a quarter of the size."""

from __future__ import annotations

import pytest

from fxcompress.digits import accuracy, train_classifier
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes import PruneChannels


@pytest.mark.slow
def test_prune_half_then_finetune_recovers_accuracy(digits) -> None:
    model, data = digits
    base = accuracy(model, data.test)
    x = next(iter(data.test))[0][:2]
    result = run_pass(PruneChannels(ratio=0.5), trace(model, (x,)), (x,))
    pruned = result.graph
    s = result.stats
    assert s["params_after"] < 0.3 * s["params_before"] and s["macs_after"] < 0.3 * s["macs_before"]
    assert s["unpruned"] == {"fc": "reaches the model output 'fc' (its shape must not change)"}
    before_finetune = accuracy(pruned, data.test)
    train_classifier(pruned, data.train, epochs=6, lr=1e-2, seed=0)
    after = accuracy(pruned, data.test)
    print(f"\ndigits: unpruned {base:.4f}, pruned {before_finetune:.4f}, fine-tuned {after:.4f}, "
          f"params {s['params_before']} -> {s['params_after']}, MACs {s['macs_before']} -> {s['macs_after']}")
    assert base > 0.95
    assert after >= base - 0.015
    assert accuracy(model, data.test) == base  # the session's model was not touched
