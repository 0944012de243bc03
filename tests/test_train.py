"""Batches (passes.data), the shared training loop, FineTune, and QAT fake-quant + freezing."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxcompress as fxc
from fxcompress.errors import InputError, PassError, PipelineError
from fxcompress.testing import run_pass
from fxcompress.trace import trace
from passes import FineTune, FoldBatchNorm, FreezeQuant, QuantizeInt8
from passes.data import explain_failure, graph_inputs, input_specs, iter_batches, split_batch
from passes.quantize.fake_quant import LearnedFakeQuant, LearnedWeightFakeQuant, dequantize
from passes.train import _lr_factor, supervised_loss, train_loop
from zoo import ZOO


def test_split_batch_forms() -> None:
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert split_batch(x, 1) == ((x,), None)
    inputs, target = split_batch((x, y), 1)
    assert inputs == (x,) and target is y
    inputs, target = split_batch([x, x, y], 2)
    assert inputs == (x, x) and target is y
    inputs, target = split_batch({"a": x, "b": x, "label": y}, 2, ["a", "b"])
    assert inputs == (x, x) and target is y
    inputs, target = split_batch((x, y, y), 1)
    assert target == (y, y)


def test_split_batch_errors_name_what_is_expected() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(InputError, match="takes 2 inputs"):
        split_batch(x, 2, ["a", "b"])
    with pytest.raises(InputError, match="missing \\['b'\\]"):
        split_batch({"a": x}, 2, ["a", "b"])
    with pytest.raises(InputError, match="tensor, a tuple/list"):
        split_batch("nope", 1)


def test_dataloader_of_pairs_works_as_it_is() -> None:
    model, ex = ZOO["resnet_basic"]()
    gm = trace(model, ex)
    loader = DataLoader(TensorDataset(torch.randn(6, 3, 16, 16), torch.arange(6)), batch_size=4)
    got = list(iter_batches(loader, gm, argument="calibration", pass_name="t"))
    assert [b[0][0].shape[0] for b in got] == [4, 2] and got[1][1].tolist() == [4, 5]
    with pytest.raises(PassError, match="calibration="):
        list(iter_batches(None, gm, argument="calibration", pass_name="t"))
    with pytest.raises(PassError, match="no batches"):
        list(iter_batches([], gm, argument="calibration", pass_name="t"))


def test_lr_schedule_shapes() -> None:
    assert _lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert _lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert _lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert _lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert _lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert _lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert _lr_factor(80, 100, 0, "constant") == 1.0


def _regression() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 1.0
    return nn.Linear(4, 1), [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]


def test_train_loop_fits_a_linear_regression_and_is_repeatable() -> None:
    model, data = _regression()
    clone = nn.Linear(4, 1)
    clone.load_state_dict(model.state_dict())
    stats = train_loop(model, data, supervised_loss("mse"), epochs=30, lr=0.1, warmup=5)
    assert stats["steps"] == 240 and stats["epochs"] == 30
    assert stats["last_loss"] < stats["first_loss"] / 100
    assert torch.allclose(model.bias, torch.tensor([1.0]), atol=0.05)
    assert not model.training
    train_loop(clone, data, supervised_loss("mse"), epochs=30, lr=0.1, warmup=5)
    assert torch.equal(clone.weight, model.weight)


def test_train_loop_max_steps_sgd_and_clipping() -> None:
    model, data = _regression()
    stats = train_loop(model, data, supervised_loss("mse"), epochs=5, lr=0.01, optimizer="sgd",
                       schedule="linear", max_steps=3, grad_clip=0.1)
    assert stats["steps"] == 3


def test_train_loop_rejects_bad_options() -> None:
    model, data = _regression()
    with pytest.raises(PipelineError, match="optimizer"):
        train_loop(model, data, supervised_loss(), optimizer="lion")
    with pytest.raises(PassError, match="diverged"):
        train_loop(model, data, lambda out, y, x: out.sum() * float("nan"), epochs=1)


def test_supervised_loss_picks_by_target_dtype() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    ce = supervised_loss()(logits, torch.tensor([0, 1]), ())
    assert float(ce) == pytest.approx(float(nn.functional.cross_entropy(logits, torch.tensor([0, 1]))))
    mse = supervised_loss()(logits, torch.zeros(2, 2), ())
    assert float(mse) == pytest.approx(2.0)
    with pytest.raises(PassError, match="targets"):
        supervised_loss()(logits, None, ())


def _digits_subset() -> tuple[torch.Tensor, torch.Tensor]:
    from fxcompress.digits import load_digits_tensors

    x_tr, y_tr, _, _ = load_digits_tensors()
    return x_tr[:512], y_tr[:512]


def test_fine_tune_pass_trains_the_graph_on_real_digits() -> None:
    x, y = _digits_subset()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    ex = (x[:2],)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    gm = trace(model, ex)
    before = float((gm(x).argmax(1) == y).float().mean())
    result = run_pass(FineTune(epochs=12, lr=1e-2), gm, ex, train_data=loader)
    after = float((result.graph(x).argmax(1) == y).float().mean())
    assert before < 0.3 and after > 0.9
    assert result.stats["last_loss"] < result.stats["first_loss"]
    assert model[1].weight.grad is None  # the user's model was not trained


def test_fine_tune_without_train_data_names_the_argument() -> None:
    model, ex = ZOO["resnet_basic"]()
    with pytest.raises(PassError, match="train_data="):
        FineTune().run(trace(model, ex), fxc.PassContext(ex))
    with pytest.raises(PipelineError, match="schedule"):
        FineTune(schedule="step")


def _qat_graph(name: str = "resnet_basic") -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], dict]:
    """A folded, QAT-prepared graph, its example inputs and the ``run_pass`` context fields."""
    model, ex = ZOO[name]()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(ex[0].shape, generator=gen), torch.tensor([0, 1])) for _ in range(4)]
    ctx = {"calibration": calib, "train_data": calib, "target": "onnxruntime"}
    gm = run_pass(FoldBatchNorm(), trace(model, ex), ex, **ctx).graph
    return run_pass(QuantizeInt8(qat=True), gm, ex, **ctx).graph, ex, ctx


def test_qat_graph_has_learnable_scales_with_gradients() -> None:
    gm, ex, _ = _qat_graph()
    mods = [m for m in gm.modules() if isinstance(m, (LearnedFakeQuant, LearnedWeightFakeQuant))]
    assert sum(isinstance(m, LearnedWeightFakeQuant) for m in mods) == 7
    assert sum(isinstance(m, LearnedFakeQuant) for m in mods) >= 7
    gm.train()
    gm(*ex).pow(2).sum().backward()
    assert all(m.scale.grad is not None and float(m.scale.grad.abs().sum()) > 0 for m in mods)
    assert any(p.grad is not None for n, p in gm.named_parameters() if n.endswith("_weight"))


def test_freeze_turns_qat_into_the_ptq_form_without_changing_outputs() -> None:
    gm, ex, ctx = _qat_graph()
    gm.eval()
    with torch.no_grad():
        before = gm(*ex)
    result = run_pass(FreezeQuant(), gm, ex, **ctx)
    frozen = result.graph
    assert result.stats == {"activations": result.stats["activations"], "weights": 7}
    assert not any(isinstance(m, (LearnedFakeQuant, LearnedWeightFakeQuant)) for m in frozen.modules())
    assert sum(n.target is dequantize for n in frozen.graph.nodes) == 7
    assert all(b.dtype != torch.float32 or b.dim() < 2 for b in frozen.buffers())
    with torch.no_grad():
        after = frozen(*ex)
    assert torch.allclose(before, after, atol=1e-4 * float(before.abs().max()) + 1e-3)
    cos = torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0)
    assert float(cos) > 0.99999


def test_fine_tune_trains_and_freezes_qat() -> None:
    gm, ex, ctx = _qat_graph()
    fq_nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                and isinstance(gm.get_submodule(str(n.target)), LearnedFakeQuant)]
    scales_before = [float(gm.get_submodule(str(n.target)).scale.detach()) for n in fq_nodes]
    result = run_pass(FineTune(epochs=1, lr=1e-2), gm, ex, **ctx)
    assert result.stats["frozen"]["weights"] == 7
    assert not any(isinstance(m, LearnedFakeQuant) for m in result.graph.modules())
    frozen_scales = [n.args[1] for n in result.graph.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine]
    assert len(frozen_scales) == len(scales_before)
    assert sorted(frozen_scales) != sorted(scales_before)  # the scales were learned
    assert math.isfinite(result.stats["last_loss"])


def test_qat_for_tensorrt_exports_symmetric_int8_like_ptq() -> None:
    from fxcompress.backends.onnx_export import export_onnx
    import onnx

    model, ex = ZOO["inverted_residual"]()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(ex[0].shape, generator=gen), torch.tensor([3, 7])) for _ in range(3)]
    ctx = {"calibration": data, "train_data": data, "target": "tensorrt"}
    gm = run_pass(FoldBatchNorm(), trace(model, ex), ex, **ctx).graph
    gm = run_pass(QuantizeInt8(qat=True), gm, ex, **ctx).graph
    gm = run_pass(FineTune(epochs=1, lr=1e-3), gm, ex, **ctx).graph
    fqs = [n for n in gm.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine]
    assert fqs and all(n.args[2] == 0 and n.args[3:] == (-128, 127) for n in fqs)
    proto = export_onnx(gm, ex)
    int8 = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8) == sum(n.target is dequantize for n in gm.graph.nodes) == 11  # 10 convs + classifier


def _inplace_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))


def test_writes_inputs_sees_inplace_modules_and_ops() -> None:
    from passes._fx_utils import writes_inputs

    ex = (torch.randn(2, 8),)
    assert writes_inputs(trace(_inplace_model(), ex))
    assert not writes_inputs(trace(nn.Sequential(nn.ReLU(), nn.Linear(8, 3)), ex))

    class AddInPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.add_(1)

    assert writes_inputs(trace(AddInPlace(), ex))
    assert writes_inputs(nn.Linear(8, 3))  # not a graph: unknown, so copies are made


@pytest.mark.parametrize("passes", ["quantize-int8", "quantize-int8{qat=true},fine-tune", "fine-tune",
                                    "quant-sensitivity{k=1},quantize-int8", "prune-channels{importance=taylor}"])
def test_calibration_and_train_data_are_not_mutated_by_an_inplace_model(passes: str) -> None:
    """``ReLU(inplace=True)`` as the first layer writes into whatever tensor the graph is given."""
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 8, generator=gen) - 0.5 for _ in range(3)]
    train_data = [(torch.randn(4, 8, generator=gen) - 0.5, torch.randint(0, 3, (4,), generator=gen))
                  for _ in range(3)]
    loader = DataLoader(TensorDataset(torch.randn(8, 8, generator=gen) - 0.5, torch.arange(8) % 3), batch_size=4)
    dataset_before = loader.dataset.tensors[0].clone()
    calib_before = [t.clone() for t in calibration]
    train_before = [(x.clone(), y.clone()) for x, y in train_data]
    fxc.compile(_inplace_model(), example_inputs=(torch.randn(2, 8),), calibration=calibration,
                train_data=train_data if "qat" not in passes else loader, passes=passes, target="onnxruntime")
    assert all(torch.equal(a, b) for a, b in zip(calibration, calib_before))
    assert all(torch.equal(x, bx) and torch.equal(y, by) for (x, y), (bx, by) in zip(train_data, train_before))
    assert torch.equal(loader.dataset.tensors[0], dataset_before)


def test_train_loop_gives_the_loss_the_batch_as_the_user_gave_it() -> None:
    x, y = torch.randn(4, 8) - 0.5, torch.tensor([0, 1, 2, 0])
    seen: list[torch.Tensor] = []

    def loss(out: torch.Tensor, target: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        seen.append(inputs[0].clone())
        return nn.functional.cross_entropy(out, target)

    gm = trace(_inplace_model(), (x,))
    train_loop(gm, [(x, y)], loss, epochs=2)
    assert len(seen) == 2 and all(torch.equal(s, x) for s in seen) and bool((x < 0).any())


def _ort_ops(model: "onnx.ModelProto", path: Path) -> collections.Counter:
    from fxcompress.backends.onnxruntime import OrtRunner

    OrtRunner(model, threads=1, optimized_model_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def test_unfrozen_qat_exports_qdq_and_runs_integer_kernels(tmp_path: Path) -> None:
    """QAT with no training pass after it: the learnable fake-quant still lowers to Q/DQ."""
    model, ex = ZOO["resnet_basic"]()
    gen = torch.Generator().manual_seed(0)
    calib = [tuple(torch.randn(e.shape, generator=gen) for e in ex) for _ in range(4)]
    c = fxc.compile(model, example_inputs=ex, calibration=calib, passes="fold-batchnorm,quantize-int8{qat=true}",
                    target="onnxruntime")
    assert any(isinstance(m, LearnedFakeQuant) for m in c.graph_module.modules())
    ops = collections.Counter(n.op_type for n in c.onnx_model.graph.node)
    assert ops["QuantizeLinear"] == 7 + 12 and ops["DequantizeLinear"] == 7 + 12  # 7 weights, 12 activations
    assert not ops["Round"] and not ops["Div"]
    optimized = _ort_ops(c.onnx_model, tmp_path / "opt.onnx")
    assert optimized["QLinearConv"] == 6 and optimized["QGemm"] == 1 and not optimized["Conv"]
    with torch.no_grad():
        ref = c.graph_module(*ex)
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), torch.as_tensor(c(*ex)).flatten(), dim=0)
    assert float(cos) > 0.999


@pytest.mark.parametrize("scheme", ["onnxruntime", "tensorrt"])
def test_unfrozen_qat_weight_export_matches_fx_even_past_the_weight_range(scheme: str) -> None:
    """Shrunk learned weight scales push round(w / s) past qmax (64 with reduce_range, 127):
    ONNX must clamp there too, not at QuantizeLinear's own -128..127."""
    from fxcompress.backends.onnx_export import export_onnx
    from fxcompress.backends.onnxruntime import OrtRunner

    torch.manual_seed(0)
    model, ex = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), (torch.randn(3, 16),)
    gm = run_pass(QuantizeInt8(qat=True, scheme=scheme), trace(model, ex), ex, calibration=[ex],
                  target="onnxruntime").graph
    wfq = [m for m in gm.modules() if isinstance(m, LearnedWeightFakeQuant)]
    with torch.no_grad():
        for m in wfq:
            m.scale.mul_(0.4)
    gm.eval()
    proto = export_onnx(gm, ex)
    assert sum(n.op_type == "Clip" for n in proto.graph.node) == len(wfq) == 2
    with torch.no_grad():
        ref = gm(*ex)
    got = OrtRunner(proto, threads=1)(*ex)
    assert torch.allclose(ref, got, atol=1e-4 * float(ref.abs().max()))


def test_frozen_scales_stay_put_while_fine_tune_trains_the_weights() -> None:
    """``learn_scales=False``: the fake-quant scales are not parameters to learn, only weights train."""
    model, ex = ZOO["resnet_basic"]()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(ex[0].shape, generator=gen), torch.tensor([0, 1])) for _ in range(4)]
    ctx = {"calibration": data, "train_data": data, "target": "onnxruntime"}
    gm = run_pass(FoldBatchNorm(), trace(model, ex), ex, **ctx).graph
    gm = run_pass(QuantizeInt8(qat=True, learn_scales=False), gm, ex, **ctx).graph
    fqs = {name: m for name, m in gm.named_modules() if isinstance(m, (LearnedFakeQuant, LearnedWeightFakeQuant))}
    assert fqs and all(not m.scale.requires_grad for m in fqs.values())
    scales = {name: m.scale.detach().clone() for name, m in fqs.items()}
    weights = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm = run_pass(FineTune(epochs=1, lr=1e-2, freeze_quant=False), gm, ex, **ctx).graph
    assert all(torch.equal(gm.get_submodule(name).scale, s) for name, s in scales.items())
    assert any(not torch.equal(p, weights[n]) for n, p in gm.named_parameters() if n in weights)
    frozen = run_pass(FreezeQuant(), gm, ex, **ctx).graph
    act_scales = {n.args[1] for n in frozen.graph.nodes if n.target is torch.fake_quantize_per_tensor_affine}
    assert act_scales == {float(s) for name, s in scales.items() if isinstance(fqs[name], LearnedFakeQuant)}


def _flatten_net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    return model, (torch.randn(2, 3, 8, 8),)


def test_batches_of_another_rank_or_dtype_kind_are_named_up_front() -> None:
    """Batch 1 of 3 has rank 3: the error names train_data=, the input, the batch index and both
    shapes before the model ever runs; another batch size or float64 data pass the check."""
    model, ex = _flatten_net()
    gm = trace(model, ex)
    (name,) = graph_inputs(gm)
    good = [torch.randn(5, 3, 8, 8), torch.randn(1, 3, 8, 8, dtype=torch.float64)]
    assert [b[0].shape[0] for b, _ in iter_batches(good, gm, argument="train_data", pass_name="p")] == [5, 1]
    bad = [good[0], torch.randn(4, 3, 8), good[1]]
    with pytest.raises(PassError) as err:
        list(iter_batches(bad, gm, argument="train_data", pass_name="finetune"))
    msg = str(err.value)
    assert f"train_data= batch 1, input '{name}'" in msg
    assert "(3, 8, 8)" in msg and "(4, 3, 8)" in msg and "rank 3" in msg
    with pytest.raises(PassError, match=r"calibration= batch 0.*integer data, the model takes float data"):
        list(iter_batches([torch.ones(2, 3, 8, 8, dtype=torch.long)], gm, argument="calibration", pass_name="p"))


def test_other_non_batch_dims_are_left_to_the_model() -> None:
    """A model with a dynamic dim (global pooling) takes other spatial sizes: they are not rejected."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    gm = trace(model, (torch.randn(1, 3, 8, 8),))
    (inputs,) = [i for i, _ in iter_batches([torch.randn(2, 3, 12, 10)], gm, argument="calibration", pass_name="p")]
    assert gm(*inputs).shape == (2, 4)


def test_explain_failure_names_expected_and_actual_shape() -> None:
    model, ex = _flatten_net()
    gm = trace(model, ex)
    specs = input_specs(gm)
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(PassError) as err:
        with explain_failure((x,), specs, argument="calibration", pass_name="quantize-int8", index=3):
            gm(x)
    msg = str(err.value)
    assert "calibration= batch 3" in msg and "(2, 3, 9, 9)" in msg and "(3, 8, 8)" in msg
    assert isinstance(err.value.__cause__, RuntimeError)
    # inputs shaped as traced: the model's own error goes through unchanged
    with pytest.raises(ZeroDivisionError):
        with explain_failure(ex, specs, argument="calibration", pass_name="p", index=0):
            raise ZeroDivisionError


def test_compile_names_wrongly_shaped_train_data() -> None:
    model, ex = _flatten_net()
    data = [(torch.randn(4, 3, 8), torch.tensor([0, 1, 2, 3]))]
    with pytest.raises(PassError, match=r"train_data= batch 0, input .*\(3, 8, 8\).*\(4, 3, 8\)"):
        fxc.compile(model, ex, "prune-channels{importance=taylor,ratio=0.25}", train_data=data, target="fx",
                    progress=False)


@pytest.mark.parametrize("passes, argument", [
    ("quantize-int8", "calibration"),
    ("quant-sensitivity{eval-batches=1},quantize-int8", "calibration"),
    ("fine-tune{max-steps=2}", "train_data"),
    ("distill{max-batches=2}", "train_data"),
    ("prune-channels{importance=taylor,ratio=0.25}", "train_data"),
])
def test_every_data_pass_names_a_batch_whose_spatial_size_breaks_the_model(passes: str, argument: str) -> None:
    """Same rank, another spatial size: the Linear after Flatten cannot take it. Whichever pass runs
    the model on the data, the error names the argument, the input and both shapes, with the
    model's own error as ``__cause__``."""
    model, ex = _flatten_net()
    batch = (torch.randn(4, 3, 10, 10), torch.tensor([0, 1, 2, 3]))
    data = {argument: [batch]}
    with pytest.raises(PassError, match=rf"{argument}= batch 0, input .*the model failed on a tensor of shape "
                                        rf"\(4, 3, 10, 10\).*traced with samples of shape \(3, 8, 8\)") as info:
        fxc.compile(model, ex, passes, target="fx", progress=False, **data)
    cause = info.value.__cause__
    while cause is not None and not isinstance(cause, RuntimeError):
        cause = cause.__cause__
    assert isinstance(cause, RuntimeError) and "shapes cannot be multiplied" in str(cause)
