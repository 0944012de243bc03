"""GraphModule -> ``onnx.ModelProto`` (opset 17 by default, dynamic batch, Q/DQ, FX provenance).

Exporter choice: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``).
Measured on a machine of this project's kind (AMD EPYC, 2 cores shared with other jobs, torch
2.13.0+cpu): four exports of each model from ``tests/zoo.py`` after ``fxcompress.trace.trace``,
wall time of ``export_onnx`` (including checker and shape inference) vs ``torch.onnx.export(gm,
inputs, dynamo=True, opset_version=17, dynamic_shapes=...)``:

    model              export_onnx (TorchScript)      dynamo=True (torch.export + onnxscript)
    resnet_basic       0.65 s first, 0.41 s median    21.7 s first, 7.8 s median  (emitted opset 18)
    transformer_block  0.26 s first, 0.27 s median     8.2 s first, 9.0 s median
    fake-quant conv    0.04-0.12 s                     fails: aten.fake_quantize_per_tensor_affine_cachemask
                                                       has no fake-tensor kernel under torch.export

(Most of the TorchScript time is running the model once under the tracer; on an idle core a
raw TorchScript export of a small residual block took 0.02 s, the dynamo one 1.8 s.)

Why TorchScript: 20-30x faster (pipelines export once per compile, tests export dozens of
graphs); it writes exactly the opset asked for (17 by default: what TensorRT 8.6+/10 and ONNX
Runtime all parse); and ``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``
with constant scales (floats or buffers) export 1:1 to ``QuantizeLinear``/``DequantizeLinear``
with INT8 zero points (UINT8 for 0..255) and the per-channel ``axis`` attribute, which the
dynamo exporter cannot export at all here. Its deprecation warnings are silenced only around
our call (``warnings.catch_warnings``), never globally.

How it is called:
* The GraphModule is run by an ``fx.Interpreter`` under the TorchScript tracer, and every FX node
  runs inside its own tracer scope named after the node, so the exporter names each ONNX node
  ``/<fx_node>/<module...>/<Op>``; ``metadata_props["fx_node"]`` gets the same value (see
  ``fxcompress.onnx_graph``). ``fx_node_of(onnx_node)`` returns it. The traced root shares the
  GraphModule's parameter dicts, so initializers keep their FX names (``layer1.0.conv1.weight``).
* ``training=PRESERVE`` on an eval-mode graph: the exporter does not fold BatchNorm into Conv on
  its own (that is the ``fold-batchnorm`` FX pass's job, and keeping it 1:1 keeps every ONNX node
  traceable to one FX node); eval-mode BN/Dropout still export as inference ops.
* ``nn.MultiheadAttention``'s fused inference fast path has no ONNX symbolic: it is switched off
  (``torch.backends.mha``) for the duration of the export only.
* Into memory (``BytesIO``, parsed in place): one self-contained model; a graph whose weights reach
  ``onnx_graph.EXTERNAL_DATA_THRESHOLD`` (protobuf's 2 GiB) is exported to a temporary file with
  external data and read back. ``onnx.checker`` and ``onnx.shape_inference`` then run on a copy
  without the weights' values (``onnx_graph.without_weights``).
* Exact clean-ups only: outputs renamed ``output``, ``output_1``... (an Identity where one value
  is returned twice); initializers no node reads are dropped; constants the exporter folded
  (``onnx::MatMul_50``) are renamed ``<fx_node>.<Op>.<input>`` (``q.MatMul.B``). Constant
  nodes and the like are left to the ONNX passes (``onnx-fold-constants``, ``onnx-cleanup``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import torch
from torch import fx, nn

from .. import onnx_graph
from ..copying import copy_graph_module
from ..errors import ExportError
from ..onnx_graph import FX_NODE_KEY, check_model, fx_node_of, fx_node_outputs, infer_shapes_into, stamp_fx_nodes
from ..verify import fresh_inputs

__all__ = ["check_outputs", "export_onnx", "fx_node_of", "fx_node_outputs", "FX_NODE_KEY", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
MAX_OPSET = 20  # highest opset the TorchScript exporter writes


DynamicAxes = Union[str, None, Mapping[str, Union[Mapping[int, str], Sequence[int]]]]

_SCOPE_KIND = "fx"


class _ScopedInterpreter(fx.Interpreter):
    """Runs each FX node inside a tracer scope named after it; remembers the node that raised."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        state = torch._C._get_tracing_state()
        push = state is not None and n.op not in ("placeholder", "output")
        if push:
            state.push_scope(torch._C._jit_onnx_create_full_scope_name(_SCOPE_KIND, n.name))
        try:
            return super().run_node(n)
        except Exception:
            if self.failed is None:
                self.failed = n
            raise
        finally:
            if push:
                state.pop_scope()


class _ExportRoot(nn.Module):
    """What the exporter traces: shares ``gm``'s modules, parameters and buffers (same names,
    same tensors, so they become named initializers) and runs its graph node by node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self._modules = gm._modules
        self._parameters = gm._parameters
        self._buffers = gm._buffers
        self._non_persistent_buffers_set = gm._non_persistent_buffers_set
        object.__setattr__(self, "gm", gm)
        object.__setattr__(self, "interpreter", None)

    def forward(self, *args: Any) -> Any:
        interp = _ScopedInterpreter(self.gm)
        object.__setattr__(self, "interpreter", interp)
        return interp.run(*args)


def export_onnx(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: DynamicAxes = "batch",
    opset: int = 17,
) -> onnx.ModelProto:
    """Export ``gm`` to an in-memory ONNX model, checked and shape-inferred.

    ``input_names`` default to the FX placeholder names; ``output_names`` to ``output`` (one
    output) or ``output``, ``output_1``, ... ``dynamic_axes``: ``"batch"`` (default) makes axis 0
    of every input, and of every output whose axis 0 follows it, a dimension named ``batch``;
    ``None`` exports static shapes; a dict ``{name: {axis: dim_name}}`` (or ``{name: [axes]}``)
    is used as given. Every ONNX node records the FX node it came from (``fx_node_of``).
    ``gm`` is not modified (a training-mode graph is exported from an eval-mode copy).
    Raises ``ExportError`` naming the FX node and its source module when an op cannot be exported.
    """
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"export_onnx needs a torch.fx.GraphModule, got {type(gm).__name__}; "
                          f"trace the model first (fxcompress.trace.trace)")
    if not (MIN_OPSET <= opset <= MAX_OPSET):
        raise ExportError(f"opset {opset} is not supported: the TorchScript exporter writes opsets "
                          f"{MIN_OPSET}..{MAX_OPSET} here (17 is the default)")
    args = _check_inputs(gm, example_inputs)
    check_outputs(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    in_names = list(input_names) if input_names is not None else [n.name for n in placeholders[:len(args)]]
    if len(in_names) != len(args) or len(set(in_names)) != len(in_names):
        raise ExportError(f"input_names {in_names} must be {len(args)} distinct names, one per input "
                          f"(FX placeholders: {[n.name for n in placeholders]})")
    in_axes, out_axes_spec = _split_dynamic_axes(dynamic_axes, in_names, args)

    param_bytes = sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()])
    if any(m.training for m in gm.modules()):
        gm = copy_graph_module(gm, share_parameters=True).eval()
    root = _ExportRoot(gm)
    with tempfile.TemporaryDirectory(prefix="fxcompress-export-") as tmp:
        # over protobuf's limit the exporter must write a file (with external data) to read back
        large = param_bytes >= onnx_graph.EXTERNAL_DATA_THRESHOLD
        target: Any = os.path.join(tmp, "model.onnx") if large else io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.no_grad(), _no_mha_fastpath():
                warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
                warnings.filterwarnings("ignore", message=r".*constant folding be turned off.*")
                # torch's own size checks inside nn modules; a TracerWarning from user code still shows
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch(\.|$)")
                # LSTM h0/c0 follow the input's batch size in the trace (the zoo test runs other batches)
                warnings.filterwarnings("ignore", message=r".*batch_size other than 1, with a variable length.*")
                torch.onnx.export(
                    root, args, target, dynamo=False, opset_version=opset,
                    input_names=in_names, dynamic_axes=in_axes or None,
                    training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                    export_params=True, keep_initializers_as_inputs=False,
                )
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - every exporter failure becomes an ExportError
            raise _export_error(gm, root, args, exc) from exc
        model = _read_back(target)
    _name_outputs(model, output_names, out_axes_spec)
    _drop_unused_initializers(model)
    _share_tied_initializers(model, gm)
    _name_folded_initializers(model, opset)
    stamp_fx_nodes(model)
    try:
        check_model(model)
        infer_shapes_into(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the exported ONNX model failed onnx.checker / shape inference: {exc}") from exc
    return model


def _read_back(target: Any) -> onnx.ModelProto:
    """The exported model from its file (external data loaded) or buffer (parsed in place, no copy)."""
    if isinstance(target, str):
        return onnx.load(target)
    model = onnx.ModelProto()
    with target.getbuffer() as view:
        model.ParseFromString(view)
    target.close()
    return model


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """Eval-mode ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` under ``no_grad`` take a
    fused fast path (``aten::_native_multi_head_attention``) that has no ONNX symbolic; the
    regular path exports to MatMul/Softmax. Off for the duration of the export only."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


# ----------------------------------------------------------------------------- inputs and axes


def check_outputs(gm: fx.GraphModule, *, warn_dict: bool = True) -> None:
    """ONNX outputs are tensors: refuse a forward returning None or a Python number (the exporter
    or ONNX Runtime would fail with an internal error; ``Python number`` needs shapes propagated),
    and warn (``warn_dict``) that a dict comes back from ONNX Runtime as a tuple of its values."""
    output = next((n for n in reversed(gm.graph.nodes) if n.op == "output"), None)
    value = output.args[0] if output is not None and output.args else None
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    if value is None or not leaves:
        raise ExportError("the model's forward returns None (or nothing but empty containers); an ONNX model "
                          "needs at least one tensor output: return the tensor(s) the model computes")
    for leaf in leaves:
        kind = type(leaf) if not isinstance(leaf, fx.Node) else leaf.meta.get("type")
        if kind is not None and issubclass(kind, (int, float, bool, complex)):
            where = f" computed by node '{leaf.name}'" if isinstance(leaf, fx.Node) else f" ({leaf!r})"
            raise ExportError(f"the model's forward returns a Python {kind.__name__}{where}, not a tensor; "
                              "ONNX outputs are tensors: return the tensor itself (not .item()/float()), or "
                              "torch.tensor(value)")
    if warn_dict and isinstance(value, dict):
        names = ", ".join(repr(k) for k in value)
        warnings.warn(f"the model's forward returns a dict ({names}); ONNX has no dicts, so ONNX Runtime and "
                      "a loaded artifact return a tuple of its tensors in this order (outputs 'output', "
                      "'output_1', ...), while the FX graph returns the dict", stacklevel=3)


def _check_inputs(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args = tuple(example_inputs)
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    placeholders = [n.name for n in nodes]
    if not len(args) <= len(nodes) or not all(n.args for n in nodes[len(args):]):
        raise ExportError(f"the graph takes {len(placeholders)} inputs {placeholders} but "
                          f"{len(args)} example inputs were given; pass one tensor per input without a "
                          f"default (bind constants with trace(..., concrete_args=...))")
    for name, a in zip(placeholders, args):
        if not isinstance(a, torch.Tensor):
            raise ExportError(f"example input {name!r} is a {type(a).__name__}; ONNX inputs must be "
                              f"tensors (bind constants with trace(..., concrete_args=...))")
    return fresh_inputs(args)


def _axes_dict(name: str, spec: Any) -> dict[int, str]:
    if isinstance(spec, Mapping):
        return {int(k): str(v) for k, v in spec.items()}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return {int(k): f"{name}_dim{int(k)}" for k in spec}
    raise ExportError(f"dynamic_axes[{name!r}] must be {{axis: name}} or a list of axes, got {spec!r}")


def _split_dynamic_axes(dynamic_axes: DynamicAxes, in_names: list[str], args: tuple[torch.Tensor, ...]
                        ) -> tuple[dict[str, dict[int, str]], Any]:
    """Input axes for the exporter, and the output spec applied after export."""
    if dynamic_axes is None:
        return {}, None
    if isinstance(dynamic_axes, str):
        if dynamic_axes != "batch":
            raise ExportError(f"dynamic_axes must be 'batch', None or a dict, got {dynamic_axes!r}")
        return {n: {0: "batch"} for n, a in zip(in_names, args) if a.dim() >= 1}, "batch"
    if not isinstance(dynamic_axes, Mapping):
        raise ExportError(f"dynamic_axes must be 'batch', None or a dict, got {type(dynamic_axes).__name__}")
    in_axes: dict[str, dict[int, str]] = {}
    out_axes: dict[str, dict[int, str]] = {}
    for name, spec in dynamic_axes.items():
        axes = _axes_dict(name, spec)
        if name in in_names:
            rank = args[in_names.index(name)].dim()
            bad = [a for a in axes if not 0 <= a < rank]
            if bad:
                raise ExportError(f"dynamic_axes[{name!r}]: axes {bad} out of range for a rank-{rank} input")
            in_axes[name] = axes
        else:
            out_axes[name] = axes
    return in_axes, out_axes


def _name_outputs(model: onnx.ModelProto, output_names: Sequence[str] | None, out_spec: Any) -> None:
    graph = model.graph
    n = len(graph.output)
    if output_names is None:
        names = ["output"] + [f"output_{i}" for i in range(1, n)]
    else:
        names = list(output_names)
        if len(names) != n or len(set(names)) != n:
            raise ExportError(f"output_names {names} must be {n} distinct names: the graph has {n} tensor "
                              f"output(s)")
    taken = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    clash = [x for x in names if x in taken]
    if clash:
        raise ExportError(f"output names {clash} clash with input or parameter names; choose others")
    fixed = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    seen: set[str] = set()
    for index, (out, new) in enumerate(zip(graph.output, names)):
        old = out.name
        if old in seen or old in fixed:  # a value returned twice, or an input/parameter returned as is
            graph.node.append(onnx.helper.make_node("Identity", [old], [new], name=f"Identity_{new}"))
            out.name = new
        else:
            _rename_value(graph, old, new)
        seen.add(old)
        seen.add(new)
    if isinstance(out_spec, Mapping):
        unknown = sorted(set(out_spec) - set(names))
        if unknown:
            raise ExportError(f"dynamic_axes names {unknown} are neither inputs "
                              f"{[i.name for i in graph.input]} nor outputs {names}")
    for out in graph.output:
        dims = out.type.tensor_type.shape.dim
        if out_spec == "batch":
            if len(dims) >= 1 and not dims[0].HasField("dim_value"):
                dims[0].dim_param = "batch"
        elif isinstance(out_spec, Mapping) and out.name in out_spec:
            for axis, dim_name in _axes_dict(out.name, out_spec[out.name]).items():
                if not 0 <= axis < len(dims):
                    raise ExportError(f"dynamic_axes[{out.name!r}]: axis {axis} out of range for a "
                                      f"rank-{len(dims)} output")
                dims[axis].dim_param = dim_name


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
        for i, x in enumerate(node.output):
            if x == old:
                node.output[i] = new
    for vi in list(graph.output) + list(graph.value_info):
        if vi.name == old:
            vi.name = new


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Initializers no node reads (e.g. ``num_batches_tracked``): dropping them is exact."""
    used = {x for node in model.graph.node for x in node.input}
    used |= {attr_input for node in model.graph.node for attr_input in _subgraph_inputs(node)}
    keep = [t for t in model.graph.initializer if t.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _share_tied_initializers(model: onnx.ModelProto, gm: fx.GraphModule) -> None:
    """Tied parameters (one tensor under several names, e.g. an embedding and its output head) as
    one initializer: the exporter writes one copy per use, and a transposed copy for a ``Linear``
    (``MatMul`` by ``W.T``). An identical copy is replaced by the first; a transposed one by a
    ``Transpose`` of it (exact, computed once by ONNX Runtime's constant folding)."""
    from onnx import helper, numpy_helper

    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    tied = [(t.detach().cpu().numpy(), names) for t, names in groups.values() if len(names) > 1]
    if not tied:
        return
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    renames: dict[str, str] = {}
    transposes: list[onnx.NodeProto] = []
    for value, names in tied:
        same = [n for n, a in arrays.items() if a.dtype == value.dtype and a.shape == value.shape and
                np.array_equal(a, value)]
        keep = next((n for n in names if n in same), same[0] if same else None)
        if keep is None:
            continue
        for n in same:
            if n != keep:
                renames[n] = keep
        if value.ndim == 2:
            for n, a in arrays.items():
                if n not in same and a.dtype == value.dtype and a.shape == value.shape[::-1] and \
                        np.array_equal(a, value.T):
                    transposes.append(helper.make_node("Transpose", [keep], [n], name=f"{n}.tied",
                                                       perm=[1, 0]))
    gone = set(renames) | {node.output[0] for node in transposes}
    if not gone:
        return
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    for node in reversed(transposes):
        graph.node.insert(0, node)


def _name_folded_initializers(model: onnx.ModelProto, opset: int) -> None:
    """Give constants the exporter folded (``onnx::MatMul_50``: a transposed Linear weight, an INT8
    zero point) a name saying where they are used: ``<fx_node>.<Op>.<schema input>``, e.g.
    ``q.MatMul.B`` or ``fake_quantize_per_channel_affine.QuantizeLinear.y_zero_point``."""
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    first_use: dict[str, tuple[onnx.NodeProto, int]] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            first_use.setdefault(name, (node, idx))
    renames: dict[str, str] = {}
    for init in graph.initializer:
        if not init.name.startswith("onnx::") or init.name not in first_use:
            continue
        node, idx = first_use[init.name]
        fx = fx_node_of(node)
        if fx is None:
            continue
        try:
            schema_inputs = onnx.defs.get_schema(node.op_type, opset, node.domain).inputs
            role = schema_inputs[min(idx, len(schema_inputs) - 1)].name
        except Exception:  # noqa: BLE001 - unknown op: fall back to the position
            role = f"in{idx}"
        base = candidate = f"{fx}.{node.op_type}.{role}"
        k = 1
        while candidate in taken:
            candidate, k = f"{base}_{k}", k + 1
        taken.add(candidate)
        renames[init.name] = candidate
    if not renames:
        return
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in graph.value_info:
        vi.name = renames.get(vi.name, vi.name)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


# ----------------------------------------------------------------------------- errors

_KIND_RE = re.compile(r"""(?:operator|kind) '((?:aten|prim|quantized|onnx)::[\w.]+)'""")
_SCOPE_RE = re.compile(_SCOPE_KIND + r"::(\w+)")


def _export_error(gm: fx.GraphModule, root: _ExportRoot, args: tuple[torch.Tensor, ...],
                  exc: Exception) -> ExportError:
    node = root.interpreter.failed if root.interpreter is not None else None
    op = None
    if node is None:
        m = _KIND_RE.search(str(exc))
        if m:
            op = m.group(1)
            node = _locate_op(gm, root, args, op)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if node is None:
        where = "an unknown FX node" + (f" (TorchScript op {op})" if op else "")
        return ExportError(f"ONNX export failed in {where}: {reason}. Rewrite that op with exportable "
                           f"torch ops, or keep it out of the exported graph")
    return ExportError(
        f"cannot export FX node {node.name!r} ({_describe_target(gm, node)}{_source_of(gm, node)}) to "
        f"ONNX: {reason}. Replace this op with ONNX-exportable torch ops (or a module with a custom "
        f"symbolic), or run the compile with target='fx'")


def _locate_op(gm: fx.GraphModule, root: _ExportRoot, args: tuple[torch.Tensor, ...],
               op: str) -> fx.Node | None:
    """Trace again (without converting) and find the FX scope of the first ``op`` node."""
    try:
        with warnings.catch_warnings(), torch.no_grad(), _no_mha_fastpath():
            warnings.simplefilter("ignore")
            graph, _ = torch.jit._get_trace_graph(root, fresh_inputs(args))
    except Exception:  # noqa: BLE001 - locating is best effort; the caller still reports the op
        return None
    by_name = {n.name: n for n in gm.graph.nodes}
    for tnode in graph.nodes():
        if tnode.kind() == op:
            found = _SCOPE_RE.findall(tnode.scopeName())
            if found and found[0] in by_name:
                return by_name[found[0]]
    return None


def _describe_target(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(str(node.target))
            return f"call_module {node.target}: {type(mod).__name__}"
        except AttributeError:
            return f"call_module {node.target}"
    if node.op == "call_function":
        try:
            from torch.fx.node import _get_qualified_name

            return f"call_function {_get_qualified_name(node.target)}"
        except Exception:  # noqa: BLE001 - a description only
            return f"call_function {getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"


def _source_of(gm: fx.GraphModule, node: fx.Node) -> str:
    parts: list[str] = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, kind = list(stack.values())[-1]
        kind_name = getattr(kind, "__name__", str(kind))
        parts.append(f"in module {path!r} ({kind_name})")
    elif node.op != "call_module":
        parts.append(f"in the forward of {type(gm).__name__}")
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in str(trace).strip().splitlines() if ln.strip()]
        files = [ln for ln in lines if ln.startswith("File ")]
        if files:
            parts.append(files[-1])
    return (", " + ", ".join(parts)) if parts else ""
