"""Parameters, non-zeros, sparsity, bytes by dtype and MACs of a graph, per layer and in total.

The same ``GraphStats`` comes from a torch.fx ``GraphModule`` (``graph_stats``) and from an
ONNX model (``onnx_stats``), so a report can put "after FX passes" and "after lowering" side by side.

Conventions (every report relies on them):

* **layers** are named by module path for a called module (``layer1.0.conv1``; one row per module
  however often it is called, MACs summed), by node name for a function node (``matmul_1``) and
  for an ONNX node. A stored tensor belongs to the layer that consumes it, following
  constant-only chains (dequantize, transpose, a weight fake-quantizer); ``LayerStats.kind`` is
  the module class, the function name or the ONNX op type.

* **params** are weights: ``nn.Parameter`` tensors of the modules the graph calls and of its
  ``get_attr`` nodes, plus stored tensors that hold weights in another form (an INT8 weight kept
  as a buffer or an ONNX initializer). Each tensor is counted once, however many modules share it
  and however many times a module is called. Not params, but counted in **bytes**: BatchNorm
  running statistics and other floating-point buffers, ``int64``/``bool`` tensors (shapes, indices,
  ``num_batches_tracked``), quantization scales and zero points, single-element constants
  outside a weight slot, and in ONNX the initial states of LSTM/GRU/RNN (an all-zero tensor that
  only feeds ``Expand``/``Tile`` is such a fill value). So an INT8 model has the same params as
  its fp32 source and ~4x fewer bytes.
* **nonzero** counts stored values that are not zero (for quantized tensors the raw integers,
  i.e. zero means "quantized to the zero point 0").
* **bytes** is the storage of every tensor the graph holds (params and buffers), by dtype;
  ``bytes_by_dtype`` sums to ``bytes``, in total and per layer (``LayerStats.bytes_by_dtype``).
* **MACs** are multiply-accumulates of the layers with weights or matmuls: Conv/ConvTranspose
  (bias not counted), Linear, matmul/mm/bmm/addmm/baddbmm/einsum, scaled dot-product attention
  (its two matmuls), ``nn.MultiheadAttention`` (four projections and the two attention matmuls),
  RNN/LSTM/GRU and their cells (the gate matmuls only; element-wise gate products are left out,
  an approximation). Normalization, activations, pooling and element-wise ops count 0.
  A leaf module of unknown type that holds weights gets ``macs_known=False`` and its name goes to
  ``GraphStats.macs_unknown``; a module can report its own MACs by defining
  ``fxcompress_macs(self, input_shapes, output_shape) -> int``.
* FX MACs use the shapes ShapeProp recorded for the example inputs (their batch size); a graph
  without ``meta["tensor_meta"]`` is an ``InputError`` (a ``ValueError``) telling to run
  ``fxcompress.verify.propagate_shapes``, rather than a silent 0.
* ONNX: dynamic dimensions (``dim_param`` or unknown) count as 1, so MACs are per sample for a
  dynamic batch; only the top-level graph is counted (not If/Loop bodies).
"""

from ..units import format_bytes, format_count
from .fx_graph import graph_stats, tied_parameters, untied_warnings
from .onnx_model import onnx_stats
from .result import GraphStats, LayerStats, compare

__all__ = ["GraphStats", "LayerStats", "compare", "format_bytes", "format_count", "graph_stats",
           "onnx_stats", "tied_parameters", "untied_warnings"]
