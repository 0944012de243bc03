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

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pytest

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
            raise ValueError(f"golden name {name!r} must be a relative name such as 'block_folded' "
                             f"(no '..', not absolute)")
        return self.directory / rel

    def check(self, graph_or_text: Any, name: str) -> str:
        """Fail the test unless the graph's canonical text equals the golden; return the text."""
        from .graph_text import diff, read_fxg, to_text, write_fxg

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


def _fx_items(graph: Any) -> list[_Item]:
    from .graph_text import fx_node_kinds

    items = []
    for node in graph.nodes:
        kinds = fx_node_kinds(node)
        aliases = (node.name, str(node.target)) if node.op in ("call_module", "get_attr") else (node.name,)
        items.append(_Item(node.name, kinds, aliases, f"{node.name} ({kinds[0]})"))
    return items


def _onnx_items(model: Any) -> list[_Item]:
    from .graph_text import iter_onnx_nodes

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
    ``call_module``/``get_attr`` nodes, by its module/attribute path. Matching is exact and
    case-sensitive. ``count`` matches kinds only. Every check returns ``self`` so checks chain, and
    raises ``AssertionError`` listing what was found.
    """

    def __init__(self, graph: Any) -> None:
        from .graph_text import as_fx_graph, as_onnx_model

        fx_graph = as_fx_graph(graph)
        if fx_graph is not None:
            self._items = _fx_items(fx_graph)
        else:
            model = as_onnx_model(graph)
            if model is None:
                raise TypeError(f"GraphCheck needs a torch.fx GraphModule/Graph, an onnx.ModelProto or an "
                                f"onnx_graphsurgeon Graph, got {type(graph).__name__}")
            self._items = _onnx_items(model)

    @staticmethod
    def _matches(item: _Item, pattern: str, *, kinds_only: bool = False) -> bool:
        return pattern in item.kinds or (not kinds_only and pattern in item.aliases)

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
            if len(found) != want:
                names = ", ".join(item.label for item in found) or "none"
                problems.append(f"  {pattern}: expected {want}, found {len(found)} [{names}]")
        if problems:
            raise AssertionError("GraphCheck.count failed:\n" + "\n".join(problems) + "\n" + self._summary())
        return self

    def absent(self, patterns: Iterable[str] | str) -> "GraphCheck":
        """Assert that no node matches any of ``patterns``."""
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
