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
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from types import ModuleType
from typing import Any

from fxcompress.pipeline import Pipeline as Pipeline, Repeat as Repeat  # re-exported for users


def iter_modules(package: str = __name__, path: Sequence[str] | None = None) -> list[ModuleType]:
    """All public modules of ``package`` (default: this whole library), imported, in a stable order."""
    mods: list[ModuleType] = []
    walk = pkgutil.walk_packages(__path__ if path is None else path, prefix=f"{package}.")
    for info in sorted(walk, key=lambda i: i.name):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        mods.append(importlib.import_module(info.name))
    return mods


def lazy_exports(package: str, path: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` / ``__dir__`` for a package of passes: ``package.Name`` is the pass
    class ``Name`` defined in any of its modules, ``package.sub`` its submodule, both imported on
    first use. ``passes`` itself and each subpackage (``passes.onnx.CheckTensorRT``) use it, so a
    new pass file needs no edit of an ``__init__``."""

    @lru_cache(maxsize=None)
    def classes() -> dict[str, type]:
        from fxcompress.pass_base import Pass

        found: dict[str, type] = {}
        for mod in iter_modules(package, path):
            for attr, obj in vars(mod).items():
                if (isinstance(obj, type) and issubclass(obj, Pass) and obj.__module__ == mod.__name__
                        and not attr.startswith("_")):
                    found[attr] = obj
        return found

    def getattr_(name: str) -> Any:
        if name in {info.name for info in pkgutil.iter_modules(path)}:
            return importlib.import_module(f"{package}.{name}")
        if name in classes():
            return classes()[name]
        raise AttributeError(f"module {package!r} has no pass class {name!r}; "
                             f"available: {', '.join(sorted(classes()))}")

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(classes()))

    return getattr_, dir_


__getattr__, __dir__ = lazy_exports(__name__, __path__)
