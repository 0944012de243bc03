"""``CorrectBias``: empirical bias correction of INT8 layers (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", section 4.2, the empirical variant).

Quantization error is not zero-mean per output channel: ``E[W~ x~] != E[W x]`` whenever the rounding
errors of a channel's weights and the inputs' mean do not cancel (small depthwise kernels and
per-tensor weight grids are the usual cases). On calibration data this pass measures, per output
channel of every quantized Conv/Linear, the mean output of the float layer and of the quantized
layer and adds the difference to the quantized layer's bias. Layers are corrected in graph order,
a layer only once every quantized layer it depends on is, so each sees inputs already corrected
upstream.

The float reference is the graph ``quantize-int8`` was given: it leaves the float weights of the
layers it quantized in the pass context (``FLOAT_WEIGHTS_KEY``), and this pass rebuilds the float
graph from the quantized one (activation fake-quant removed, float weights back). So it runs right
after ``quantize-int8`` (PTQ); a pass that changes the graph in between drops that reference and
this pass then says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from fxcompress.errors import PassError, PipelineError
from fxcompress.layer_rows import PassLayerRow
from fxcompress.pass_base import Pass, PassContext, PassResult, copy_graph_module

from .. import _fx_utils as fxu
from ..data import explain_failure, input_specs, iter_inputs
from .calibrate import probed_copy, require_calibration
from .fake_quant import LearnedFakeQuant, dequantize
from .patterns import module_path
from .ptq import FLOAT_WEIGHTS_KEY

__all__ = ["CorrectBias"]

_CONV_FNS = {torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d,
             torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
             F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def _channel_dim(node: Node) -> int | None:
    """Output channel dim of a quantized compute node (conv: 1, linear: last); None otherwise."""
    if node.op != "call_function":
        return None
    if node.target in _CONV_FNS:
        return 1
    if node.target is F.linear:
        return -1
    return None


def _weight_arg(node: Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def _bias_arg(node: Node) -> Any:
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _set_bias(node: Node, value: Node) -> None:
    if len(node.args) > 2:
        args = list(node.args)
        args[2] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "bias": value}


class _Mean:
    """Streaming per-channel mean of a tensor along ``dim``."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().double().movedim(self.dim, -1)
        flat = x.reshape(-1, x.shape[-1])
        s, q = flat.sum(dim=0), (flat * flat).sum(dim=0)
        self.sum = s if self.sum is None else self.sum + s
        self.sq = q if self.sq is None else self.sq + q
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        assert self.sum is not None
        return self.sum / max(self.count, 1)

    def std(self) -> torch.Tensor:
        assert self.sq is not None
        return (self.sq / max(self.count, 1) - self.mean() ** 2).clamp(min=0).sqrt()


def _means(gm: GraphModule, nodes: list[Node], batches: list[tuple[Any, ...]], pass_name: str,
           device: torch.device | None = None) -> dict[str, _Mean]:
    """Per-channel output means of ``nodes`` (of ``gm``) over ``batches``."""
    probe, stats = probed_copy(gm, nodes, lambda node: _Mean(_channel_dim(node) or 1), device)
    specs = input_specs(gm)
    with torch.no_grad():
        for i, inputs in enumerate(batches):
            with explain_failure(inputs, specs, argument="calibration", pass_name=pass_name, index=i):
                probe(*inputs)
    return stats


def float_graph(gm: GraphModule, weights: dict[str, torch.Tensor]) -> GraphModule:
    """The float graph ``quantize-int8`` started from: activation fake-quant removed and each
    quantized layer's weight (a ``dequantize`` node) replaced by its float weight."""
    fgm = copy_graph_module(gm)
    graph = fgm.graph
    for node in list(graph.nodes):
        is_fq = (node.op == "call_function" and node.target is torch.fake_quantize_per_tensor_affine) or (
            node.op == "call_module" and isinstance(fxu.get_module(fgm, node), LearnedFakeQuant))
        if is_fq:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in graph.nodes:
        w = _weight_arg(node) if node.op == "call_function" else None
        if node.name in weights and isinstance(w, Node) and w.op == "call_function" and w.target is dequantize:
            name = fxu.register_tensor(fgm, f"{node.name}_float_weight", weights[node.name])
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            if len(node.args) > 1:
                node.args = (node.args[0], attr, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "weight": attr}
    fxu.eliminate_dead_code(fgm)
    fxu.delete_unused_attributes(fgm)
    fgm.recompile()  # a float reference to run (tests, _means' probe), never the graph the pass returns
    return fgm


def _layer_ancestors(gm: GraphModule, layers: list[Node]) -> dict[Node, set[Node]]:
    """For each layer, the other layers its input depends on."""
    wanted = set(layers)
    deps: dict[Node, set[Node]] = {}
    for node in gm.graph.nodes:
        found: set[Node] = set()
        for src in node.all_input_nodes:
            found |= deps.get(src, set())
            if src in wanted:
                found.add(src)
        deps[node] = found
    return {n: deps[n] for n in layers}


@dataclass(frozen=True)
class CorrectBias(Pass):
    """Empirical bias correction: add each quantized Conv/Linear's per-channel mean output error
    (float minus quantized, on calibration data) to its bias, layer by layer in graph order.

    Runs right after ``quantize-int8`` (PTQ, not QAT). ``calibration_batches`` batches of the
    calibration data are used (0 = all). ``stats["layers"]`` has, per layer, the mean and largest
    |shift| added to the bias and the layer's mean output std for scale; ``stats["skipped"]`` the
    quantized ops it cannot correct (a matmul has no bias).
    """

    name: ClassVar[str] = "correct-bias"
    requires: ClassVar[tuple[str, ...]] = ("calibration-data", "int8")

    calibration_batches: int = 32

    def __post_init__(self) -> None:
        if self.calibration_batches < 0:
            raise PipelineError(f"{self.name}: calibration_batches must be >= 0 (0 = all)")

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        require_calibration(ctx, self.name)
        weights = ctx.cached(FLOAT_WEIGHTS_KEY)
        if not weights:
            raise PassError(f"{self.name} needs the float weights quantize-int8 leaves for it: run it right after "
                            f"quantize-int8 (post-training, not qat=true), with no pass that changes the graph "
                            f"in between", pass_name=self.name)
        result = PassResult(graph=gm, preserved=(FLOAT_WEIGHTS_KEY,))
        layers: list[Node] = []
        skipped: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.name not in weights:
                continue
            w = _weight_arg(node) if node.op == "call_function" else None
            if not (isinstance(w, Node) and w.op == "call_function" and w.target is dequantize):
                skipped[node.name] = "weight is not INT8 (dequantize) any more"
            elif _channel_dim(node) is None:
                skipped[node.name] = "no bias to correct (a matmul)"
            else:
                layers.append(node)
        if not layers:
            result.warn(f"no quantized Conv/Linear to correct: {skipped or 'none found'}")
            result.stats = {"layers": [], "skipped": skipped}
            return result
        # every rank (under torchrun) reads the same batches, so all end with the same biases
        batches = list(iter_inputs(ctx.calibration, gm, argument="calibration", pass_name=self.name,
                                   limit=self.calibration_batches, device=ctx.device))
        fgm = float_graph(gm, weights)
        names = {n.name for n in layers}
        ref = _means(fgm, [n for n in fgm.graph.nodes if n.name in names], batches, self.name, ctx.device)
        ancestors = _layer_ancestors(gm, layers)
        todo = list(layers)
        rows: dict[str, dict[str, Any]] = {}
        rounds = 0
        with ctx.progress(f"{self.name}: layers", total=len(layers)) as bar:
            while todo:
                rounds += 1
                pending = set(todo)
                ready = [n for n in todo if not (ancestors[n] & pending)]
                got = _means(gm, ready, batches, self.name, ctx.device)
                for node in ready:
                    delta = ref[node.name].mean() - got[node.name].mean()
                    self._add_bias(gm, node, delta)
                    std = ref[node.name].std()
                    rows[node.name] = {"layer": node.name, "module": node.meta.get("source_module") or module_path(node),
                                       "channels": int(delta.numel()),
                                       "mean_abs_shift": float(delta.abs().mean()),
                                       "max_abs_shift": float(delta.abs().max()),
                                       "output_std": float(std.mean())}
                    bar.advance(1)
                todo = [n for n in todo if n not in set(ready)]
        table = [rows[n.name] for n in layers]
        for row in table:
            result.info(f"bias corrected by mean |shift| {row['mean_abs_shift']:.3g} (max {row['max_abs_shift']:.3g}; "
                        f"output std {row['output_std']:.3g})", node=row["layer"])
        result.stats = {"layers": table, "skipped": skipped, "rounds": rounds, "batches": len(batches)}
        shift = ("mean_abs_shift", "max_abs_shift", "output_std")
        result.layers = [PassLayerRow(row["layer"], metrics={k: row[k] for k in shift},
                                  key_metric="mean_abs_shift") for row in table]
        return result

    def _add_bias(self, gm: GraphModule, node: Node, delta: torch.Tensor) -> None:
        old = _bias_arg(node)
        if isinstance(old, Node):
            if old.op != "get_attr":
                raise PassError(f"{self.name}: the bias of '{node.name}' is computed, not stored", node=node.name,
                                pass_name=self.name)
            current = fxu.get_attr_value(gm, str(old.target)).detach()
        else:
            current = torch.zeros(delta.numel(), dtype=torch.float32)
        new = (current.double() + delta.to(current.device)).to(current.dtype)
        base = (node.meta.get("source_module") or node.name).replace(".", "_")
        name = fxu.register_tensor(gm, f"{base}_bias", new, parameter=True)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        _set_bias(node, attr)
        if isinstance(old, Node) and not old.users:
            target = str(old.target)
            gm.graph.erase_node(old)
            fxu.delete_unused_attributes(gm, only=[target])
