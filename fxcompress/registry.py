"""Pass names -> classes, and pipeline strings.

Passes are found through the entry-point group ``fxcompress.passes``: an entry's value is a
``Pass`` subclass, or a module whose ``Pass`` subclasses (in it and its submodules) are all
registered. ``register`` adds a class at run time (handy in tests and notebooks).

Pipeline strings, after MLIR's textual pipelines::

    fold-batchnorm,prune-channels{ratio=0.5,round-to=8},repeat{n=2}(prune-channels,distill)

Option values are literals only (numbers, strings, booleans, ``none``, ``[lists]``,
``{"dicts": 1}``); nothing is evaluated. Options are checked against the dataclass field types.
Strings are bare (``layer3.*``), ``"JSON strings"`` with backslash escapes (what printing writes,
so any string round-trips), or ``'raw strings'`` taken as written up to the next ``'``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import types
from importlib.metadata import entry_points
from typing import Any

from .errors import PipelineError
from .options import bare_value, build_pass, describe_options, format_pipeline
from .pass_base import Pass

ENTRY_POINT_GROUP = "fxcompress.passes"

_registry: dict[str, type[Pass]] = {}
_sources: dict[str, str] = {}
_loaded = False


_KEBAB = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


def register(cls: type[Pass], *, source: str | None = None) -> type[Pass]:
    """Register a pass class under its ``name``; usable as a decorator (below ``@dataclass(frozen=True)``).

    The class must be a frozen dataclass (its fields are the options a pipeline string prints and
    parses) with a kebab-case ``name`` such as ``fold-batchnorm``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise PipelineError(f"{cls!r} is not a Pass subclass with a non-empty `name`")
    where = source or f"{cls.__module__}.{cls.__qualname__}"
    if not isinstance(cls.name, str) or not _KEBAB.match(cls.name):
        raise PipelineError(f"pass {where}: name {cls.name!r} is not kebab-case; use lowercase letters and "
                            f"digits in words joined by '-', e.g. 'fold-batchnorm' or 'quantize-int8'")
    params = cls.__dict__.get("__dataclass_params__")
    if params is None or not params.frozen:
        what = "a dataclass that is not frozen" if params is not None else "not a dataclass itself"
        raise PipelineError(f"pass {where} ('{cls.name}') is {what}; decorate the class with "
                            f"@dataclass(frozen=True) (under @register) so its options are typed fields "
                            f"that print as, and parse from, a pipeline string")
    existing = _registry.get(cls.name)
    if existing is not None and existing is not cls:
        raise PipelineError(f"pass name '{cls.name}' is registered twice: by {_sources[cls.name]} and by {where}")
    _registry[cls.name] = cls
    _sources[cls.name] = where
    return cls


def defined_passes(module: types.ModuleType) -> list[tuple[str, type[Pass]]]:
    """``(attribute, class)`` for every ``Pass`` subclass defined in ``module`` and, for a package,
    in its public submodules (names not starting with ``_``), imported in a stable order: the one
    walk behind entry-point discovery and the pass library's lazy exports."""
    modules = [module]
    if hasattr(module, "__path__"):
        walk = pkgutil.walk_packages(module.__path__, prefix=f"{module.__name__}.")
        modules += [importlib.import_module(info.name) for info in sorted(walk, key=lambda i: i.name)
                    if not info.name.rsplit(".", 1)[-1].startswith("_")]
    return [(attr, obj) for mod in modules for attr, obj in vars(mod).items()
            if inspect.isclass(obj) and issubclass(obj, Pass) and obj.__module__ == mod.__name__]


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PipelineError(f"pass entry point '{ep.name} = {ep.value}' failed to load: {exc}") from exc
        classes = ([cls for _, cls in defined_passes(obj) if cls.__dict__.get("name")]
                   if isinstance(obj, types.ModuleType) else [obj])
        for cls in classes:
            register(cls, source=f"entry point '{ep.name}' ({cls.__module__}.{cls.__qualname__})")


def available() -> dict[str, type[Pass]]:
    """Every registered pass, by name, sorted."""
    _load()
    return dict(sorted(_registry.items()))


RECIPE_ENTRY_POINT_GROUP = "fxcompress.recipes"


def recipes() -> dict[str, str]:
    """Named pipelines: entry points of group ``fxcompress.recipes`` whose value is a
    ``{name: pipeline string}`` mapping."""
    table: dict[str, str] = {}
    for ep in sorted(entry_points(group=RECIPE_ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            table.update(ep.load())
        except Exception as exc:
            raise PipelineError(f"recipe entry point '{ep.name} = {ep.value}' failed to load: {exc}") from exc
    return table


def get(name: str) -> type[Pass]:
    _load()
    try:
        return _registry[name]
    except KeyError:
        raise PipelineError(f"unknown pass '{name}'; known passes: {', '.join(sorted(_registry))}") from None


def expand_pipeline(text: str) -> str:
    """``text`` with every option of every pass written out, defaults included."""
    return format_pipeline(parse_pipeline(text), full=True)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def error(self, message: str) -> PipelineError:
        pointer = " " * self.i + "^"
        return PipelineError(f"{message} at position {self.i}:\n  {self.text}\n  {pointer}")

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'")
        self.i += 1

    def pipeline(self, closing: str = "") -> list[Pass]:
        items = []
        if self.peek() in (closing, ""):
            return items
        while True:
            items.append(self.item())
            if self.peek() == ",":
                self.i += 1
                continue
            if self.peek() == closing:
                return items
            raise self.error("expected ',' or end of pipeline")

    def item(self) -> Pass:
        self.skip_ws()
        m = re.compile(r"[A-Za-z][\w\-]*").match(self.text, self.i)
        if not m:
            raise self.error("expected a pass name")
        self.i = m.end()
        cls = get(m.group(0))
        raw: dict[str, Any] = {}
        if self.peek() == "{":
            self.i += 1
            while self.peek() != "}":
                km = re.compile(r"[A-Za-z][\w\-]*").match(self.text, self.i)
                if not km:
                    raise self.error(f"expected an option name of '{cls.name}'")
                self.i = km.end()
                self.expect("=")
                raw[km.group(0)] = self.value()
                if self.peek() == ",":
                    self.i += 1
                elif self.peek() != "}":
                    raise self.error("expected ',' or '}'")
            self.i += 1
        children = None
        if self.peek() == "(":
            self.i += 1
            children = self.pipeline(")")
            self.expect(")")
        return build_pass(cls, raw, children)

    def value(self) -> Any:
        ch = self.peek()
        if ch == "":
            raise self.error("expected a value, got the end of the pipeline string")
        if ch == "[":
            self.i += 1
            items = []
            while self.peek() != "]":
                items.append(self.value())
                if self.peek() == ",":
                    self.i += 1
                elif self.peek() != "]":
                    raise self.error("expected ',' or ']'")
            self.i += 1
            return items
        if ch == "{":
            self.i += 1
            out = {}
            while self.peek() != "}":
                key = self.value()
                self.expect(":")
                out[key] = self.value()
                if self.peek() == ",":
                    self.i += 1
                elif self.peek() != "}":
                    raise self.error("expected ',' or '}'")
            self.i += 1
            return out
        if ch == "'":
            return self.raw_string()
        if ch == '"':
            return self.json_string()
        m = re.compile(r"[^,\]\}\):\s]+").match(self.text, self.i)
        if not m:
            raise self.error("expected a value")
        self.i = m.end()
        return bare_value(m.group(0))

    def raw_string(self) -> str:
        """``'...'``: the text up to the next ``'``, as written (no escapes)."""
        end = self.text.find("'", self.i + 1)
        if end < 0:
            raise self.error("unterminated string (a '-quoted string has no escapes and ends at the next ')")
        body = self.text[self.i + 1:end]
        self.i = end + 1
        return body

    def json_string(self) -> str:
        """``"..."``: a JSON string literal (backslash escapes), what ``format_value`` writes."""
        start, end = self.i, self.i + 1
        while end < len(self.text) and self.text[end] != '"':
            end += 2 if self.text[end] == "\\" else 1
        if end >= len(self.text):
            raise self.error("unterminated string")
        try:
            value = json.loads(self.text[start:end + 1], strict=False)
        except json.JSONDecodeError as exc:
            self.i = start + exc.pos
            raise self.error(f"malformed string literal ({exc.msg})") from None
        self.i = end + 1
        return value


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string into pass objects."""
    parser = _Parser(text)
    passes = parser.pipeline()
    if parser.peek() != "":
        raise parser.error("unexpected text")
    return passes


def installed() -> dict[str, type[Pass]]:
    """Passes of the framework and of installed packages (entry points), not ones registered at run time."""
    return {name: cls for name, cls in available().items()
            if cls.__module__.startswith("fxcompress.") or _sources[name].startswith("entry point")}


def catalogue_markdown() -> str:
    """The pass catalogue as a Markdown table (the README's is generated by this)."""
    lines = ["| pass | stage | exact | options (default) | what it does |", "|---|---|---|---|---|"]
    for name, cls in installed().items():
        opts = "<br>".join(f"`{o}`: {t} = `{d}`" for o, t, d in describe_options(cls)).replace("|", "\\|") or "-"
        doc = (inspect.getdoc(cls) or "").split("\n\n", 1)[0].replace("\n", " ").replace("|", "\\|")
        lines.append(f"| `{name}` | {cls.stage} | {'yes' if cls.exact else 'no'} | {opts} | {doc} |")
    return "\n".join(lines) + "\n"
