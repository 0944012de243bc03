"""AdaRound (``quantize-int8{rounding=adaround}``): the learned rounding, its reconstruction error
and its accuracy on digits against round-to-nearest at 4-bit weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxcompress as fxc
from fxcompress.digits import accuracy
from fxcompress.errors import PipelineError
from passes import FoldBatchNorm, QuantizeInt8
from passes.quantize.adaround import AdaRoundConfig, RoundingTask, learn_rounding, nearest


pytestmark = pytest.mark.usefixtures("one_thread")



def test_learned_rounding_only_moves_to_the_neighbouring_grid_point_and_lowers_the_output_error() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=gen)
    scale = (w.abs().amax(dim=1, keepdim=True) / 7)
    x = (torch.randn(256, 24, generator=gen) @ torch.randn(24, 24, generator=gen)) * 0.3  # correlated inputs
    y = F.linear(x, w)
    task = RoundingTask("fc", w, scale, -7, 7, channel_dim=-1)
    q, err = learn_rounding(task, F.linear, x, y, AdaRoundConfig(iters=500, batch=64))
    floor = torch.floor(w / scale)
    assert bool(((q == floor) | (q == floor + 1) | (q.abs() == 7)).all())
    assert q.min() >= -7 and q.max() <= 7
    assert not torch.equal(q, nearest(task))
    assert err["adaround"] < 0.95 * err["nearest"], err
    measured = float((F.linear(x, scale * q) - y).pow(2).sum(-1).mean())
    assert measured == pytest.approx(err["adaround"], rel=1e-4)


def test_adaround_beats_nearest_at_4_bit_weights_on_digits(digits) -> None:  # type: ignore[no-untyped-def]
    model, data = digits
    ex = (next(iter(data.test))[0][:1],)
    acc, stats = {}, {}
    for rounding in ("nearest", "adaround"):
        c = fxc.compile(model, ex, [FoldBatchNorm(), QuantizeInt8(weight_bits=4, rounding=rounding,
                                                                   adaround_iters=150)],
                        calibration=data.calibration, target="onnxruntime")
        acc[rounding] = accuracy(c, data.test)
        stats[rounding] = c.report.rows[-2].stats if c.report.rows[-1].name == "export-onnx" else c.report.rows[-1].stats
        assert stats[rounding]["weight_range"] == [-7, 7]
        assert abs(accuracy(c.graph_module, data.test) - acc[rounding]) <= 2 / 360  # ORT runs what FX simulates
    print(f"\ndigits ResNet, 4-bit weights: nearest {acc['nearest']:.4f}, AdaRound {acc['adaround']:.4f}")
    assert acc["adaround"] > acc["nearest"], acc
    errors = stats["adaround"]["adaround"]
    assert len(errors) == 7
    assert all(e["adaround"] < e["nearest"] for e in errors.values()), errors


@pytest.mark.parametrize("options, message", [
    ({"weight_bits": 9}, "weight_bits must be 2..8"),
    ({"rounding": "adaround", "qat": True}, "qat=false"),
    ({"rounding": "stochastic"}, "must be one of"),
])
def test_bad_rounding_options_are_named(options, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PipelineError, match=message):
        QuantizeInt8(**options)
