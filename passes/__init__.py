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
from typing import Any

from fxcompress.pipeline import Pipeline as Pipeline, Repeat as Repeat  # re-exported for users
from fxcompress.registry import defined_passes


def lazy_exports(package: str, path: Sequence[str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` / ``__dir__`` for a package of passes: ``package.Name`` is the pass
    class ``Name`` defined in any of its modules, ``package.sub`` its submodule, both imported on
    first use. ``passes`` itself and each subpackage (``passes.onnx.CheckTensorRT``) use it, so a
    new pass file needs no edit of an ``__init__``."""

    @lru_cache(maxsize=None)
    def classes() -> dict[str, type]:
        return {attr: cls for attr, cls in defined_passes(sys.modules[package]) if not attr.startswith("_")}

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
