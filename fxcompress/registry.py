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

import dataclasses
import functools
import importlib
import inspect
import json
import numbers
import pkgutil
import re
import types
import typing
from importlib.metadata import entry_points
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import PipelineError
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


def _classes_in(module: types.ModuleType) -> list[type[Pass]]:
    modules = [module]
    if hasattr(module, "__path__"):
        for info in sorted(pkgutil.walk_packages(module.__path__, prefix=f"{module.__name__}."),
                           key=lambda i: i.name):
            if not info.name.rsplit(".", 1)[-1].startswith("_"):
                modules.append(importlib.import_module(info.name))
    found = []
    for mod in modules:
        for obj in vars(mod).values():
            if (inspect.isclass(obj) and issubclass(obj, Pass) and obj.__module__ == mod.__name__
                    and obj.__dict__.get("name")):
                found.append(obj)
    return found


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .pipeline import Pipeline, Repeat

    for cls in (Pipeline, Repeat):
        register(cls)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PipelineError(f"pass entry point '{ep.name} = {ep.value}' failed to load: {exc}") from exc
        classes = _classes_in(obj) if isinstance(obj, types.ModuleType) else [obj]
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


# ---------------------------------------------------------------------------------------------
# Options: field <-> text
# ---------------------------------------------------------------------------------------------

def _string_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("pipeline", True) is True]


def _children_field(cls: type[Pass]) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("pipeline") == "children"), None)


def option_names(cls: type[Pass]) -> list[str]:
    return [f.name.replace("_", "-") for f in _string_fields(cls)]


_BARE = re.compile(r"^[A-Za-z_*./][\w.*/\-]*$")


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if _BARE.match(value) and _bare(value) == value else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_value(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, type):
        return value.__name__
    raise PipelineError(f"option value {value!r} of type {type(value).__name__} cannot be written in a pipeline string")


def format_pass(p: Pass, *, full: bool = False) -> str:
    """The pipeline-string form of one pass: options that differ from their defaults, or with
    ``full`` every option (so the text still means the same pass if a default changes)."""
    values = {f.name: getattr(p, f.name) for f in _string_fields(type(p))} if full else p.options()
    opts = ",".join(f"{k.replace('_', '-')}={format_value(v)}" for k, v in values.items())
    text = p.name + (f"{{{opts}}}" if opts else "")
    children = _children_field(type(p))
    if children is not None and getattr(p, children.name):
        text += "(" + ",".join(format_pass(c, full=full) for c in getattr(p, children.name)) + ")"
    return text


def format_pipeline(passes: typing.Iterable[Pass], *, full: bool = False) -> str:
    return ",".join(format_pass(p, full=full) for p in passes)


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
        return _bare(m.group(0))

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


def _bare(token: str) -> Any:
    low = token.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(token)
        except ValueError:
            pass
    return token


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string into pass objects."""
    parser = _Parser(text)
    passes = parser.pipeline()
    if parser.peek() != "":
        raise parser.error("unexpected text")
    return passes


# ---------------------------------------------------------------------------------------------
# Type checking of options
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def option_types(cls: type[Pass]) -> dict[str, Any]:
    """The resolved annotation of every field of ``cls``; empty when they cannot be resolved (a
    class defined inside a function naming local types), so its options go unchecked."""
    try:
        return get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return {}


def check_options(p: Pass) -> None:
    """Type-check the pipeline-string options of a constructed pass, as the parser does
    (``option 'ratio' of pass 'prune-channels' expects a number; got 'x'``). Values are normalized
    the same way (lists become tuples where a tuple is declared, integers become floats). Fields
    marked ``not_in_pipeline_string`` (a model, a data loader) and nested passes are not checked."""
    cls = type(p)
    hints = option_types(cls)
    label = cls.name or cls.__name__
    for f in _string_fields(cls):
        value = getattr(p, f.name)
        checked = coerce(value, hints.get(f.name, Any), f"option '{f.name}' of pass '{label}'")
        if checked is not value:
            object.__setattr__(p, f.name, checked)


def build_pass(cls: type[Pass], raw: dict[str, Any], children: list[Pass] | None = None) -> Pass:
    """Instantiate ``cls`` from option values given by name (kebab or snake case), type-checked."""
    fields = {f.name: f for f in _string_fields(cls)}
    hints = option_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        fname = key.replace("-", "_")
        if fname not in fields:
            raise PipelineError(f"pass '{cls.name}' has no option '{key}'; its options: "
                                f"{', '.join(option_names(cls)) or '(none)'}")
        kwargs[fname] = coerce(value, hints.get(fname, Any), f"option '{key}' of pass '{cls.name}'")
    child_field = _children_field(cls)
    if children is not None:
        if child_field is None:
            raise PipelineError(f"pass '{cls.name}' does not take nested passes '(...)'")
        kwargs[child_field.name] = tuple(children)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"pass '{cls.name}': {exc}") from exc


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; lists become tuples where a tuple is declared."""
    if tp is Any or tp is object:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise PipelineError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except PipelineError as exc:
                errors.append(str(exc))
        raise PipelineError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin in (tuple, list, typing.Sequence, typing.Iterable) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            if isinstance(value, (str, int, float)):
                value = [value]
            else:
                raise PipelineError(f"{where} expects a list; got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise PipelineError(f"{where} expects {len(args)} items; got {len(value)}")
            return tuple(coerce(v, a, where) for v, a in zip(value, args))
        item = args[0] if args else Any
        out = [coerce(v, item, where) for v in value]
        return out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where} expects a {{key: value}} mapping; got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, where): coerce(v, vt, where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise PipelineError(f"{where} expects true/false; got {value!r}")
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value if type(value) is int else int(value)
        raise PipelineError(f"{where} expects an integer; got {value!r}")
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value if type(value) is float else float(value)
        raise PipelineError(f"{where} expects a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise PipelineError(f"{where} expects a string; got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise PipelineError(f"{where} expects {tp.__name__}; got {value!r}")
    return value


def describe_options(cls: type[Pass]) -> list[tuple[str, str, str]]:
    """``(option, type, default)`` for every option of a pass, as written in pipeline strings."""
    hints = option_types(cls)
    rows = []
    for f in _string_fields(cls):
        if f.default is not dataclasses.MISSING:
            default = format_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = format_value(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        tp = hints.get(f.name, Any)
        rows.append((f.name.replace("_", "-"), _type_text(tp), default))
    return rows


def _type_text(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args if a is not type(None)) + (
            " | none" if type(None) in args else "")
    if origin in (tuple, list):
        return f"[{_type_text(args[0]) if args else 'any'}]"
    if origin is dict:
        return f"{{{_type_text(args[0])}: {_type_text(args[1])}}}" if args else "{...}"
    return getattr(tp, "__name__", str(tp))


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
