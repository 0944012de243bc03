"""Batches of calibration and training data, whatever shape the user hands them in.

A batch is a tensor, a tuple/list whose leading items are the model's inputs (trailing items
such as labels are the targets), or a dict of input name -> tensor. A torch ``DataLoader`` of
``(x, y)`` works as it is. Passes call ``split_batch`` with the traced graph's input count and
names, so the same loader serves calibration (targets ignored) and training (targets used).

The user's batches are never written to: ``iter_batches`` hands out copies of the inputs when
the graph may write into its inputs (``ReLU(inplace=True)`` as the first layer), and
``model_inputs`` does the same for training loops that split batches themselves.

Batches are checked against the graph's example inputs (the placeholders' shape metadata):
``iter_batches`` rejects a batch whose rank or dtype kind (float/int/bool/complex) differs, up
front and naming the argument, input, batch index and expected vs actual shape. Any batch size
is fine, and other non-batch dims are left to the model (it may take dynamic shapes);
``explain_failure`` turns a model run that fails on such a batch into the same clear error.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator as _Iterator
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch.fx import GraphModule

from fxcompress.errors import FxCompressError, InputError, PassError

from ._fx_utils import meta_dtype, meta_shape, writes_inputs


class InputSpec(NamedTuple):
    """What a graph input was traced with: shape and dtype (None when unknown)."""

    name: str
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None


def graph_inputs(gm: GraphModule) -> list[str]:
    """Names of the graph's placeholders, in call order."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]


def input_specs(gm: GraphModule) -> list[InputSpec]:
    """Name, shape and dtype of each placeholder, from shape propagation's metadata."""
    return [InputSpec(str(n.target), meta_shape(n), meta_dtype(n)) for n in gm.graph.nodes if n.op == "placeholder"]


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _per_sample(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape[1:])


def _where(argument: str, pass_name: str, index: int, name: str) -> str:
    return f"pass '{pass_name}': {argument}= batch {index}, input '{name}'"


def _expected(spec: InputSpec) -> str:
    if not spec.shape:
        return f"a scalar ({_dtype(spec.dtype)})"
    batch = ", ".join(["N", *map(str, spec.shape[1:])])
    return f"samples of shape {_per_sample(spec.shape)} ({_dtype(spec.dtype)}): tensors ({batch}) for any batch size N"


def _dtype(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "")


def _actual(value: torch.Tensor) -> str:
    return f"a tensor of shape {tuple(value.shape)} ({_dtype(value.dtype)})"


def check_inputs(inputs: Sequence[Any], specs: Sequence[InputSpec], *, argument: str, pass_name: str,
                 index: int) -> None:
    """Raise ``PassError`` when an input of batch ``index`` has another rank or dtype kind than the
    graph was traced with; the batch size and other dims are not checked (see the module doc)."""
    for value, spec in zip(inputs, specs):
        if not isinstance(value, torch.Tensor) or spec.shape is None:
            continue
        problem = ""
        if value.dim() != len(spec.shape):
            problem = f"rank {value.dim()}, the model takes rank {len(spec.shape)}"
        elif spec.dtype is not None and _kind(value.dtype) != _kind(spec.dtype):
            problem = f"{_kind(value.dtype)} data, the model takes {_kind(spec.dtype)} data"
        if problem:
            raise PassError(f"{_where(argument, pass_name, index, spec.name)}: expected {_expected(spec)}; got "
                            f"{_actual(value)} ({problem}); yield batches shaped like the example inputs",
                            pass_name=pass_name)


@contextmanager
def explain_failure(inputs: Sequence[Any], specs: Sequence[InputSpec], *, argument: str, pass_name: str,
                    index: int) -> Iterator[None]:
    """Around running the model on batch ``index``: when it raises and an input's per-sample shape
    differs from the traced one, raise ``PassError`` naming it (the model's error as ``__cause__``);
    any other failure propagates unchanged."""
    try:
        yield
    except FxCompressError:
        raise
    except Exception as exc:
        for value, spec in zip(inputs, specs):
            if isinstance(value, torch.Tensor) and spec.shape is not None and \
                    _per_sample(value.shape) != _per_sample(spec.shape):
                first = (str(exc).splitlines() or [""])[0]
                raise PassError(f"{_where(argument, pass_name, index, spec.name)}: the model failed on "
                                f"{_actual(value)} ({type(exc).__name__}: {first}); it was traced with "
                                f"{_expected(spec)}", pass_name=pass_name) from exc
        raise


def split_batch(batch: Any, n_inputs: int, input_names: Sequence[str] = ()) -> tuple[tuple[Any, ...], Any]:
    """``(inputs, targets)`` of one batch: ``targets`` is None when the batch carries none.

    A tuple/list gives its first ``n_inputs`` items as inputs and the rest as targets (one item
    unwrapped). A dict is looked up by ``input_names``; a ``"target"``/``"label(s)"``/``"y"`` key
    is the target.
    """
    if isinstance(batch, torch.Tensor):
        if n_inputs != 1:
            raise InputError(f"a batch is a single tensor but the model takes {n_inputs} inputs "
                             f"({', '.join(input_names) or '?'}); yield a tuple (x1, ..., x{n_inputs}[, y])")
        return (batch,), None
    if isinstance(batch, dict):
        missing = [name for name in input_names if name not in batch]
        if missing or not input_names:
            raise InputError(f"a dict batch needs the model's input names as keys: {list(input_names)}; "
                             f"missing {missing}, got keys {sorted(map(str, batch))}")
        target = next((batch[k] for k in ("target", "targets", "label", "labels", "y") if k in batch), None)
        return tuple(batch[name] for name in input_names), target
    if isinstance(batch, (tuple, list)):
        if len(batch) < n_inputs:
            raise InputError(f"a batch has {len(batch)} items but the model takes {n_inputs} inputs "
                             f"({', '.join(input_names) or '?'})")
        inputs = tuple(batch[:n_inputs])
        rest = tuple(batch[n_inputs:])
        target = None if not rest else rest[0] if len(rest) == 1 else rest
        return inputs, target
    raise InputError(f"a batch must be a tensor, a tuple/list (inputs first, then targets) or a dict of "
                     f"input name -> tensor; got {type(batch).__name__}")


def to_device(value: Any, device: torch.device | str | None, *, copy: bool = False) -> Any:
    """``value`` (tensor, or nested tuple/list/dict of them) moved to ``device`` (None: where it
    is). With ``copy`` every tensor is a new one even when it is already on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(value.device if device is None else device, copy=copy)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device, copy=copy) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, copy=copy) for k, v in value.items()}
    return value


def model_inputs(inputs: tuple[Any, ...], model: torch.nn.Module, device: torch.device | str | None = None,
                 *, writes: bool | None = None) -> tuple[Any, ...]:
    """``inputs`` on ``device``, copied when ``model`` may write into its inputs (``writes``,
    default ``_fx_utils.writes_inputs(model)``), so running it leaves the user's tensors alone."""
    return to_device(inputs, device, copy=writes_inputs(model) if writes is None else writes)


#: one-shot iterators (generators) given as data, and the pass that first read from each
_READ_BY: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()

_ONE_SHOT_FIX = ("pass a list (e.g. list(batches)) or a DataLoader, which every pass can iterate again")


def claim_data(data: Any, *, argument: str, pass_name: str) -> None:
    """Refuse a one-shot iterator (a generator) another pass already read from: this pass would get
    nothing, or only the remainder, of the data."""
    if not isinstance(data, _Iterator):
        return
    try:
        first = _READ_BY.setdefault(data, pass_name)
    except TypeError:  # not weak-referenceable: nothing recorded
        return
    if first != pass_name:
        raise PassError(f"pass '{pass_name}': {argument}= is a one-shot iterator (e.g. a generator) that "
                        f"pass '{first}' already consumed, so at most its remainder is left for this pass; "
                        + _ONE_SHOT_FIX, pass_name=pass_name)


def iter_inputs(data: Iterable[Any] | None, gm: GraphModule, *, argument: str, pass_name: str,
                limit: int = 0, device: torch.device | str | None = None) -> Iterator[tuple[Any, ...]]:
    """Input tuples of the first ``limit`` batches of ``data`` (all when ``limit`` is 0), on
    ``device`` (None: where they are), safe to feed to ``gm`` (see ``model_inputs``).

    Raises ``PassError`` naming ``argument`` (``calibration=`` / ``train_data=``) when there is
    no data, or when it yields nothing."""
    for inputs, _ in iter_batches(data, gm, argument=argument, pass_name=pass_name, limit=limit, device=device):
        yield inputs


def iter_batches(data: Iterable[Any] | None, gm: GraphModule, *, argument: str, pass_name: str,
                 limit: int = 0, device: torch.device | str | None = None
                 ) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(inputs, targets)`` of the first ``limit`` batches of ``data`` (see ``iter_inputs``);
    targets are the user's own tensors (moved to ``device``), never fed to ``gm``."""
    if data is None:
        raise PassError(f"pass '{pass_name}' needs data: pass {argument}= to fxcompress.compile() "
                        f"(or PassContext), an iterable of batches such as a DataLoader of (x, y)",
                        pass_name=pass_name)
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    claim_data(data, argument=argument, pass_name=pass_name)
    specs = input_specs(gm)
    names = [s.name for s in specs]
    writes = writes_inputs(gm)
    count = 0
    for batch in data:
        if limit and count >= limit:
            break
        inputs, targets = split_batch(batch, len(names), names)
        check_inputs(inputs, specs, argument=argument, pass_name=pass_name, index=count)
        yield model_inputs(inputs, gm, device, writes=writes), to_device(targets, device)
        count += 1
    if count == 0:
        why = (f": it is a one-shot iterator (e.g. a generator), already exhausted; {_ONE_SHOT_FIX}"
               if isinstance(data, _Iterator) else "")
        raise PassError(f"pass '{pass_name}': {argument}= yielded no batches{why}", pass_name=pass_name)
