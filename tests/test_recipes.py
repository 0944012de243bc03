"""Every named recipe compiles every zoo model to ONNX Runtime.

Data is tiny on purpose: a few random batches shaped like the example inputs for calibration, and
the same inputs with pseudo-targets from the original model for training (its argmax for
classifiers, its output for the others), so the training recipes run a handful of steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import Tensor, nn

import fxcompress as fxc
from fxcompress.registry import recipes
from fxcompress.verify import error_metrics
from passes.prune.nm import check_nm
from passes.recipes import RECIPES

EXPECTED = ("int8", "fp16", "prune50-int8", "distill-prune-int8", "sparse24-int8", "int8-accurate")
TRAINING = ("prune50-int8", "distill-prune-int8", "sparse24-int8")
BATCHES = 3
#: lowest cosine of the ORT output vs the original model, for the recipes that do not train
MIN_COSINE = {"int8": 0.99, "fp16": 0.999, "int8-accurate": 0.99}
#: top-1 must agree wherever the original's top-2 logit margin exceeds this fraction of its logit range;
#: closer calls are decided by the CPU's INT8 kernels (with or without VNNI), not by the recipe
TOP1_MARGIN = 0.05
#: the compiled ONNX model's weight bytes as a fraction of the traced FP32 graph's, at most
MAX_BYTES_FRACTION = {"int8": 0.5, "fp16": 0.6, "int8-accurate": 0.5}
#: lowest cosine of the ORT output vs the compiled FX graph it was lowered from, for every recipe
MIN_LOWERING_COSINE = 0.99


def tiny_data(model: nn.Module, inputs: tuple[Tensor, ...], seed: int = 0
              ) -> tuple[list[tuple[Tensor, ...]], list[tuple[Any, ...]]]:
    """``(calibration, train_data)``: ``BATCHES`` random input batches, and the same batches with the
    original model's argmax (2-D logits) or output (anything else) as the target."""
    gen = torch.Generator().manual_seed(seed)
    calibration = [tuple(torch.randn(x.shape, generator=gen) for x in inputs) for _ in range(BATCHES)]
    train = []
    with torch.no_grad():
        for batch in calibration:
            out = model(*batch)
            train.append((*batch, out.argmax(-1) if out.dim() == 2 else out.clone()))
    return calibration, train


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread: these models are tiny, and the machine is shared (no oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pass_names(pipeline: str) -> list[str]:
    return [type(p).name for p in fxc.Pipeline.parse(pipeline).passes]


def unclear_disagreements(expected: Tensor, got: Tensor) -> list[int]:
    """Rows of 2-D logits whose top-1 differs although the expected top-2 margin is clear
    (``TOP1_MARGIN`` of the row's range); empty for other outputs."""
    if expected.ndim != 2 or expected.shape[1] < 2:
        return []
    top2 = expected.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    span = expected.max(1).values - expected.min(1).values
    clear = margin > TOP1_MARGIN * span
    differ = expected.argmax(1) != got.argmax(1)
    return (clear & differ).nonzero().flatten().tolist()


def compile_recipe(recipe: str, model: nn.Module, inputs: tuple[Tensor, ...]) -> fxc.Compiled:
    calibration, train = tiny_data(model, inputs)
    return fxc.compile(model, inputs, RECIPES[recipe], target="onnxruntime", calibration=calibration,
                       train_data=train, progress=False, threads=1)


def int8_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]


# ----------------------------------------------------------------------------- the table itself

def test_the_recipes_are_the_named_ones_and_reach_the_cli() -> None:
    assert tuple(RECIPES) == EXPECTED
    table = recipes()
    for name, text in RECIPES.items():
        assert table[name] == text


@pytest.mark.parametrize("recipe", EXPECTED)
def test_recipe_parses_and_round_trips(recipe: str) -> None:
    pipeline = fxc.Pipeline.parse(RECIPES[recipe])
    assert str(fxc.Pipeline.parse(str(pipeline))) == str(pipeline)
    names = pass_names(RECIPES[recipe])
    assert names[:2] == ["remove-dropout", "remove-identity"]
    if recipe == "int8-accurate":   # the repairs around INT8: float ones before it, bias correction right after
        assert names[2:] == ["fold-batchnorm", "equalize-cross-layer", "smooth-quant", "quantize-int8", "correct-bias"]
        return
    assert names[-2:] == ["fold-batchnorm", "convert-fp16" if recipe == "fp16" else "quantize-int8"]
    trained = [i for i, n in enumerate(names) if n in ("fine-tune", "distill")]
    assert all(i < names.index("fold-batchnorm") for i in trained), "train while the BatchNorms are there"


def test_sparse24_reapplies_the_pattern_after_training() -> None:
    names = pass_names(RECIPES["sparse24-int8"])
    assert names.index("fine-tune") < len(names) - 1 - names[::-1].index("prune-nm") < names.index("quantize-int8")


# ----------------------------------------------------------------------------- every recipe x the zoo

@pytest.mark.slow
@pytest.mark.parametrize("recipe", EXPECTED)
def test_recipe_compiles_the_zoo_to_onnxruntime(recipe: str, zoo_case: Any) -> None:
    name, model, inputs = zoo_case
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*inputs)
    compiled = compile_recipe(recipe, model, inputs)
    got = compiled(*inputs)

    assert compiled.backend == "onnxruntime"
    assert tuple(got.shape) == tuple(expected.shape)
    assert got.dtype == expected.dtype and bool(torch.isfinite(got).all())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the user's model was mutated"
    # lowering keeps what the passes made, trained recipes included: ORT agrees with the compiled FX graph
    with torch.no_grad():
        fx_out = compiled.graph_module(*inputs)
    lowering = error_metrics(fx_out, got)
    assert lowering.cosine > MIN_LOWERING_COSINE, (name, recipe, lowering)

    rows = [r.name.split("{", 1)[0] for r in compiled.report]
    assert rows == ["input", *pass_names(RECIPES[recipe]), "export-onnx"]
    bad = [(r.name, r.status, r.diagnostics) for r in compiled.report if r.status in ("rolled-back", "not-run")]
    assert bad == []

    first, last = compiled.report[0], compiled.report[-1]
    assert last.params <= first.params
    if recipe in MIN_COSINE:
        metrics = error_metrics(expected, got)
        assert metrics.cosine > MIN_COSINE[recipe], (name, metrics)
        assert unclear_disagreements(expected, got) == [], (name, metrics)
        # opaque leaves and ops no pass compresses (the functional LSTM nn.LSTM exports to) keep float weights
        bound = 1.0 if compiled.report.meta.get("opaque_modules") or name == "leaf_mha_lstm" \
            else MAX_BYTES_FRACTION[recipe]
        assert last.bytes < bound * first.bytes, (name, first.bytes, last.bytes)
    if "int8" in recipe:
        ops = {n.op_type for n in compiled.onnx_model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert int8_weights(compiled.onnx_model), "no INT8 weight initializer in the ONNX graph"
    if recipe == "fp16":
        halves = [t for t in compiled.onnx_model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
        assert halves, "no float16 weight in the ONNX graph"


# ----------------------------------------------------------------------------- what each recipe promises

@pytest.mark.slow
def test_prune50_halves_the_channels_of_a_resnet() -> None:
    from fxcompress.digits import DigitsResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsResNet(width=24).eval()  # 24 -> 12, rounded up to 16
    inputs = (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)
    compiled = compile_recipe("prune50-int8", model, inputs)
    traced, pruned = compiled.report[0], compiled.report.find("prune-channels")[0]
    layers = {k: (v["channels_before"], v["channels_after"]) for k, v in pruned.stats["layers"].items()
              if v["kind"] == "Conv2d"}
    assert layers["conv1"] == (24, 16) and layers["layer2.conv1"] == (48, 24), layers  # round-to=8
    assert all(after % 8 == 0 and after < before for before, after in layers.values()), layers
    # fewer channels on both sides of each conv: well under half of the weights and MACs left
    assert pruned.params < 0.45 * traced.params, (traced.params, pruned.params)
    assert pruned.macs < 0.45 * traced.macs, (traced.macs, pruned.macs)


@pytest.mark.slow
def test_sparse24_result_is_still_two_four_sparse() -> None:
    from zoo import ZOO

    model, inputs = ZOO["resnet_basic"]()
    compiled = compile_recipe("sparse24-int8", model, inputs)
    prunes = compiled.report.find("prune-nm")
    tune = compiled.report.find("fine-tune")[0]
    pruned_layers = prunes[0].stats["layers"]
    assert len(pruned_layers) >= 4
    assert tune.nonzero > prunes[0].nonzero, "fine-tuning is expected to move the zeroed weights"
    assert compiled.report[-1].nonzero <= prunes[1].nonzero <= prunes[0].nonzero
    two_four = [w for w in int8_weights(compiled.onnx_model) if check_nm(torch.tensor(w), 2, 4)]
    assert len(two_four) >= len(pruned_layers)


@pytest.mark.slow
def test_int8_recipe_keeps_a_trained_digits_classifier_accurate(digits: Any) -> None:
    from fxcompress.digits import accuracy

    model, data = digits
    x = next(iter(data.test))[0][:2]
    compiled = fxc.compile(model, (x,), RECIPES["int8"], calibration=data.calibration, progress=False)
    before, after = accuracy(model, data.test), accuracy(compiled, data.test)
    assert after >= before - 0.01, (before, after)


@pytest.mark.slow
def test_prune50_recipe_recovers_a_trained_digits_classifier(digits: Any) -> None:
    """Half the channels of the session's (narrow, width 16) digits CNN removed, two epochs of
    fine-tuning, INT8: within 3 points of the original on the test set, at under a fifth of the size."""
    from fxcompress.digits import accuracy

    model, data = digits
    x = next(iter(data.test))[0][:2]
    compiled = fxc.compile(model, (x,), RECIPES["prune50-int8"], calibration=data.calibration,
                           train_data=data.train, progress=False, threads=1)
    before, after = accuracy(model, data.test), accuracy(compiled, data.test)
    print(f"\ndigits prune50-int8: {before:.4f} -> {after:.4f}, "
          f"{compiled.report[0].bytes} -> {compiled.report[-1].bytes} bytes")
    assert after >= before - 0.03, (before, after)
    assert compiled.report[-1].bytes < 0.2 * compiled.report[0].bytes
