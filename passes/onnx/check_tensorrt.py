"""CheckTensorRT: what TensorRT's ONNX parser would reject or handle badly, before any GPU is involved.

Static rules (CPU only, no TensorRT needed), each a ``Finding(node, problem, fix, severity, rule)``:

``unsupported-op``   operator outside TensorRT's ONNX operator matrix (``trt_supported_ops.json``:
                     TensorRT 10.15, from onnx-tensorrt's docs/operators.md), or a custom-domain op
``opset``            model opset outside the range that matrix covers
``qdq-type``         Q/DQ of a type TensorRT has no quantized kernels for (UINT8 from onnxruntime's
                     asymmetric activations, a QuantizeLinear without zero point, INT16, ...)
``qdq-zero-point``   non-zero zero point (TensorRT quantizes symmetrically only)
``qdq-constant``     scale / zero point not a build-time constant, or a scale <= 0
``int32-bias-dq``    INT32 DequantizeLinear of a bias (onnxruntime's quantizer emits it)
``weight-axis``      per-channel weight scales on an axis other than the consumer's output channels
                     (Conv 0, ConvTranspose 1, Gemm 0 with transB else 1, MatMul the last axis)
``dtype``            a tensor type TensorRT lacks (INT16, UINT32, STRING, ...; UINT8 away from the
                     network I/O), or an operator fed a type outside its documented types (e.g. INT64
                     into MatMul). TensorRT >= 10 handles INT64 natively (shape tensors, Gather
                     indices, ...), so plain INT64 is not flagged.
``dynamic-shape``    dynamic input dims without an optimization profile: a warning when no shapes are
                     known at all (a build from example inputs derives the profile), an error when the
                     given profiles miss the input or contradict the graph

When ``tensorrt`` or ``tensorrt_rtx`` is importable, the real ONNX parser runs too and each error it
reports becomes a ``parser`` finding on its node; its warnings are kept beside the findings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from fxcompress.backends.tensorrt import TARGETS, derive_profiles, module_available
from fxcompress.errors import BackendUnavailable, FxCompressError, PassError
from fxcompress.onnx_facts import constant_tensors, graph_inputs, input_dims, qdq_type
from fxcompress.pass_base import Diagnostic, OnnxPass, PassContext, PassResult, not_in_pipeline_string

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

Severity = Literal["warning", "error"]
_DATA = Path(__file__).with_name("trt_supported_ops.json")
_TP = onnx.TensorProto
_TYPE_NAMES = {_TP.FLOAT: "FP32", _TP.DOUBLE: "FP32", _TP.FLOAT16: "FP16", _TP.BFLOAT16: "BF16",
               _TP.INT32: "INT32", _TP.INT64: "INT64", _TP.INT8: "INT8", _TP.UINT8: "UINT8", _TP.BOOL: "BOOL",
               _TP.FLOAT8E4M3FN: "FP8", _TP.INT4: "INT4", _TP.FLOAT4E2M1: "FP4"}
_NO_TRT_TYPE = {_TP.INT16, _TP.UINT16, _TP.UINT32, _TP.UINT64, _TP.STRING, _TP.COMPLEX64, _TP.COMPLEX128,
                _TP.UINT4, _TP.FLOAT8E4M3FNUZ, _TP.FLOAT8E5M2, _TP.FLOAT8E5M2FNUZ}
_TRT_QUANT = {"INT8", "FP8", "INT4", "FP4"}
#: inputs whose type the operator matrix constrains (default: input 0)
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    **{op: (0, 1) for op in ("Add", "Sub", "Mul", "Div", "Mod", "MatMul", "Gemm", "Equal", "Greater",
                             "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "PRelu")},
    **{op: (-1,) for op in ("Max", "Min", "Mean", "Sum", "Concat")},
    "Where": (1, 2),
}
_NOT_TYPE_CHECKED = {"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Shape", "Size", "Constant",
                     "ConstantOfShape"}
_INTEGER_OP_FIX = ("export the Q/DQ form instead (QuantizeLinear/DequantizeLinear around float ops): "
                   "QuantizeInt8(scheme='tensorrt'), or onnxruntime "
                   "quantize_static(quant_format=QuantFormat.QDQ)")
_OP_FIXES = {op: _INTEGER_OP_FIX for op in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
                                             "DynamicQuantizeLinear")}
_SYMMETRIC_FIX = ("quantize symmetrically to INT8 with zero point 0: QuantizeInt8(scheme='tensorrt'), or "
                  "onnxruntime quantize_static(activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, "
                  "extra_options={'ActivationSymmetric': True, 'WeightSymmetric': True})")


@dataclass(frozen=True)
class Finding:
    """One problem TensorRT would have with a node (``node`` is None for graph-level findings)."""

    node: str | None
    problem: str
    fix: str
    severity: Severity = "error"
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        where = f"[{self.node}] " if self.node else ""
        return f"{self.severity} {where}{self.problem} Fix: {self.fix}"


@dataclass
class CheckReport:
    """Findings plus what the real parser said (``parser`` is "" when it did not run, with the reason)."""

    findings: list[Finding] = field(default_factory=list)
    parser: str = ""
    parser_skipped: str = ""
    parser_warnings: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


@lru_cache(maxsize=1)
def operator_matrix() -> dict[str, Any]:
    """The packaged TensorRT ONNX operator matrix (version, source, supported types per op)."""
    return json.loads(_DATA.read_text(encoding="utf-8"))


def _name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    """Indexes over one ONNX main graph: constants, types, producers, consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.names = [_name(n, i) for i, n in enumerate(self.nodes)]
        self.constants = constant_tensors(model)
        self.producer: dict[str, int] = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, list[tuple[int, int]]] = {}
        for i, n in enumerate(self.nodes):
            for k, t in enumerate(n.input):
                if t:
                    self.consumers.setdefault(t, []).append((i, k))
        self.io = {v.name for v in (*graph_inputs(model), *model.graph.output)}
        self.types = self._types(model)

    @staticmethod
    def _types(model: onnx.ModelProto) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 - inference is best effort; declared types still count
            inferred = model
        types = {}
        for v in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info):
            if v.type.tensor_type.elem_type:
                types[v.name] = v.type.tensor_type.elem_type
        for name, t in constant_tensors(model).items():
            types[name] = t.data_type
        return types

    def array(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def is_weight(self, tensor: str) -> bool:
        """A constant, or the QuantizeLinear of a constant (weights quantized at build time)."""
        if tensor in self.constants:
            return True
        i = self.producer.get(tensor)
        if i is None:
            return False
        node = self.nodes[i]
        return node.op_type == "QuantizeLinear" and node.input[0] in self.constants

    def weight_rank(self, tensor: str) -> int | None:
        if tensor in self.constants:
            return len(self.constants[tensor].dims)
        i = self.producer.get(tensor)
        if i is not None and self.nodes[i].input and self.nodes[i].input[0] in self.constants:
            return len(self.constants[self.nodes[i].input[0]].dims)
        return None


# --------------------------------------------------------------------------- rules

def _opset_rule(g: _Graph, matrix: Mapping[str, Any]) -> list[Finding]:
    version = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = matrix["opset_min"], matrix["opset_max"]
    if version is None or lo <= version <= hi:
        return []
    return [Finding(
        None,
        f"the model uses ONNX opset {version}; TensorRT {matrix['tensorrt_version']}'s parser covers "
        f"opsets {lo}..{hi}",
        f"re-export with an opset in {lo}..{hi} (fxcompress exports opset 17 by default)",
        "error" if version < lo else "warning", "opset")]


def _op_rules(model: onnx.ModelProto, matrix: Mapping[str, Any]) -> list[Finding]:
    supported, unsupported = matrix["supported"], set(matrix["unsupported"])
    functions = {(f.domain, f.name): f for f in model.functions}
    version = matrix["tensorrt_version"]
    out: list[Finding] = []

    def add(where: str, problem: str, fix: str, severity: Severity = "error") -> None:
        out.append(Finding(where, problem, fix, severity, "unsupported-op"))

    def visit(nodes: Sequence[onnx.NodeProto], prefix: str) -> None:
        for i, node in enumerate(nodes):
            where, op = prefix + _name(node, i), node.op_type
            if (node.domain, op) in functions:
                visit(functions[(node.domain, op)].node, f"{where}/")
            elif node.domain not in ("", "ai.onnx"):
                add(where, f"{node.domain}::{op} is not a standard ONNX operator; TensorRT's parser looks "
                           "for a plugin of that name and fails without one",
                    f"replace it with standard ONNX ops, or register a TensorRT plugin named {op}")
            elif op in unsupported:
                fix = f"rewrite the model without {op}, or register a TensorRT plugin named {op}"
                add(where, f"TensorRT {version}'s ONNX parser does not support {op}", _OP_FIXES.get(op, fix))
            elif op not in supported:
                add(where, f"{op} is not in TensorRT {version}'s ONNX operator matrix",
                    f"check that your TensorRT version parses {op}, or rewrite it", "warning")
            elif op == "MaxPool" and len(node.output) > 1 and node.output[1]:
                add(where, "MaxPool's Indices output is not supported by TensorRT",
                    "drop return_indices (the Indices output) from the pooling layer")
    visit(model.graph.node, "")
    return out


def _expected_weight_axis(g: _Graph, tensor: str, axis: int, rank: int,
                          seen: frozenset[str] = frozenset()) -> list[tuple[int, int, int]]:
    """(consumer node, its output-channel axis, ``axis`` as the consumer sees it) per linear op."""
    out = []
    for i, k in g.consumers.get(tensor, []):
        node = g.nodes[i]
        if node.op_type in ("Transpose", "Identity") and node.output[0] not in seen:
            perm = list(range(rank))
            if node.op_type == "Transpose":
                perm = list(_attr(node, "perm", perm[::-1]))
            out += _expected_weight_axis(g, node.output[0], perm.index(axis), rank, seen | {node.output[0]})
        elif k == 1 and node.op_type == "Conv":
            out.append((i, 0, axis))
        elif k == 1 and node.op_type == "ConvTranspose":
            out.append((i, 1, axis))
        elif k == 1 and node.op_type == "Gemm":
            out.append((i, 0 if _attr(node, "transB", 0) else 1, axis))
        elif k == 1 and node.op_type == "MatMul":
            out.append((i, rank - 1, axis))
    return out


def _qdq_rules(g: _Graph) -> list[Finding]:
    out: list[Finding] = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        where, op = g.names[i], node.op_type

        def add(problem: str, fix: str, rule: str, severity: Severity = "error") -> None:
            out.append(Finding(where, problem, fix, severity, rule))

        kind = qdq_type(node, g.constants)
        scale_name = node.input[1] if len(node.input) > 1 else ""
        zp_name = node.input[2] if len(node.input) > 2 else ""
        for role, name in (("scale", scale_name), ("zero point", zp_name)):
            if name and name not in g.constants:
                add(f"the {role} of {op} ('{name}') is computed in the graph; TensorRT needs Q/DQ scales and "
                    "zero points that are build-time constants",
                    "fold it to an initializer (calibrate first, then export with constant scales)",
                    "qdq-constant")
        scale = g.array(scale_name) if scale_name else None
        if scale is not None and np.any(scale <= 0):
            add(f"{op} has scale(s) <= 0 ({float(scale.min()):g}); TensorRT needs strictly positive scales",
                "clamp scales to a small positive value (e.g. 1e-8)", "qdq-constant")
        if op == "DequantizeLinear" and kind == "INT32":
            add("DequantizeLinear of an INT32 tensor (the quantized-bias form onnxruntime's quantizer "
                "emits); TensorRT's DequantizeLinear takes INT8/FP8/INT4/FP4 only",
                "keep the bias in float (TensorRT fuses it with the conv/gemm): quantize with onnxruntime "
                "quantize_static(..., extra_options={'QuantizeBias': False}) or "
                "QuantizeInt8(scheme='tensorrt')",
                "int32-bias-dq")
        elif kind == "UINT8" and op == "QuantizeLinear" and not zp_name:
            add("QuantizeLinear without a zero point outputs UINT8 in ONNX (0..255); TensorRT imports it as "
                "INT8 (-128..127), so values above 127*scale saturate",
                "give an INT8 zero point of 0 (symmetric INT8)", "qdq-type")
        elif kind not in _TRT_QUANT and kind not in ("UNKNOWN", "INT32"):
            detail = ""
            if kind == "UINT8":
                detail = (" (onnxruntime's asymmetric activations); TensorRT supports UINT8 Q/DQ only on "
                          "DLA: it rejects it or imports it as INT8 with a different range")
            add(f"{op} quantizes to {kind}{detail}; TensorRT's Q/DQ types are INT8, FP8, INT4 and FP4",
                _SYMMETRIC_FIX, "qdq-type")
        zp = g.array(zp_name) if zp_name else None
        if zp is not None and np.any(zp.astype(np.float64) != 0):
            add(f"{op} has a non-zero zero point ({zp.ravel()[:4].tolist()}...); TensorRT supports symmetric "
                "quantization only", _SYMMETRIC_FIX, "qdq-zero-point")
        per_channel = scale is not None and scale.size > 1
        if op == "DequantizeLinear" and per_channel and g.is_weight(node.input[0]):
            rank = g.weight_rank(node.input[0])
            if rank is None:
                continue
            axis = int(_attr(node, "axis", 1))
            axis = axis + rank if axis < 0 else axis
            for c, want, got in _expected_weight_axis(g, node.output[0], axis, rank):
                if want != got:
                    user = g.nodes[c].op_type
                    add(f"per-channel weight scales on axis {axis} reach {user} '{g.names[c]}' on its axis "
                        f"{got}, but its output channels are axis {want}; TensorRT cannot fold such scales "
                        "into an INT8 kernel (the parser accepts it)",
                        f"quantize {user} weights per output channel (axis {want} for this weight)",
                        "weight-axis", "warning")
    return out


def _dtype_rules(g: _Graph, matrix: Mapping[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    qdq_tensors = {t for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   for t in (*n.input, *n.output)}
    for name, t in sorted(g.types.items()):
        where = g.names[g.producer[name]] if name in g.producer else name
        dtype = onnx.TensorProto.DataType.Name(t)
        if t in _NO_TRT_TYPE:
            out.append(Finding(where, f"tensor '{name}' is {dtype}, a type TensorRT does not have",
                               "cast it to INT32, INT64 or FLOAT in the model", "error", "dtype"))
        elif t == _TP.UINT8 and name not in g.io and name not in qdq_tensors:
            out.append(Finding(where, f"tensor '{name}' is UINT8 inside the network; TensorRT takes UINT8 "
                                      "only as a network input or output", "cast it to INT32 or FLOAT",
                               "error", "dtype"))
        elif t == _TP.DOUBLE:
            out.append(Finding(where, f"tensor '{name}' is DOUBLE; TensorRT casts it to FLOAT, clamping to "
                                      "+-FLT_MAX", "export in float32", "warning", "dtype"))
    supported, version = matrix["supported"], matrix["tensorrt_version"]
    for i, node in enumerate(g.nodes):
        spec = supported.get(node.op_type)
        if spec is None or node.op_type in _NOT_TYPE_CHECKED or node.domain not in ("", "ai.onnx"):
            continue
        if all(t in g.constants for t in node.input if t):
            continue  # folded at build time
        picks = _DATA_INPUTS.get(node.op_type, (0,))
        for k in range(len(node.input)) if picks == (-1,) else picks:
            if k >= len(node.input) or node.input[k] not in g.types:
                continue
            t = g.types[node.input[k]]
            tname = _TYPE_NAMES.get(t)
            if tname is None or tname in spec["types"] or t in _NO_TRT_TYPE:
                continue
            fix = "cast it to a type the operator takes"
            if tname in ("INT64", "INT32", "BOOL", "UINT8"):
                fix = "cast it to FLOAT (or INT32 where the op takes it) before this node"
            out.append(Finding(
                g.names[i],
                f"{node.op_type} input {k} ('{node.input[k]}') is {tname}; TensorRT {version} documents "
                f"{node.op_type} for {', '.join(spec['types'])}", fix, "warning", "dtype"))
    return out


def _profile_problems(dims: Sequence[Any], profile: Any) -> list[str]:
    try:
        lo, opt, hi = (tuple(int(x) for x in s) for s in profile)
    except (TypeError, ValueError):
        return [f"{profile!r} is not (min, opt, max) shapes"]
    if not len(lo) == len(opt) == len(hi) == len(dims):
        return [f"profile ranks {len(lo)}/{len(opt)}/{len(hi)} != input rank {len(dims)}"]
    bad = []
    for a, d in enumerate(dims):
        if isinstance(d, int) and not lo[a] == opt[a] == hi[a] == d:
            bad.append(f"dim {a} is fixed to {d} but the profile spans {lo[a]}..{hi[a]}")
        elif not lo[a] <= opt[a] <= hi[a]:
            bad.append(f"dim {a}: min {lo[a]} <= opt {opt[a]} <= max {hi[a]} does not hold")
    return bad


PROFILE_FIX = ("give the input shapes: on the command line --input-shape (e.g. 1x3x224x224); in Python "
               "BuildOptions(profiles={name: (min, opt, max)}) or example inputs (profiles are then derived: "
               "derive_profiles); or export with static shapes")


def _profile_rules(model: onnx.ModelProto, profiles: Mapping[str, Any] | None) -> list[Finding]:
    """``profiles=None`` means no shapes are known: a dynamic input is then a warning, since a build
    from example inputs derives its profile; a given mapping that misses one is an error."""
    out: list[Finding] = []
    for value in graph_inputs(model):
        dims = input_dims(value)
        where = f"input:{value.name}"
        if all(isinstance(d, int) for d in dims):
            continue
        dynamic = ", ".join(f"{a}:{d or '?'}" for a, d in enumerate(dims) if not isinstance(d, int))
        if profiles is None:
            out.append(Finding(
                where, f"input '{value.name}' has dynamic dims ({dynamic}) but no optimization profile was "
                       "given; building an engine needs one (a build from example inputs derives it)",
                PROFILE_FIX, "warning", "dynamic-shape"))
        elif value.name not in profiles:
            out.append(Finding(
                where, f"input '{value.name}' has dynamic dims ({dynamic}) but the given profiles "
                       f"({', '.join(profiles) or 'none'}) have none for it; the engine build fails",
                PROFILE_FIX, "error", "dynamic-shape"))
        elif bad := _profile_problems(dims, profiles[value.name]):
            out.append(Finding(where, f"the optimization profile for '{value.name}' does not fit the graph: "
                                      f"{'; '.join(bad)}",
                               "fix the profile's (min, opt, max) shapes", "error", "dynamic-shape"))
    return out


def _parser_findings(model: onnx.ModelProto, target: str | None, static: Sequence[Finding],
                     report: CheckReport) -> None:
    from fxcompress.backends.tensorrt import parser_report

    candidates = [target] if target else list(TARGETS)
    available = [t for t in candidates if module_available(t)]
    if not available:
        report.parser_skipped = f"no TensorRT module importable (tried {', '.join(candidates)})"
        return
    reasons = []
    for chosen in available:
        try:
            issues, warnings, module = parser_report(model, chosen)
            break
        except BackendUnavailable as exc:
            reasons.append(str(exc))
    else:
        report.parser_skipped = "; ".join(reasons)
        return
    report.parser = module
    report.parser_warnings = list(dict.fromkeys(warnings))
    fixes: dict[str, str] = {}
    for f in static:
        if f.node:
            fixes.setdefault(f.node, f.fix)
    generic = "change this node so TensorRT can import it (see the static findings)"
    for issue in issues:
        node = issue.node or (f"{issue.op_type}#{issue.node_index}" if issue.node_index >= 0 else None)
        report.findings.append(Finding(node, f"{module} ONNX parser: {issue.message} [{issue.code}]",
                                       fixes.get(issue.node or "", generic), "error", "parser"))


def check_tensorrt_report(model: onnx.ModelProto, *, profiles: Mapping[str, Any] | None = None,
                          use_parser: bool = True, target: str | None = None) -> CheckReport:
    """All findings for ``model`` plus what the real parser said (see ``check_tensorrt``)."""
    matrix = operator_matrix()
    g = _Graph(model)
    report = CheckReport()
    report.findings += _opset_rule(g, matrix)
    report.findings += _op_rules(model, matrix)
    report.findings += _qdq_rules(g)
    report.findings += _dtype_rules(g, matrix)
    report.findings += _profile_rules(model, profiles)
    if use_parser:
        _parser_findings(model, target, list(report.findings), report)
    else:
        report.parser_skipped = "use_parser=False"
    return report


def check_tensorrt(model: onnx.ModelProto, *, profiles: Mapping[str, Any] | None = None,
                   use_parser: bool = True, target: str | None = None) -> list[Finding]:
    """Every node TensorRT's ONNX parser would reject or handle badly, with the fix.

    ``profiles`` (input -> (min, opt, max)) covers dynamic inputs; ``target`` picks the module whose
    parser runs ("tensorrt" or "tensorrt-rtx"; default: whichever is importable, tensorrt first).
    """
    return check_tensorrt_report(model, profiles=profiles, use_parser=use_parser, target=target).findings


@dataclass(frozen=True)
class CheckTensorRT(OnnxPass):
    """Report what TensorRT would reject in the ONNX graph; the graph itself is left unchanged.

    Findings go to ``stats["findings"]`` (dicts) and to the diagnostics. With ``strict=True`` an
    error finding stops the pipeline. Profiles come from the ``profiles`` field, else are derived
    from the example inputs as the build would.
    """

    name: ClassVar[str] = "check-tensorrt"
    exact: ClassVar[bool] = True
    inspects: ClassVar[bool] = True

    use_parser: bool = True
    target: Literal["", "tensorrt", "tensorrt-rtx"] = ""  # "": the compile target, or every TensorRT module
    strict: bool = False
    profiles: Any = not_in_pipeline_string(None)

    def run(self, graph: "gs.Graph", ctx: PassContext) -> PassResult:  # type: ignore[override]
        import onnx_graphsurgeon as gs

        model = gs.export_onnx(graph)
        profiles = self.profiles
        if profiles is None and ctx.example_inputs:
            try:
                profiles = derive_profiles(model, [tuple(t.shape) for t in ctx.example_inputs])
            except FxCompressError:
                profiles = None
        target = self.target or (ctx.target if ctx.target in TARGETS else None)
        report = check_tensorrt_report(model, profiles=profiles, use_parser=self.use_parser, target=target)
        result = PassResult(graph=graph, stats={
            "findings": [f.to_dict() for f in report.findings],
            "errors": len(report.errors),
            "warnings": sum(f.severity == "warning" for f in report.findings),
            "parser": report.parser or f"not run: {report.parser_skipped}",
            "parser_warnings": report.parser_warnings,
            "operator_matrix": f"TensorRT {operator_matrix()['tensorrt_version']}",
        })
        if report.findings and ctx.target not in TARGETS and ctx.target not in ("", "fx", "onnx"):
            result.info(f"this graph was compiled for {ctx.target}; for TensorRT recompile with --target "
                        f"tensorrt-rtx or --target tensorrt")
        for f in report.findings:
            result.diagnostics.append(Diagnostic(f.severity, f"{f.problem} Fix: {f.fix}", f.node, f.rule or f.problem))
        for w in report.parser_warnings:
            result.info(f"{report.parser} parser warning: {w}")
        if self.strict and report.errors:
            listing = "\n".join(f"  - {f}" for f in report.errors)
            raise PassError(f"check-tensorrt found {len(report.errors)} error(s) TensorRT would fail on:\n"
                            f"{listing}",
                            pass_name=self.name, node=report.errors[0].node)
        return result

