"""Pass options: the dataclass fields of a pass <-> pipeline-string text, and their type checks.

A pass's options are its ``init`` fields; a field marked ``not_in_pipeline_string`` (a model, a
data loader) is neither printed nor checked, and a ``nested_passes`` field holds the passes a
``repeat{n=2}(...)`` wraps. Values are checked against the field annotations (``Literal``
choices, numbers, lists, ...) where a pass is constructed, in Python exactly as in a pipeline
string (``PruneChannels(ratio="x")``: ``option 'ratio' of pass 'prune-channels' expects a number``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import numbers
import re
import types
import typing
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import PipelineError

if TYPE_CHECKING:  # pragma: no cover
    from .pass_base import Pass


def not_in_pipeline_string(default: Any = None) -> Any:
    """A pass field that cannot be written in a pipeline string (a model, a data loader)."""
    return dataclasses.field(default=default, metadata={"pipeline": False}, compare=False, repr=False)


def nested_passes() -> Any:
    """The field of a pass that wraps other passes (``repeat{n=2}(a,b)``: the ``(a,b)``)."""
    return dataclasses.field(default=(), metadata={"pipeline": "children"})


def string_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    """The fields of ``cls`` a pipeline string writes: its options."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("pipeline", True) is True]


def children_field(cls: type[Pass]) -> dataclasses.Field | None:
    """The ``nested_passes`` field of ``cls``, if it wraps other passes."""
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("pipeline") == "children"), None)


def option_names(cls: type[Pass]) -> list[str]:
    """The options of ``cls`` as a pipeline string names them (kebab case)."""
    return [f.name.replace("_", "-") for f in string_fields(cls)]


_BARE = re.compile(r"^[A-Za-z_*./][\w.*/\-]*$")


def format_value(value: Any) -> str:
    """An option value as pipeline-string text that parses back to the same value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value if _BARE.match(value) and bare_value(value) == value else json.dumps(value)
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
    values = {f.name: getattr(p, f.name) for f in string_fields(type(p))} if full else p.options()
    opts = ",".join(f"{k.replace('_', '-')}={format_value(v)}" for k, v in values.items())
    text = p.name + (f"{{{opts}}}" if opts else "")
    children = children_field(type(p))
    if children is not None and getattr(p, children.name):
        text += "(" + ",".join(format_pass(c, full=full) for c in getattr(p, children.name)) + ")"
    return text


def format_pipeline(passes: typing.Iterable[Pass], *, full: bool = False) -> str:
    """The pipeline string of ``passes`` (see ``format_pass``)."""
    return ",".join(format_pass(p, full=full) for p in passes)


def bare_value(token: str) -> Any:
    """An unquoted token of a pipeline string as a value: a boolean, ``none``, a number, else the text."""
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


@functools.lru_cache(maxsize=None)
def option_types(cls: type[Pass]) -> dict[str, Any]:
    """The resolved annotation of every field of ``cls``; empty when they cannot be resolved (a
    class defined inside a function naming local types), so its options go unchecked."""
    try:
        return get_type_hints(cls)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check against
        return {}


def checked_arguments(cls: type[Pass], args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The constructor arguments of pass ``cls``, type-checked as the parser checks option text
    (``option 'ratio' of pass 'prune-channels' expects a number; got 'x'``) and normalized the same
    way (lists become tuples where a tuple is declared, integers floats where a float is). Fields
    marked ``not_in_pipeline_string`` and nested passes are not checked. Arguments that do not bind
    are returned as given: the dataclass ``__init__`` then raises its own ``TypeError``."""
    try:
        bound = _init_signature(cls).bind(None, *args, **kwargs)
    except TypeError:
        return args, kwargs
    hints = option_types(cls)
    label = cls.name or cls.__name__
    for f in string_fields(cls):
        if f.name in bound.arguments:
            value = bound.arguments[f.name]
            bound.arguments[f.name] = coerce(value, hints.get(f.name, Any), f"option '{f.name}' of pass '{label}'")
    return bound.args[1:], bound.kwargs


@functools.lru_cache(maxsize=None)
def _init_signature(cls: type[Pass]) -> inspect.Signature:
    return inspect.signature(cls.__init__)


def build_pass(cls: type[Pass], raw: dict[str, Any], children: list[Pass] | None = None) -> Pass:
    """Instantiate ``cls`` from option values given by name (kebab or snake case), type-checked."""
    fields = {f.name: f for f in string_fields(cls)}
    hints = option_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        fname = key.replace("-", "_")
        if fname not in fields:
            raise PipelineError(f"pass '{cls.name}' has no option '{key}'; its options: "
                                f"{', '.join(option_names(cls)) or '(none)'}")
        kwargs[fname] = coerce(value, hints.get(fname, Any), f"option '{key}' of pass '{cls.name}'")
    child_field = children_field(cls)
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
    for f in string_fields(cls):
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
