"""Golden-graph testing for pytest: the ``golden`` fixture, ``--update-goldens`` and ``GraphCheck``.

Registered through the ``pytest11`` entry point, so it is active in every pytest run once
fxcompress is installed, including in users' own projects. Heavy imports (torch, onnx) are
deferred to first use so that loading the plugin costs nothing in unrelated test suites.

``golden.check(graph, "name")`` compares the canonical ``.fxg`` text of ``graph`` with
``<rootdir>/<fxcompress_goldens>/name.fxg`` (ini option, default ``tests/goldens``). A mismatch
fails with a unified diff; a missing golden fails showing the text it would write. With
``pytest --update-goldens`` (or ``FXCOMPRESS_ACCEPT=1``) goldens are (re)written and the check passes.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import operator
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import onnx.defs
import pytest
import torch
from torch import nn

from .errors import InputError
from .graph_text import (
    as_fx_graph,
    as_onnx_model,
    diff,
    fx_node_kinds,
    iter_onnx_nodes,
    read_fxg,
    to_text,
    write_fxg,
)
from .pass_base import PassContext
from .registry import parse_pipeline
from .trace import trace
from .verify import check_exact, first_divergent_node, fresh_inputs, lint, propagate_shapes

ACCEPT_ENV = "FXCOMPRESS_ACCEPT"
GOLDENS_INI = "fxcompress_goldens"
DEFAULT_GOLDENS_DIR = "tests/goldens"

_UPDATED_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fxcompress", "fxcompress golden graphs")
    group.addoption("--update-goldens", action="store_true", default=False,
                    help=f"(re)write .fxg golden files instead of comparing (also env {ACCEPT_ENV}=1)")
    parser.addini(GOLDENS_INI, help="directory of .fxg golden files, relative to rootdir",
                  default=DEFAULT_GOLDENS_DIR)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_UPDATED_KEY] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    updated = config.stash.get(_UPDATED_KEY, [])
    if updated:
        terminalreporter.write_sep("-", f"fxcompress: {len(updated)} golden file(s) written")
        for line in sorted(updated):
            terminalreporter.write_line(line)


def update_requested(config: pytest.Config) -> bool:
    """True under ``--update-goldens`` or ``FXCOMPRESS_ACCEPT`` set to 1/true/yes."""
    env = os.environ.get(ACCEPT_ENV, "").strip().lower()
    return bool(config.getoption("update_goldens", default=False)) or env in ("1", "true", "yes", "on")


def goldens_dir(config: pytest.Config) -> Path:
    """The golden directory: the ini option resolved against pytest's rootdir."""
    configured = str(config.getini(GOLDENS_INI) or DEFAULT_GOLDENS_DIR)
    path = Path(configured)
    return path if path.is_absolute() else Path(config.rootpath) / path


@dataclass
class Golden:
    """Compares canonical graph text against ``<directory>/<name>.fxg``; see the module docstring."""

    directory: Path
    update: bool = False
    written: list[str] = field(default_factory=list)

    def path(self, name: str) -> Path:
        rel = Path(name if name.endswith(".fxg") else f"{name}.fxg")
        if rel.is_absolute() or ".." in rel.parts or not rel.name[:-4]:
            raise InputError(f"golden name {name!r} must be a relative name such as 'block_folded' "
                             f"(no '..', not absolute)")
        return self.directory / rel

    def check(self, graph_or_text: Any, name: str) -> str:
        """Fail the test unless the graph's canonical text equals the golden; return the text."""
        text = graph_or_text if isinstance(graph_or_text, str) else to_text(graph_or_text)
        if not text.endswith("\n"):
            text += "\n"
        path = self.path(name)
        if not path.exists():
            if self.update:
                write_fxg(path, text)
                self.written.append(f"created {path}")
                return text
            pytest.fail(f"golden file {path} does not exist. Run pytest --update-goldens "
                        f"(or {ACCEPT_ENV}=1) to write it. It would contain:\n{text}", pytrace=False)
        expected = read_fxg(path)
        if expected == text:
            return text
        if self.update:
            write_fxg(path, text)
            self.written.append(f"updated {path}")
            return text
        delta = diff(expected, text, a_name=f"golden {path}", b_name="actual")
        pytest.fail(f"graph differs from golden {path} (run pytest --update-goldens to accept):\n{delta}",
                    pytrace=False)


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Iterator[Golden]:
    """Golden-graph checker: ``golden.check(graph_module_or_onnx_or_text, "name")``."""
    config = request.config
    checker = Golden(goldens_dir(config), update_requested(config))
    yield checker
    config.stash.get(_UPDATED_KEY, []).extend(checker.written)


@dataclass(frozen=True)
class _Item:
    """One node as GraphCheck sees it: its name, the names it answers to, and how to show it."""

    name: str
    kinds: tuple[str, ...]
    aliases: tuple[str, ...]
    label: str


_FX_OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")


@functools.lru_cache(maxsize=1)
def _torch_function_names() -> frozenset[str]:
    """Lower-cased short and qualified names of torch functions, Tensor methods and operators."""
    names = set(_FX_OPS)
    for namespace, prefix in ((torch, "torch"), (torch.nn.functional, "torch.nn.functional"),
                              (torch.special, "torch.special"), (torch.linalg, "torch.linalg"),
                              (torch.fft, "torch.fft"), (operator, "operator"), (torch.Tensor, "Tensor")):
        for attr in dir(namespace):
            if namespace is torch.Tensor or not attr.startswith("_"):
                names.update((attr.lower(), f"{prefix}.{attr}".lower()))
    return frozenset(names)


def _module_class_names() -> dict[str, str]:
    """Every ``nn.Module`` subclass defined so far (torch's and the user's): lower-cased short and
    qualified name -> short name."""
    names: dict[str, str] = {}
    stack = [nn.Module]
    while stack:
        cls = stack.pop()
        names[cls.__name__.lower()] = names[f"{cls.__module__}.{cls.__qualname__}".lower()] = cls.__name__
        stack.extend(cls.__subclasses__())
    return names


def _resolves(dotted: str) -> bool:
    """True if ``dotted`` names an importable function or module class (``mypkg.ops.fused_gelu``)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - not a module path at this cut
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False

        return (inspect.isroutine(obj) or isinstance(obj, functools.partial)
                or (isinstance(obj, type) and issubclass(obj, nn.Module)))
    return False


@functools.lru_cache(maxsize=1)
def _onnx_op_names() -> frozenset[str]:
    """Lower-cased ONNX operator types (standard domains, and ONNX Runtime's contrib ops when installed)."""
    schemas = list(onnx.defs.get_all_schemas_with_history())
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

        schemas += list(get_all_operator_schema())
    except Exception:  # noqa: BLE001 - ONNX Runtime absent or without schema access
        pass
    names = set()
    for schema in schemas:
        names.add(schema.name.lower())
        if schema.domain:
            names.add(f"{schema.domain}.{schema.name}".lower())
    return frozenset(names)


def _fx_items(graph: Any) -> list[_Item]:
    items = []
    for node in graph.nodes:
        kinds = fx_node_kinds(node)
        aliases = (node.name, str(node.target)) if node.op in ("call_module", "get_attr") else (node.name,)
        items.append(_Item(node.name, kinds, aliases, f"{node.name} ({kinds[0]})"))
    return items


def _onnx_items(model: Any) -> list[_Item]:
    items = []
    for index, node in enumerate(iter_onnx_nodes(model.graph)):
        name = node.name or f"_n{index}"
        kinds = (node.op_type, f"{node.domain}.{node.op_type}") if node.domain else (node.op_type,)
        items.append(_Item(name, kinds, (name,), f"{name} ({node.op_type})"))
    return items


class GraphCheck:
    """FileCheck-style structural assertions on an FX GraphModule/Graph or an ONNX model.

    A pattern names a node by its kind (module class such as ``"Conv2d"``, function such as
    ``"torch.relu"`` or its short name ``"relu"``, method ``"Tensor.view"``/``"view"``, op kind such
    as ``"placeholder"``, ONNX op type such as ``"Conv"``), by its node name, or, for
    ``call_module``/``get_attr`` nodes, by its module/attribute path. Kinds match ignoring case
    (``"dropout"`` matches ``nn.Dropout`` modules and ``F.dropout`` calls); names and paths match
    exactly. ``count`` matches kinds only, and a kind no node has must be a real name (a module
    class, a torch function or ``Tensor`` method, an ONNX op type): a misspelled one such as
    ``"batchnorm"`` fails, listing the kinds present, instead of passing as "0 found". Every check
    returns ``self`` so checks chain, and raises ``AssertionError`` listing what was found.
    """

    def __init__(self, graph: Any) -> None:
        fx_graph = as_fx_graph(graph)
        self._onnx = fx_graph is None
        if fx_graph is not None:
            self._items = _fx_items(fx_graph)
        else:
            model = as_onnx_model(graph)
            if model is None:
                raise InputError(f"GraphCheck needs a torch.fx GraphModule/Graph, an onnx.ModelProto or an "
                                f"onnx_graphsurgeon Graph, got {type(graph).__name__}")
            self._items = _onnx_items(model)

    @staticmethod
    def _matches(item: _Item, pattern: str, *, kinds_only: bool = False) -> bool:
        return (pattern.lower() in (kind.lower() for kind in item.kinds)
                or (not kinds_only and pattern in item.aliases))

    def is_known_kind(self, pattern: str) -> bool:
        """True if ``pattern`` is a kind some node could have, in this graph or not."""
        low = pattern.lower()
        if any(low == kind.lower() for item in self._items for kind in item.kinds):
            return True
        if self._onnx:
            return low in _onnx_op_names()
        return (low in _torch_function_names() or low in _module_class_names()
                or ("." in pattern and _resolves(pattern)))

    def _unknown_kind(self, pattern: str, check: str) -> str:
        named = [item for item in self._items if pattern in item.aliases]
        if named:
            return (f"  {pattern!r}: is a node name, but count matches kinds, not names (that node is "
                    f"{named[0].label}); use present/absent for names")
        candidates = {kind.lower(): kind for item in self._items for kind in item.kinds}
        if not self._onnx:
            candidates = {**{k: v for k, v in _module_class_names().items() if not v.startswith("_")}, **candidates}
        close = difflib.get_close_matches(pattern.lower(), list(candidates), n=3, cutoff=0.7)
        hint = f" Did you mean {', '.join(dict.fromkeys(repr(candidates[c]) for c in close))}?" if close else ""
        what = "an ONNX op type" if self._onnx else "a module class, a torch function or a Tensor method"
        return (f"  {pattern!r}: no node has this kind and it is not {what}, so {check} could never find "
                f"it (misspelled?).{hint} The kinds present are listed below.")

    def _find(self, pattern: str, *, kinds_only: bool = False) -> list[_Item]:
        return [item for item in self._items if self._matches(item, pattern, kinds_only=kinds_only)]

    def kind_counts(self) -> dict[str, int]:
        """How many nodes there are of each (primary) kind, sorted by kind."""
        return dict(sorted(Counter(item.kinds[0] for item in self._items).items()))

    def _summary(self) -> str:
        counts = ", ".join(f"{kind}: {n}" for kind, n in self.kind_counts().items())
        return f"graph has {len(self._items)} nodes: {counts}"

    @staticmethod
    def _patterns(patterns: Iterable[str] | str) -> list[str]:
        return [patterns] if isinstance(patterns, str) else list(patterns)

    def count(self, expected: Mapping[str, int]) -> "GraphCheck":
        """Assert the exact number of nodes of each kind, e.g. ``{"BatchNorm2d": 0, "Conv2d": 3}``."""
        problems = []
        for pattern, want in expected.items():
            found = self._find(pattern, kinds_only=True)
            if not found and not self.is_known_kind(pattern):
                problems.append(self._unknown_kind(pattern, "count"))
            elif len(found) != want:
                names = ", ".join(item.label for item in found) or "none"
                problems.append(f"  {pattern}: expected {want}, found {len(found)} [{names}]")
        if problems:
            raise AssertionError("GraphCheck.count failed:\n" + "\n".join(problems) + "\n" + self._summary())
        return self

    def absent(self, patterns: Iterable[str] | str) -> "GraphCheck":
        """Assert that no node matches any of ``patterns``. A pattern may be a node name that is
        gone, so one matching nothing passes; use ``count({kind: 0})`` to have a kind checked too."""
        problems = []
        for pattern in self._patterns(patterns):
            found = self._find(pattern)
            if found:
                problems.append(f"  {pattern!r} should be absent but matches "
                                f"{len(found)} node(s): " + ", ".join(item.label for item in found))
        if problems:
            raise AssertionError("GraphCheck.absent failed:\n" + "\n".join(problems) + "\n" + self._summary())
        return self

    def present(self, patterns: Iterable[str] | str) -> "GraphCheck":
        """Assert that every pattern matches at least one node."""
        missing = [pattern for pattern in self._patterns(patterns) if not self._find(pattern)]
        if missing:
            raise AssertionError("GraphCheck.present failed: no node matches "
                                 + ", ".join(repr(p) for p in missing) + "\n" + self._summary())
        return self

    def order(self, patterns: Iterable[str] | str) -> "GraphCheck":
        """Assert that nodes matching ``patterns`` occur in this order (each after the previous match)."""
        start = 0
        matched: list[str] = []
        for pattern in self._patterns(patterns):
            position = next((i for i in range(start, len(self._items))
                             if self._matches(self._items[i], pattern)), None)
            if position is None:
                earlier = [item.label for item in self._items[:start] if self._matches(item, pattern)]
                where = f"; it only occurs before, at {', '.join(earlier)}" if earlier else ""
                sequence = " -> ".join(matched) if matched else "(start)"
                raise AssertionError(
                    f"GraphCheck.order failed: no node matching {pattern!r} after {sequence}{where}\n"
                    f"node order: " + ", ".join(item.label for item in self._items))
            matched.append(self._items[position].label)
            start = position + 1
        return self

    def __repr__(self) -> str:
        return f"GraphCheck({self._summary()})"


# --------------------------------------------------------------------------- running one pass


def run_pass(pass_: Any, model: Any, example_inputs: Any, *, frontend: str = "fx", shapes: bool = True,
             check: bool = True, **context: Any) -> Any:
    """Run one FX pass as the pass manager would, for a pass's own tests; returns its ``PassResult``
    (``result.graph`` is the rewritten GraphModule).

    ``model``: an ``nn.Module`` or a GraphModule; a copy is used, what the caller passed is never
    touched. A module is captured by ``frontend``: ``"fx"`` is ``torch.fx.symbolic_trace`` as it is
    (every submodule keeps its training flag), ``"export"`` / ``"auto"`` go through ``fxcompress.trace``.
    ``pass_``: a ``Pass`` or a pipeline string naming one pass. As the manager does after a pass, the
    result is recompiled (passes leave that to the manager), linted and its shapes propagated again.
    With ``check``, a pass declared ``exact`` must reproduce the graph's outputs by the manager's
    exactness rule, else ``AssertionError`` naming the first divergent node. ``shapes=False`` drops
    the shape metadata first (to test a pass on a graph without it). ``context``: ``PassContext``
    fields (``train_data``, ``calibration``, ``original``, ...)."""
    if isinstance(pass_, str):
        parsed = parse_pipeline(pass_)
        if len(parsed) != 1:
            raise InputError(f"run_pass runs one pass; {pass_!r} names {len(parsed)}")
        pass_ = parsed[0]
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if isinstance(model, torch.fx.GraphModule):
        gm = copy.deepcopy(model)
    elif frontend == "fx":
        gm = propagate_shapes(torch.fx.symbolic_trace(copy.deepcopy(model)), inputs)
    else:
        gm = trace(model, inputs, frontend=frontend)
    if not shapes:
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
    before = copy.deepcopy(gm) if check and pass_.exact else None
    result = pass_.run(gm, PassContext(inputs, **context))
    result.graph.recompile()
    lint(result.graph)
    propagate_shapes(result.graph, inputs)
    if before is not None:
        with torch.no_grad():
            old, new = before(*fresh_inputs(inputs)), result.graph(*fresh_inputs(inputs))
        verdict = check_exact(before, inputs, old, new)
        if not verdict.ok:
            node = first_divergent_node(before, result.graph, inputs, result.replaces)
            raise AssertionError(f"{pass_.name} is declared exact but changed the outputs ({verdict.reason}); "
                                 f"first divergent node: {node}")
    return result
