"""Project rules that are easy to break silently."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

import fxcompress
from fxcompress.options import option_types, string_fields
from fxcompress.registry import catalogue_markdown, installed

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import statements under ``if TYPE_CHECKING:`` (never executed)."""
    return {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block) if isinstance(n, (ast.Import, ast.ImportFrom))}


def _framework_imports() -> nx.DiGraph:
    """Every import a module of ``fxcompress/`` executes (at module level or inside a function), as
    edges between module names; ``from pkg import name`` points at ``pkg.name`` when that is a module."""
    files = {_module_name(p): p for p in (ROOT / "fxcompress").rglob("*.py")}
    graph = nx.DiGraph()
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        skip = _type_checking_only(tree)
        graph.add_node(module)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in ("fxcompress", "passes"):
                    graph.add_edge(module, target)
    return graph


def test_the_framework_never_imports_the_pass_library() -> None:
    graph = _framework_imports()
    assert len(graph) > 30
    bad = sorted((a, b) for a, b in graph.edges if b == "passes" or b.startswith("passes."))
    assert bad == []


def test_the_framework_has_no_import_cycle() -> None:
    """Layered modules: counting imports inside functions too, no module of ``fxcompress/`` reaches
    itself again (``pass_base`` -> ``registry`` -> ``pipeline`` -> ``registry`` was one such cycle)."""
    graph = _framework_imports()
    assert ("fxcompress.pipeline", "fxcompress.registry") in graph.edges
    assert list(nx.simple_cycles(graph.subgraph(n for n in graph if n != "fxcompress"))) == []


def test_the_framework_never_names_a_library_pass() -> None:
    """Code in ``fxcompress/`` decides by what passes declare (traits, ``requires``), never by a pass's
    name: no string in it, other than docs and prose, is the name of a pass the library registers."""
    library = {name for name, cls in installed().items() if not cls.__module__.startswith("fxcompress.")}
    assert {"fold-batchnorm", "fine-tune", "check-tensorrt"} <= library
    named = []
    for path in sorted((ROOT / "fxcompress").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in library:
                named.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert named == []


def test_every_installed_pass_has_checkable_options() -> None:
    """Option checks read the field annotations; one that cannot be resolved (a name imported only
    under TYPE_CHECKING, a typo) would silently switch them off for that pass."""
    unresolved = [name for name, cls in installed().items()
                  if string_fields(cls) and not option_types(cls)]
    assert unresolved == []


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```bash\n(python3 -m venv .*)\n```", text)


def test_ci_runs_the_readme_test_command() -> None:
    demo, tests = _readme_commands()
    assert demo.endswith("fxcompress demo") and tests.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install_and_test = tests.split("pip install torch==2.13.0 && ", 1)[1]
    assert install_and_test.replace("pip install", "python -m pip install -q") in ci
    assert "pip install -q torch==2.13.0" in ci


def test_readme_pass_catalogue_is_generated_from_the_registry() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- catalogue:start -->\n", "<!-- catalogue:end -->"
    assert start in text, "README lacks the generated pass catalogue"
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block == catalogue_markdown(), "regenerate it with `fxcompress passes --markdown`"


def test_version_is_the_distribution_version() -> None:
    import importlib.metadata

    assert fxcompress.__version__ == importlib.metadata.version("fxcompress")


#: the ``recompile()`` calls passes may make, as ``file:function``: each on a graph the pass itself
#: runs before it returns (a probe or cut copy, a float reference, a nested pass's trial graph). The
#: graph a pass returns is recompiled by the pass manager (and by ``fxcompress.testing.run_pass``).
RECOMPILE_ALLOWED = {
    "quantize/adaround.py:node_values",
    "quantize/auto.py:drop",
    "quantize/bias_correction.py:float_graph",
    "quantize/calibrate.py:probed_copy",
    "quantize/sensitivity.py:_measure",
}


def _recompile_calls(path: Path) -> list[str]:
    """``file:function`` of every ``<x>.recompile()`` call in ``path`` (file relative to passes/)."""
    import ast

    where = path.relative_to(ROOT / "passes").as_posix()
    calls: list[str] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and child.func.attr == "recompile"):
                calls.append(f"{where}:{function}")
            visit(child, function)

    visit(ast.parse(path.read_text(encoding="utf-8")), "<module>")
    return calls


def test_passes_leave_recompile_to_the_pass_manager() -> None:
    calls = [c for p in sorted((ROOT / "passes").rglob("*.py")) for c in _recompile_calls(p)]
    unexpected = sorted(set(calls) - RECOMPILE_ALLOWED)
    assert not unexpected, (f"{unexpected} call recompile(): the pass manager recompiles the graph a pass returns; "
                            f"a pass recompiles only a graph it runs itself (add it to RECOMPILE_ALLOWED, with why)")
    assert sorted(calls) == sorted(RECOMPILE_ALLOWED), "RECOMPILE_ALLOWED lists a call that is gone: drop it"
