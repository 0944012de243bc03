"""Project rules that are easy to break silently."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import fxcompress
from fxcompress.registry import catalogue_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_framework_never_imports_the_pass_library() -> None:
    modules = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                     for p in (ROOT / "fxcompress").rglob("*.py") if p.name != "__main__.py")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m.removesuffix('.__init__'))\n"
            "bad = sorted(m for m in sys.modules if m == 'passes' or m.startswith('passes.'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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
    "quantize/bias_correction.py:_means",
    "quantize/bias_correction.py:float_graph",
    "quantize/calibrate.py:observe",
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
