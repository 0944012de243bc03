"""QuantSensitivity: per-layer INT8 error ranking, skip list, and QuantizeInt8 honouring it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.errors import PassError
from fxcompress.graph_text import to_text
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes import QuantizeInt8, QuantSensitivity


def _mlp_with_a_fragile_first_layer() -> tuple[nn.Module, tuple[torch.Tensor], list[tuple[torch.Tensor]]]:
    """Input feature 0 is 1000x larger than the others (and the first layer scales it back), so one
    per-tensor INT8 scale on the first layer's input wipes out the other features."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
        with torch.no_grad():
            model[0].weight[:, 0] /= 1000.0
        gen = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(6):
            x = torch.randn(16, 8, generator=gen)
            x[:, 0] *= 1000.0
            batches.append((x,))
    return model, batches[0], batches


def _reference_rel_mse(model: nn.Module, ex: tuple[torch.Tensor], batches: list[tuple[torch.Tensor]],
                       layers: list[str], eval_batches: int) -> dict[str, float]:
    """Each layer alone in INT8 (QuantizeInt8 calibrated on all batches, skipping the others): mean over
    the first ``eval_batches`` batches of ||y_q - y||^2 / ||y||^2 against the float model."""
    out = {}
    for layer in layers:
        skip = tuple(n for n in layers if n != layer)
        gm = run_pass(QuantizeInt8(observer="minmax", skip=skip), trace(model, ex), ex, calibration=batches,
                      target="onnxruntime").graph
        with torch.no_grad():
            errs = [float(((gm(*b) - model(*b)) ** 2).sum() / (model(*b) ** 2).sum())
                    for b in batches[:eval_batches]]
        out[layer] = sum(errs) / len(errs)
    return out


def test_ranks_the_fragile_layer_first_and_fills_the_skip_list() -> None:
    model, ex, batches = _mlp_with_a_fragile_first_layer()
    gm = trace(model, ex)
    text = to_text(gm)
    ctx = fxc.PassContext(ex, calibration=batches, target="onnxruntime")
    result = QuantSensitivity(k=1, observer="minmax").run(gm, ctx)
    rows = result.stats["layers"]
    reference = _reference_rel_mse(model, ex, batches, ["_0", "_2", "_4"], eval_batches=4)
    assert [r["node"] for r in rows] == sorted(reference, key=lambda n: -reference[n])
    for r in rows:
        assert r["rel_mse"] == pytest.approx(reference[r["node"]], rel=1e-4), r
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert rows[0]["node"] == "_0" and rows[0]["module"] == "0"
    assert rows[0]["rel_mse"] > 10 * rows[1]["rel_mse"]
    assert all(a["rel_mse"] >= b["rel_mse"] for a, b in zip(rows, rows[1:]))
    assert result.stats["skip"] == ["_0"]
    assert to_text(result.graph) == text  # analysis only
    assert ctx.facts["quant-sensitivity"]["skip"] == ["_0"]  # handed to quantize-int8, whatever runs between

    quant = QuantizeInt8(observer="minmax").run(result.graph, ctx)
    assert "sensitivity" in quant.stats["float_layers"]["_0"]
    assert set(quant.stats["int8_layers"]) == {"_2", "_4"}


def test_mixed_precision_beats_full_int8() -> None:
    model, ex, batches = _mlp_with_a_fragile_first_layer()
    x = torch.cat([b[0] for b in batches])
    ref = model(x)

    def error(skip: tuple[str, ...]) -> float:
        gm = run_pass(QuantizeInt8(observer="minmax", skip=skip), trace(model, ex), ex, calibration=batches,
                      target="onnxruntime").graph
        with torch.no_grad():
            return float(((gm(x) - ref) ** 2).mean())

    assert error(("_0",)) < 0.1 * error(())


def test_needs_calibration() -> None:
    model, ex, _ = _mlp_with_a_fragile_first_layer()
    with pytest.raises(PassError, match="calibration="):
        QuantSensitivity().run(trace(model, ex), fxc.PassContext(ex))


def test_pipeline_carries_the_skip_list_to_quantize_int8() -> None:
    model, ex, batches = _mlp_with_a_fragile_first_layer()
    c = fxc.compile(model, ex, passes="quant-sensitivity{k=1,observer=minmax},quantize-int8{observer=minmax}",
                    calibration=batches, target="onnxruntime")
    assert c.report.find("quant-sensitivity")[0].stats["skip"] == ["_0"]
    quant = c.report.find("quantize-int8")[0].stats
    assert "sensitivity" in quant["float_layers"]["_0"]
    x = torch.cat([b[0] for b in batches])
    assert torch.nn.functional.cosine_similarity(c(x).flatten(), model(x).flatten(), dim=0) > 0.999


def test_the_ranking_reaches_quantize_int8_across_other_passes() -> None:
    """The skip list is a fact handed on in the context, not a cached analysis a graph change drops."""
    mlp, ex, batches = _mlp_with_a_fragile_first_layer()
    model = nn.Sequential(mlp[0], nn.Dropout(0.1), *mlp[1:]).eval()  # remove-dropout changes the graph
    compiled = fxc.compile(model, ex, "quant-sensitivity{k=1,observer=minmax},remove-dropout,"
                                      "quantize-int8{observer=minmax}", calibration=batches, target="fx",
                           progress=False)
    assert compiled.report[2].name == "remove-dropout" and compiled.report[2].status == "ok"  # not "unchanged"
    quant = compiled.report[-1].stats
    assert "sensitivity" in quant["float_layers"]["_0"]
    assert set(quant["int8_layers"]) == {"_3", "_5"}
