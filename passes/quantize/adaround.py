"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Rounding each weight to the nearest grid point minimizes the weight error, not the layer's output
error. AdaRound learns, layer by layer on calibration data, whether each weight rounds down or up:
``w~ = s * clip(floor(w / s) + h(V), qmin, qmax)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, minimizing the layer's output
reconstruction error ``||f(x~, w~) - f(x, w)||^2`` plus a regularizer ``sum(1 - |2h(V) - 1|^beta)``
whose ``beta`` is annealed from 20 to 2 so every ``h`` ends at 0 or 1. ``x~`` is the layer's input
as the already-quantized layers before it produce it (so each layer corrects what came before);
``f(x, w)`` is the float layer on float inputs. Works on any layer whose op can be re-run with a
substituted weight: ``call_module`` Conv/ConvTranspose/Linear and function-form conv/linear/matmul
with a constant weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxcompress.pass_base import PassContext

from .. import _fx_utils as fxu
from ..data import iter_inputs, model_inputs

ZETA, GAMMA = 1.1, -0.1


@dataclass(frozen=True)
class AdaRoundConfig:
    """Optimization settings: Adam steps per layer, learning rate, regularizer weight, the ``beta``
    annealing range, the share of steps before the regularizer starts, samples per step, and torch
    threads meanwhile (one by default: per-layer steps are small, and several threads on a shared
    machine made them 15x slower here; None keeps the current setting)."""

    iters: int = 1000
    lr: float = 1e-2
    reg: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    batch: int = 32
    threads: int | None = 1


@dataclass(frozen=True)
class RoundingTask:
    """One layer to round: its node (same name in the float and working graphs), float weight, the
    grid scale (broadcastable to the weight), the integer range, and the output's channel dim."""

    node: str
    weight: torch.Tensor
    scale: torch.Tensor
    qmin: int
    qmax: int
    channel_dim: int


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def nearest(task: RoundingTask) -> torch.Tensor:
    """Round-to-nearest integers of ``task`` (the baseline AdaRound starts from)."""
    return torch.clamp(torch.round(task.weight.detach().float() / task.scale), task.qmin, task.qmax)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reconstruction(out: torch.Tensor, ref: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Squared error summed over output channels, averaged over samples and positions."""
    return (out - ref).pow(2).sum(dim=channel_dim).mean()


def learn_rounding(task: RoundingTask, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor, config: AdaRoundConfig,
                   seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """The learned integers of ``task`` and the reconstruction errors (on all of ``x``) of
    round-to-nearest and of AdaRound. Nearest is kept when AdaRound does not beat it."""
    scaled = task.weight.detach().float() / task.scale
    floor = torch.floor(scaled)
    rest = (scaled - floor).clamp(0.01, 0.99)
    v = torch.nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))  # h(v) = rest: starts at w
    with _threads(config.threads):
        _optimize(task, forward, x, y, config, v, floor, seed)
    learned = torch.clamp(floor + (v.detach() >= 0).float(), task.qmin, task.qmax)
    base = nearest(task)
    with torch.no_grad():
        err = {name: float(_reconstruction(forward(x, task.scale * q), y, task.channel_dim))
               for name, q in (("nearest", base), ("adaround", learned))}
    err["kept_nearest"] = float(err["adaround"] >= err["nearest"])
    return (base if err["kept_nearest"] else learned), err


def _optimize(task: RoundingTask, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, config: AdaRoundConfig, v: torch.nn.Parameter, floor: torch.Tensor, seed: int) -> None:
    """Adam on ``v``: reconstruction loss, plus the rounding regularizer after the warm-up with
    ``beta`` annealed (cosine) from ``config.beta[0]`` to ``config.beta[1]``."""
    opt = torch.optim.Adam([v], lr=config.lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    start = int(config.warmup * config.iters)
    for step in range(config.iters):
        idx = torch.randint(n, (min(config.batch, n),), generator=gen)
        h = rectified_sigmoid(v)
        w_soft = task.scale * torch.clamp(floor + h, task.qmin, task.qmax)
        loss = _reconstruction(forward(x[idx], w_soft), y[idx], task.channel_dim)
        if step >= start:
            progress = (step - start) / max(1, config.iters - start)
            beta = config.beta[1] + (config.beta[0] - config.beta[1]) * 0.5 * (1 + math.cos(math.pi * progress))
            loss = loss + config.reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def layer_forward(gm: GraphModule, node: Node, weight_arg: Node | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``f(x, w)``: ``node`` re-run on input ``x`` with weight ``w`` (None when another argument
    is computed at run time). ``weight_arg`` is the weight's ``get_attr`` node for function forms."""
    if node.op == "call_module":
        mod = fxu.get_module(gm, node)
        return lambda x, w: torch.func.functional_call(mod, {"weight": w}, (x,), strict=False)
    x_arg = node.args[0] if node.args else None
    if not isinstance(x_arg, Node) or weight_arg is None:
        return None
    consts: dict[Node, Any] = {}
    for a in node.all_input_nodes:
        if a is x_arg or a is weight_arg:
            continue
        if a.op != "get_attr":
            return None
        consts[a] = fxu.get_attr_value(gm, str(a.target))
    fn = node.target

    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        sub = {x_arg: x, weight_arg: w, **consts}
        args = map_arg(node.args, lambda a: sub[a])
        kwargs = map_arg(node.kwargs, lambda a: sub[a])
        return fn(*args, **kwargs)  # type: ignore[operator]

    return forward


def weight_tensor(gm: GraphModule, node: Node, weight_arg: Node | None) -> torch.Tensor:
    """The weight tensor ``node`` reads (its module's ``weight`` or its ``get_attr`` constant)."""
    if node.op == "call_module":
        return fxu.get_module(gm, node).weight
    assert weight_arg is not None
    return fxu.get_attr_value(gm, str(weight_arg.target))


def node_values(gm: GraphModule, names: Sequence[str], batches: Sequence[tuple[Any, ...]]) -> list[torch.Tensor]:
    """The values of the nodes ``names`` over ``batches``, concatenated along the batch dim. Runs a
    copy of ``gm`` cut after the last of them."""
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    wanted = set(names)
    found: dict[str, Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.name in wanted:
            found[n.name] = env[n]
        if len(found) == len(wanted):
            break
    graph.output(tuple(found[name] for name in names))
    cut = GraphModule(gm, graph)
    fxu.eliminate_dead_code(cut)
    cut.recompile()  # a cut copy run right here for its values, never a graph a pass returns
    out: list[list[torch.Tensor]] = [[] for _ in names]
    with torch.no_grad():
        for b in batches:
            for i, v in enumerate(cut(*model_inputs(b, cut))):
                out[i].append(v.detach().float())
    return [torch.cat(vs) for vs in out]


def calibration_batches(gm: GraphModule, ctx: PassContext, limit: int, pass_name: str) -> list[tuple[Any, ...]]:
    """The first ``limit`` calibration batches (all when 0), as input tuples."""
    return list(iter_inputs(ctx.calibration, gm, argument="calibration", pass_name=pass_name, limit=limit))


def adaround_metrics(errors: dict[str, dict[str, float]], node: str) -> dict[str, Any]:
    """``PassLayerRow`` fields for ``node``'s reconstruction errors, nearest vs AdaRound (none if not rounded)."""
    err = errors.get(node)
    if err is None:
        return {}
    return {"metrics": {"error_nearest": err["nearest"], "error_adaround": err["adaround"]},
            "key_metric": "error_adaround", "worse": "higher"}


def adaround_layers(float_gm: GraphModule, work: GraphModule, tasks: Sequence[RoundingTask],
                    batches: Sequence[tuple[Any, ...]], config: AdaRoundConfig, ctx: PassContext,
                    pass_name: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """Round ``tasks`` in order. Each layer's input comes from ``work`` (the model as quantized so
    far: it may quantize activations; the weights of the layers already rounded are written into it
    as they are learned), its target output from ``float_gm``. Returns the integers by node and
    each layer's reconstruction errors (nearest vs AdaRound); layers whose op cannot be re-run are
    left out."""
    nodes = {n.name: n for n in work.graph.nodes}
    targets = dict(zip([t.node for t in tasks], node_values(float_gm, [t.node for t in tasks], batches)))
    rounded: dict[str, torch.Tensor] = {}
    errors: dict[str, dict[str, float]] = {}
    with ctx.progress(f"{pass_name}: adaround", total=len(tasks)) as bar:
        for i, task in enumerate(tasks):
            node = nodes[task.node]
            w_arg = next((a for a in node.all_input_nodes[1:] if a.op == "get_attr"), None)
            forward = layer_forward(work, node, w_arg)
            x_arg = node.args[0] if node.args else None
            if forward is not None and isinstance(x_arg, Node):
                (x,) = node_values(work, [x_arg.name], batches)
                with torch.enable_grad():
                    q, err = learn_rounding(task, forward, x, targets[task.node], config, seed=ctx.seed + i)
                rounded[task.node], errors[task.node] = q, err
                with torch.no_grad():
                    weight_tensor(work, node, w_arg).copy_(task.scale * q)
            bar.advance(1)
    return rounded, errors
