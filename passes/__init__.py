"""The built-in pass library. It depends on ``fxcompress``, never the reverse.

Every ``fxcompress.Pass`` subclass defined in a module of this package is a built-in pass:
a new pass is one new file, nothing else to edit. ``from passes import FoldBatchNorm`` finds
the class by name in the package's modules, imported on first use. The framework's schedule
passes ``Pipeline`` and ``Repeat`` are re-exported, so ``from passes import Repeat, PruneChannels``
is enough to write ``Repeat(4, [PruneChannels(ratio=0.16), Distill(data=loader)])``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from types import ModuleType

from fxcompress.pipeline import Pipeline, Repeat


def iter_modules() -> list[ModuleType]:
    """All modules of this package, imported, in a stable order."""
    mods: list[ModuleType] = []
    for info in sorted(pkgutil.walk_packages(__path__, prefix=f"{__name__}."), key=lambda i: i.name):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        mods.append(importlib.import_module(info.name))
    return mods


@lru_cache(maxsize=None)
def _public_classes() -> dict[str, type]:
    from fxcompress.pass_base import Pass

    found: dict[str, type] = {}
    for mod in iter_modules():
        for attr, obj in vars(mod).items():
            if (isinstance(obj, type) and issubclass(obj, Pass) and obj.__module__ == mod.__name__
                    and not attr.startswith("_")):
                found[attr] = obj
    return found


def __getattr__(name: str) -> type:
    if name in {info.name for info in pkgutil.iter_modules(__path__)}:
        return importlib.import_module(f"{__name__}.{name}")  # type: ignore[return-value]
    classes = _public_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(
        f"module 'passes' has no pass class {name!r}; available: {', '.join(sorted(classes))}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_public_classes()))
