"""The object at a dotted attribute path, as FX ``get_attr`` and ``call_module`` targets name
parameters, buffers, constants and submodules (``"layer1.0.conv.weight"``): the one walk that
the framework and the pass library share."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["fetch_attr"]

_MISSING: Any = object()


def fetch_attr(root: Any, path: str, default: Any = _MISSING) -> Any:
    """``root.a.b.c`` for ``path`` ``"a.b.c"``. A missing step raises ``AttributeError``, or gives
    ``default`` when one is passed (also when ``root`` is None)."""
    try:
        return operator.attrgetter(path)(root)
    except AttributeError:
        if default is _MISSING:
            raise
        return default
