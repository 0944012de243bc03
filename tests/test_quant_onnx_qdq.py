"""FoldWeightQuantize: FP32 weight -> QuantizeLinear folds into an INT8 initializer, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

import fxcompress as fxc
from fxcompress.backends.onnx_export import export_onnx
from fxcompress.backends.onnxruntime import OrtRunner
from passes import FoldWeightQuantize
from passes.quantize.onnx_qdq import quantize_constant


class _ForeignQDQ(nn.Module):
    """Q/DQ as other tools write it: FP32 weight, per-channel fake-quant at run time."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(64, 32, 3, 3, generator=gen) * 0.1)
        self.register_buffer("w_scale", self.weight.detach().abs().amax(dim=(1, 2, 3)) / 127)
        self.register_buffer("w_zp", torch.zeros(64, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.w_scale, self.w_zp, 0, -128, 127)
        return torch.conv2d(x, w)


def test_folds_weight_quantize_into_int8_initializer_exactly() -> None:
    ex = (torch.randn(1, 32, 6, 6, generator=torch.Generator().manual_seed(1)),)
    gm = torch.fx.symbolic_trace(_ForeignQDQ().eval())
    before = export_onnx(gm, ex)
    assert sum(n.op_type == "QuantizeLinear" for n in before.graph.node) == 2
    result = FoldWeightQuantize().run(gs.import_onnx(before), fxc.PassContext(ex))
    after = gs.export_onnx(result.graph)
    assert result.stats["folded"] == ["weight"]
    assert sum(n.op_type == "QuantizeLinear" for n in after.graph.node) == 1
    int8 = [i for i in after.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8) == 1 and list(int8[0].dims) == [64, 32, 3, 3]
    module = _ForeignQDQ()
    w, scale = module.weight.detach().numpy(), module.w_scale.numpy()
    expected = np.clip(np.round(w / scale[:, None, None, None]), -128, 127).astype(np.int8)
    assert np.array_equal(onnx.numpy_helper.to_array(int8[0]), expected)
    assert after.ByteSize() < 0.4 * before.ByteSize()
    a, b = OrtRunner(before)(*ex), OrtRunner(after)(*ex)
    assert torch.equal(a, b)


def test_quantize_constant_follows_onnx_rounding_and_saturation() -> None:
    x = np.array([[0.5, 1.5, -2.5, 300.0], [0.25, -0.25, 1.0, -1000.0]], dtype=np.float32)
    q = quantize_constant(x, np.array([1.0, 0.5], dtype=np.float32), np.array([0, 1], dtype=np.int8), axis=0)
    assert q.dtype == np.int8
    assert q.tolist() == [[0, 2, -2, 127], [1, 1, 3, -128]]  # 0.5 and -0.5 round to even (0)
    u = quantize_constant(x, np.array(1.0, dtype=np.float32), None, axis=1)
    assert u.dtype == np.uint8 and u.tolist()[0] == [0, 2, 0, 255]
