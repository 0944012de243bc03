"""Model inputs saved as numpy files (``.npy``/``.npz``), checked against an artifact's recorded
input specs: what the CLI's ``compare`` and data options read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError

__all__ = ["load_inputs", "not_numpy"]


def not_numpy(file: Path) -> str | None:
    """Why the existing ``file`` is not a numpy ``.npy``/``.npz`` file (from its first bytes, before
    numpy would guess at it), or None."""
    with file.open("rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY" or head.startswith(b"PK"):
        return None
    kind = "text" if head and all(32 <= c < 127 or c in b"\t\r\n" for c in head) else "data"
    return (f"inputs file {file} is not a .npy/.npz numpy file: it starts with {head!r} ({kind}, not numpy's "
            f"header); save the arrays with numpy.save (.npy) or numpy.savez (.npz), e.g. "
            f"numpy.save('x.npy', numpy.loadtxt('{file.name}', ndmin=2)) for a text table")


def load_inputs(path: str | Path, specs: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Model inputs from a ``.npy`` (one input) or ``.npz`` (several, keyed by input name), cast to
    the dtypes in ``specs`` (the artifact manifest's ``inputs``: ``{"name", "dtype", "shape"}``).

    An array whose rank or per-sample shape (all but the first axis) differs from the spec's
    ``shape`` is an ``InputError`` naming the input; the batch size may differ (the ONNX model
    has a dynamic batch axis)."""
    file = Path(path)
    names = [str(s["name"]) for s in specs]
    if not file.is_file():
        raise InputError(f"inputs file {file} does not exist; save the input with numpy.save (.npy) or, for "
                         f"several inputs ({', '.join(names)}), numpy.savez (.npz)")
    problem = not_numpy(file)
    if problem:
        raise InputError(problem)
    try:
        loaded = np.load(file, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise InputError(f"inputs file {file} is not a .npy/.npz numpy file "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise InputError(f"{file} holds one array but the model takes {len(names)} inputs "
                             f"({', '.join(names)}); save them with numpy.savez(path, **{{name: array}})")
        arrays = [loaded]
    else:
        with loaded:
            keys = list(loaded.files)
            if len(names) == 1 and len(keys) == 1:
                arrays = [loaded[keys[0]]]
            else:
                missing = [n for n in names if n not in keys]
                extra = [k for k in keys if k not in names]
                if missing:
                    raise InputError(f"{file} lacks input(s) {missing}; it has {keys}, the model takes "
                                     f"{names}" + (f" (unknown: {extra})" if extra else ""))
                arrays = [loaded[n] for n in names]
    out = []
    for spec, array in zip(specs, arrays):
        _check_shape(file, spec, array)
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        out.append(tensor.to(dtype) if isinstance(dtype, torch.dtype) else tensor)
    return tuple(out)


def _check_shape(file: Path, spec: Mapping[str, Any], array: np.ndarray) -> None:
    shape = spec.get("shape")
    if shape is None:
        return
    expected, actual = tuple(int(d) for d in shape), tuple(array.shape)
    if len(actual) != len(expected) or actual[1:] != expected[1:]:
        per_sample = "" if len(expected) < 2 else f", i.e. samples of shape {expected[1:]} for any batch size"
        raise InputError(f"{file}: input '{spec['name']}' has shape {actual}, but the artifact was compiled for "
                         f"{expected}{per_sample}; save an array of that shape")
