"""``fxcompress.bench.interleaved``: variants timed in turns, each keeping its best round."""

from __future__ import annotations

import time

import pytest
import torch

from fxcompress.bench import interleaved
from fxcompress.errors import InputError


def test_interleaved_times_every_variant_in_turns_on_copies() -> None:
    calls: list[str] = []
    x = torch.ones(3)

    def fast(t: torch.Tensor) -> None:
        calls.append("fast")
        t.mul_(2)  # in place: must not reach the caller's tensor

    def slow(t: torch.Tensor) -> None:
        calls.append("slow")
        time.sleep(0.002)

    ms = interleaved({"fast": fast, "slow": slow}, (x,), iters=3, rounds=2, warmup=1)
    assert set(ms) == {"fast", "slow"}
    assert ms["slow"] >= 2.0 > ms["fast"] > 0.0  # a sleep lasts at least as long as asked
    assert calls == (["fast"] * 4 + ["slow"] * 4) * 2  # warmup + iters per variant, variants alternate
    assert x.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("arg", [{"iters": 0}, {"rounds": 0}, {"warmup": -1}, {"iters": True}])
def test_interleaved_rejects_bad_counts(arg: dict) -> None:
    with pytest.raises(InputError, match=f"interleaved\\({next(iter(arg))}="):
        interleaved({"f": lambda: None}, (), **arg)
