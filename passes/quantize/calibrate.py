"""Run calibration data through a graph and observe chosen tensors.

Observers go into a throwaway copy of the graph as identity ``call_module`` nodes, so the graph
runs as compiled Python (not an interpreter) and memory stays bounded by the observers' state.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.errors import PassError
from fxcompress.pass_base import PassContext

from ..data import explain_failure, input_specs, iter_inputs
from .observers import Observer

O = TypeVar("O")


class _Probe(nn.Module):
    """Identity module handing its floating-point input to ``observer.observe``."""

    _writes_inputs = False

    def __init__(self, observer: Any) -> None:
        super().__init__()
        self.observer = observer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            self.observer.observe(x)
        return x


def require_calibration(ctx: PassContext, pass_name: str, what: str = "") -> Any:
    """``ctx.calibration``, or a ``PassError`` telling to pass ``calibration=`` (``what``: which
    option of the pass needs it, e.g. ``rounding='adaround'``)."""
    if ctx.calibration is None:
        needs = f"{pass_name}: {what} needs" if what else f"{pass_name} needs"
        raise PassError(f"{needs} calibration data: pass calibration= to fxcompress.compile() (an iterable "
                        f"of batches, e.g. a DataLoader of (x, y))", pass_name=pass_name)
    return ctx.calibration


def probed_copy(gm: GraphModule, nodes: Iterable[Node], make: Callable[[Node], O], device: torch.device | None
                ) -> tuple[GraphModule, dict[str, O]]:
    """A throwaway copy of ``gm`` (in eval mode, on ``device``) with an identity probe after each of
    ``nodes`` that hands its floating-point output to ``make(node)``'s ``observe``; the observers by
    node name (the copy's own, when it moved to another device)."""
    names = [n.name for n in nodes]
    probe_gm = GraphModule(gm, copy.deepcopy(gm.graph))
    by_name = {n.name: n for n in probe_gm.graph.nodes}
    observers: dict[str, O] = {}
    for i, name in enumerate(names):
        node = by_name[name]
        obs = make(node)
        observers[name] = obs
        target = f"_fxq_probe_{i}"
        probe_gm.add_module(target, _Probe(obs))
        with probe_gm.graph.inserting_after(node):
            probe = probe_gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(probe, delete_user_cb=lambda u: u is not probe)
    probe_gm.recompile()  # a probe copy this pass runs itself to observe, never the graph it returns
    probe_gm.eval()
    if device is not None and torch.device(device).type != "cpu":
        probe_gm = copy.deepcopy(probe_gm).to(device)
        observers = {name: probe_gm.get_submodule(f"_fxq_probe_{i}").observer for i, name in enumerate(names)}
    return probe_gm, observers


def observe(gm: GraphModule, nodes: Iterable[Node], make: Callable[[Node], Observer], data: Any,
            ctx: PassContext, *, batches: int, pass_name: str) -> dict[str, Observer]:
    """Observers (by node name) of ``nodes``' outputs over the first ``batches`` batches of ``data``."""
    device = ctx.device
    probe_gm, observers = probed_copy(gm, nodes, make, device)
    specs = input_specs(gm)
    with torch.no_grad(), ctx.progress(f"{pass_name}: calibrating", total=batches or None) as bar:
        for i, inputs in enumerate(iter_inputs(data, gm, argument="calibration", pass_name=pass_name,
                                               limit=batches, device=device)):
            with explain_failure(inputs, specs, argument="calibration", pass_name=pass_name, index=i):
                probe_gm(*inputs)
            bar.advance(1)
    return observers
