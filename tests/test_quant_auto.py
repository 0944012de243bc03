"""``quantize-auto``: INT8 everywhere except the fewest layers that keep the measured drop within budget."""

from __future__ import annotations

import pytest
import torch

import fxcompress as fxc
from fxcompress.digits import accuracy
from fxcompress.errors import PassError, PipelineError
from passes import QuantizeAuto


pytestmark = pytest.mark.usefixtures("one_thread")



def _stats(c: fxc.Compiled) -> dict:  # type: ignore[type-arg]
    return next(r for r in c.report.rows if r.name.startswith("quantize-auto")).stats


def test_transformer_at_4_bit_weights_meets_the_accuracy_budget_with_few_float_layers(digits_transformer) -> None:  # type: ignore[no-untyped-def]
    model, data = digits_transformer
    ex = (next(iter(data.test))[0][:1],)
    c = fxc.compile(model, ex, [QuantizeAuto(max_drop=0.5, weight_bits=4, eval_data=data.test)],
                    calibration=data.calibration, target="fx")
    st = _stats(c)
    print(f"\nquantize-auto, transformer, 4-bit weights: all INT8 drop {st['all_int8_drop']:.2f}, final drop "
          f"{st['drop']:.2f} with {st['float_count']} float layer(s), bisection k {st['bisection_k']}")
    assert st["metric"] == "accuracy" and st["held_out"]
    assert st["all_int8_drop"] > 0.5  # the setting needs the search
    assert st["drop"] <= 0.5
    rows = st["precision"]
    assert len(rows) == 18 and [r["sensitivity_rank"] for r in rows] == list(range(1, 19))
    floats = [r["node"] for r in rows if r["precision"] == "float"]
    assert 1 <= len(floats) == st["float_count"] <= st["bisection_k"] < len(rows)
    measured = 100 * accuracy(c.graph_module, data.test)
    assert measured == pytest.approx(st["score"], abs=1e-6)
    assert st["float_score"] - measured <= 0.5
    quant = next(r for r in c.report.rows if r.name.startswith("quantize-auto")).stats["int8_layers"]
    assert not set(floats) & set(quant) and len(quant) == 18 - len(floats)


def test_unlabeled_eval_data_uses_output_cosine(digits) -> None:  # type: ignore[no-untyped-def]
    model, data = digits
    ex = (next(iter(data.test))[0][:1],)
    images = [x for x, _ in data.test][:3]
    c = fxc.compile(model, ex, [QuantizeAuto(max_drop=0.05, per_channel=False, eval_data=images)],
                    calibration=data.calibration, target="fx")
    st = _stats(c)
    assert st["metric"] == "cosine"
    with torch.no_grad():
        cos = torch.cat([torch.nn.functional.cosine_similarity(c.graph_module(x), model(x), dim=1) for x in images])
    assert 100 * (1 - float(cos.mean())) == pytest.approx(st["drop"], abs=1e-3)
    assert st["drop"] <= 0.05
    assert (st["float_count"] > 0) == (st["all_int8_drop"] > 0.05)


def test_missing_labels_or_eval_data_are_reported(digits) -> None:  # type: ignore[no-untyped-def]
    model, data = digits
    ex = (next(iter(data.test))[0][:1],)
    with pytest.raises(PassError, match="needs labels"):
        fxc.compile(model, ex, [QuantizeAuto(metric="accuracy", eval_data=[x for x, _ in data.test])],
                    calibration=data.calibration, target="fx")
    c = fxc.compile(model, ex, "quantize-auto{max-drop=100}", calibration=data.calibration, target="fx")
    row = next(r for r in c.report.rows if r.name.startswith("quantize-auto"))
    assert row.stats["float_count"] == 0 and row.stats["evaluations"] == 1
    assert any("not held-out" in (d["message"] if isinstance(d, dict) else d.message) for d in row.diagnostics)
    with pytest.raises(PipelineError, match="max_drop >= 0"):
        QuantizeAuto(max_drop=-1)
