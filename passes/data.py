"""Batches of calibration and training data, whatever shape the user hands them in.

A batch is a tensor, a tuple/list whose leading items are the model's inputs (trailing items
such as labels are the targets), or a dict of input name -> tensor. A torch ``DataLoader`` of
``(x, y)`` works as it is. Passes call ``split_batch`` with the traced graph's input count and
names, so the same loader serves calibration (targets ignored) and training (targets used).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
from torch.fx import GraphModule

from fxcompress.errors import InputError, PassError


def graph_inputs(gm: GraphModule) -> list[str]:
    """Names of the graph's placeholders, in call order."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]


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


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` (tensor, or nested tuple/list/dict of them) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def iter_inputs(data: Iterable[Any] | None, gm: GraphModule, *, argument: str, pass_name: str,
                limit: int = 0) -> Iterator[tuple[Any, ...]]:
    """Input tuples of the first ``limit`` batches of ``data`` (all when ``limit`` is 0).

    Raises ``PassError`` naming ``argument`` (``calibration=`` / ``train_data=``) when there is
    no data, or when it yields nothing."""
    for inputs, _ in iter_batches(data, gm, argument=argument, pass_name=pass_name, limit=limit):
        yield inputs


def iter_batches(data: Iterable[Any] | None, gm: GraphModule, *, argument: str, pass_name: str,
                 limit: int = 0) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(inputs, targets)`` of the first ``limit`` batches of ``data`` (see ``iter_inputs``)."""
    if data is None:
        raise PassError(f"pass '{pass_name}' needs data: pass {argument}= to fxcompress.compile() "
                        f"(or PassContext), an iterable of batches such as a DataLoader of (x, y)",
                        pass_name=pass_name)
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    names = graph_inputs(gm)
    count = 0
    for batch in data:
        if limit and count >= limit:
            break
        yield split_batch(batch, len(names), names)
        count += 1
    if count == 0:
        raise PassError(f"pass '{pass_name}': {argument}= yielded no batches", pass_name=pass_name)
