"""Data-parallel training and calibration under ``torchrun`` (``torch.distributed`` initialized).

Every helper is a no-op in a single process, so passes call them unconditionally:

- ``wrap_ddp(model)``: ``DistributedDataParallel`` around the module being trained.
- ``shard(data)``: each rank's share of the batches: a ``DataLoader`` gets a
  ``DistributedSampler`` (reshuffled every epoch), any other iterable gives every
  ``world_size``-th batch. Every rank gets the same number of batches, so no collective hangs.
- ``sync_module(model)``: after training, parameters from rank 0 and floating-point buffers
  (BatchNorm running statistics) averaged, so every rank ends with identical weights.
- ``all_reduce_`` / ``all_reduce_min_max`` / ``all_reduce_observers``: calibration statistics
  (min/max, histograms) combined over ranks so every rank computes the same quantization scales.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Iterator, Literal, Mapping, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler

from fxcompress.errors import PassError

ReduceOp = Literal["sum", "mean", "min", "max"]


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(model: nn.Module, *, device: torch.device | str | None = None,
             find_unused_parameters: bool = False) -> nn.Module:
    """``model`` inside ``DistributedDataParallel`` when distributed, else ``model`` itself.

    DDP broadcasts rank 0's parameters and buffers at construction and all-reduces gradients in
    ``backward``, so ranks stay in step. ``device`` (a CUDA device) pins the module to it; CPU
    training (gloo) needs none. The module itself is not copied: ``wrapped.module is model``."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


class ShardedLoader:
    """A ``DataLoader`` over this rank's ``DistributedSampler`` share; each pass over it is a new
    epoch (``set_epoch``), so shuffling differs per epoch but agrees across ranks."""

    def __init__(self, loader: DataLoader, sampler: DistributedSampler) -> None:
        self.loader, self.sampler = loader, sampler
        self._epoch = 0

    def __iter__(self) -> Iterator[Any]:
        self.sampler.set_epoch(self._epoch)
        self._epoch += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class StridedBatches:
    """Batch ``rank``, ``rank + world_size``, ... of an iterable every rank iterates identically.

    Batches come in groups of ``world_size``; an incomplete last group is dropped so every rank
    yields the same number of batches."""

    def __init__(self, data: Iterable[Any], rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise PassError(f"shard: rank {rank} is outside world size {world_size}")
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        group: list[Any] = []
        for batch in self.data:
            group.append(batch)
            if len(group) == self.world_size:
                yield group[self.rank]
                group = []

    def __len__(self) -> int:
        return len(self.data) // self.world_size  # type: ignore[arg-type]


def shard(data: Iterable[Any], *, seed: int = 0, shuffle: bool | None = None) -> Iterable[Any]:
    """This rank's share of ``data`` (``data`` itself when not distributed).

    A map-style ``DataLoader`` is rebuilt with a ``DistributedSampler`` (same batch size, collate
    function and workers; ``shuffle`` defaults to whether the loader shuffled; ``seed`` fixes
    the order). Anything else (a list of batches, a generator-backed iterable, a loader over an
    ``IterableDataset``) yields every ``world_size``-th batch. Never mutates ``data``."""
    if not is_distributed():
        return data
    r, n = rank(), world_size()
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) \
            and data.batch_size is not None:
        if shuffle is None:
            shuffle = isinstance(data.sampler, RandomSampler)
        sampler = DistributedSampler(data.dataset, num_replicas=n, rank=r, shuffle=shuffle, seed=seed,
                                     drop_last=False)
        loader = DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler,
                            num_workers=data.num_workers, collate_fn=data.collate_fn,
                            pin_memory=data.pin_memory, drop_last=data.drop_last,
                            worker_init_fn=data.worker_init_fn)
        return ShardedLoader(loader, sampler)
    if isinstance(data, (torch.Tensor, dict)):
        return data
    return StridedBatches(data, r, n)


_OPS = {"sum": "SUM", "mean": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce_(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over all ranks in place (``mean`` divides the sum by the world size) and
    return it. Integer tensors are fine for sum/min/max; ``mean`` needs a floating tensor."""
    if op not in _OPS:
        raise PassError(f"all_reduce_: op={op!r} is not one of {', '.join(_OPS)}")
    if not is_distributed():
        return tensor
    if op == "mean" and not tensor.is_floating_point():
        raise PassError(f"all_reduce_: op='mean' needs a floating tensor, got {tensor.dtype}")
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        tensor.div_(world_size())
    return tensor


def all_reduce_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``(min of lo, max of hi)`` over ranks (new tensors; inputs untouched)."""
    return all_reduce_(lo.detach().clone(), "min"), all_reduce_(hi.detach().clone(), "max")


def all_reduce_histogram(hist: torch.Tensor) -> torch.Tensor:
    """Bin-wise sum of histograms that share their bin edges on every rank (a new tensor)."""
    return all_reduce_(hist.detach().clone(), "sum")


class ObserverLike(Protocol):
    """What ``all_reduce_observers`` needs: ``state()`` (tensors keyed by attribute name, with a
    ``count``) and ``merge(state)`` folding another observer's state in."""

    def state(self) -> dict[str, torch.Tensor]: ...

    def merge(self, state: dict[str, torch.Tensor]) -> None: ...


def all_reduce_observers(observers: Mapping[str, ObserverLike]) -> None:
    """Combine every observer's statistics over all ranks, in place, identically on every rank.

    Each rank's states are gathered; every rank then merges them in rank order into an empty
    copy, so the result (and the scales computed from it) is bit-identical across ranks. The
    observers must be keyed by the same names on every rank."""
    if not is_distributed():
        return
    names = sorted(observers)
    local = {name: {k: v.detach().cpu() for k, v in observers[name].state().items()} for name in names}
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, (names, local))
    for r, (other_names, _) in enumerate(gathered):
        if other_names != names:
            missing = sorted(set(names) ^ set(other_names))
            raise PassError(f"all_reduce_observers: rank {r} observed different tensors than rank {rank()} "
                            f"(differing: {missing[:5]}); every rank must calibrate the same graph")
    for name in names:
        obs = observers[name]
        states = [g[1][name] for g in gathered]
        merged = _with_state(obs, states[0])
        for state in states[1:]:
            merged.merge(state)
        for key, value in merged.state().items():
            setattr(obs, key, value)


def _with_state(obs: ObserverLike, state: dict[str, torch.Tensor]) -> ObserverLike:
    """A shallow copy of ``obs`` holding ``state`` (keys are attribute names) instead of its own."""
    fresh = copy.copy(obs)
    for key, value in state.items():
        if not hasattr(obs, key):
            raise PassError(f"all_reduce_observers: {type(obs).__name__}.state() key {key!r} is not an "
                            f"attribute of the observer; state() keys must name its attributes")
        setattr(fresh, key, value.clone())
    return fresh


def sync_module(model: nn.Module, *, src: int = 0) -> None:
    """Make every rank's copy of ``model`` identical, in place: parameters and integer buffers
    from rank ``src``; floating buffers (e.g. BatchNorm running mean/var, which each rank
    updated on its own shard during the last step) averaged over ranks."""
    if not is_distributed():
        return
    model = unwrap(model)
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=src)
        for b in model.buffers():
            if b.is_floating_point():
                all_reduce_(b, "mean")
            else:
                dist.broadcast(b, src=src)


def broadcast_module(model: nn.Module, *, src: int = 0) -> nn.Module:
    """Every parameter and buffer of ``model`` replaced, in place, by rank ``src``'s (e.g. a model
    trained or loaded on one rank only); returns ``model``."""
    if is_distributed():
        with torch.no_grad():
            for t in list(unwrap(model).parameters()) + list(unwrap(model).buffers()):
                dist.broadcast(t.data, src=src)
    return model


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (itself when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def max_abs_difference_across_ranks(model: nn.Module) -> float:
    """Largest absolute difference of any parameter or buffer between this rank and rank 0
    (0.0 means identical weights everywhere); a check for tests and examples."""
    if not is_distributed():
        return 0.0
    worst = torch.zeros(())
    for t in list(unwrap(model).parameters()) + list(unwrap(model).buffers()):
        ref = t.detach().clone()
        dist.broadcast(ref, src=0)
        if t.numel():
            worst = torch.maximum(worst, (t.detach().double() - ref.double()).abs().max().cpu())
    all_reduce_(worst, "max")
    return float(worst)


__all__ = ["ShardedLoader", "StridedBatches", "all_reduce_", "all_reduce_histogram", "all_reduce_min_max",
           "all_reduce_observers", "barrier", "broadcast_module", "broadcast_object", "is_distributed",
           "is_main_process", "max_abs_difference_across_ranks", "rank", "shard", "sync_module", "unwrap",
           "world_size", "wrap_ddp"]
