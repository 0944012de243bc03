"""The contract every pass implements: ``Pass`` (on a GraphModule), ``OnnxPass`` (on an
onnx-graphsurgeon graph), ``PassResult`` and ``PassContext``.

A pass is a frozen dataclass whose typed fields are its options, so the same object prints
as, and parses from, a pipeline string (see ``registry``). Whether a pass changed the graph
is decided by the pipeline (canonical text before/after), never self-reported.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal

import torch
from torch import nn

from .copying import copy_graph_module, shared_copy
from .errors import InputError
from .layer_rows import PassLayerRow
from .options import checked_arguments, format_pass, not_in_pipeline_string

__all__ = ["Diagnostic", "PassLayerRow", "OnnxPass", "OrderPreference", "Pass", "PassContext", "PassResult",
           "copy_graph_module", "not_in_pipeline_string", "prefer_after", "prefer_before", "shared_copy"]

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs
    from torch.fx import GraphModule

Severity = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Diagnostic:
    """Something a pass wants the user to know, tied to a node when there is one."""

    severity: Severity
    message: str
    node: str | None = None
    rule: str = ""  # what kind of finding (one rule, several nodes: reports group them)

    def __str__(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        return f"{self.severity}{where}: {self.message}"


@dataclass
class PassResult:
    """What a pass returns: the (new or rewritten) graph, diagnostics and its own statistics."""

    graph: Any
    diagnostics: list[Diagnostic] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    #: analyses (keys of ``PassContext`` cache) still valid after this pass; None = the
    #: pass's ``preserves`` class attribute decides.
    preserved: tuple[str, ...] | None = None
    #: new node name -> name of the node of the graph before the pass whose value it now stands
    #: for (a producer that absorbed its consumer); guides the first-divergent-node search
    replaces: dict[str, str] = field(default_factory=dict)
    #: the pass's per-layer table (what it kept, chose or measured per layer), typed for reports
    layers: list[PassLayerRow] = field(default_factory=list)

    def info(self, message: str, node: str | None = None) -> None:
        self.diagnostics.append(Diagnostic("info", message, node))

    def warn(self, message: str, node: str | None = None) -> None:
        self.diagnostics.append(Diagnostic("warning", message, node))


class PassContext:
    """What passes need besides the graph, passed explicitly (never global).

    ``original`` is an eval-mode copy of the user's model (the default teacher); the user's
    own object is never handed to a pass. Analyses (shapes, dependency graphs, ...) are cached
    by key until a pass invalidates them. ``facts`` are what a pass hands to later ones (keyed by
    the producing pass's name, e.g. ``quant-sensitivity``'s ranking for ``quantize-int8``): unlike
    analyses they survive every later pass.
    """

    def __init__(
        self,
        example_inputs: tuple[torch.Tensor, ...] = (),
        *,
        calibration: Iterable[Any] | None = None,
        train_data: Iterable[Any] | None = None,
        original: nn.Module | None = None,
        target: str = "fx",
        device: str | torch.device = "cpu",
        seed: int = 0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.example_inputs = tuple(example_inputs)
        self.calibration = calibration
        self.train_data = train_data
        self.original = original
        self.target = target
        self.device = torch.device(device)
        self.seed = seed
        self.logger = logger or logging.getLogger("fxcompress")
        self.facts: dict[str, Any] = {}
        #: set by the pipeline: ``progress(description, total) -> context manager with advance(n)``
        self.progress: Callable[..., Any] = _no_progress
        self._analyses: dict[str, Any] = {}

    def analysis(self, key: str, compute: Callable[[], Any]) -> Any:
        """Cached analysis ``key``; ``compute()`` runs only when it is missing or invalidated."""
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def cached(self, key: str) -> Any:
        """The cached analysis ``key`` if it is still valid, else None (never computes it)."""
        return self._analyses.get(key)

    def invalidate(self, keep: Iterable[str] = ()) -> None:
        """Forget every cached analysis except those in ``keep``."""
        keep = set(keep)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    @property
    def cached_analyses(self) -> tuple[str, ...]:
        """The keys of the analyses still cached."""
        return tuple(sorted(self._analyses))


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, n: float = 1, **fields: Any) -> None:
        return None


def _no_progress(description: str = "", total: float | None = None) -> _NoProgress:
    return _NoProgress()


Stage = Literal["fx", "onnx"]


@dataclass(frozen=True)
class OrderPreference:
    """A soft ordering rule a pass declares on its class (``order_preferences``): the pass should
    run ``relation`` (``"before"`` or ``"after"``) every pass that ``others`` names. ``others`` holds
    pass names, or ``"trait:<attribute>"`` for every pass whose attribute is true (``"trait:trains"``).
    A pipeline that goes against it still runs; the pass manager warns before any work starts,
    with the suggested order and ``reason``."""

    relation: Literal["before", "after"]
    others: tuple[str, ...]
    reason: str

    def __post_init__(self) -> None:
        if self.relation not in ("before", "after"):
            raise InputError(f"OrderPreference.relation must be 'before' or 'after'; got {self.relation!r}")
        if isinstance(self.others, str):
            object.__setattr__(self, "others", (self.others,))

    def matches(self, p: "Pass") -> bool:
        """Whether pass ``p`` is one of ``others``."""
        return any(bool(getattr(p, o[len("trait:"):], False)) if o.startswith("trait:") else p.name == o
                   for o in self.others)

    def describe(self) -> str:
        """``others`` as a reader says it: ``'quantize-int8'``, ``any pass that trains``."""
        words = [f"any pass that {o[len('trait:'):]}" if o.startswith("trait:") else f"'{o}'" for o in self.others]
        return " or ".join(words)


def prefer_before(*others: str, reason: str) -> OrderPreference:
    """The declaring pass should run before every pass in ``others`` (names or ``trait:<attr>``)."""
    return OrderPreference("before", others, reason)


def prefer_after(*others: str, reason: str) -> OrderPreference:
    """The declaring pass should run after every pass in ``others`` (names or ``trait:<attr>``)."""
    return OrderPreference("after", others, reason)


class _PassType(type):
    """The metaclass of passes: a pass's options are checked where it is constructed, before the
    dataclass ``__init__`` (and so any ``__post_init__``) sees them."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = checked_arguments(cls, args, kwargs)  # type: ignore[arg-type]
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class Pass(metaclass=_PassType):
    """Base of every FX pass. Subclasses are frozen dataclasses whose fields are options.

    Class attributes a pass declares:
      ``name``      kebab-case name used in pipeline strings and reports
      ``exact``     True if the pass preserves outputs; the pipeline then verifies it numerically
      ``requires``  capabilities an earlier step must provide (e.g. ``"calibration-data"``)
      ``provides``  capabilities this pass provides to later passes
      ``preserves`` cached analyses still valid after the pass (default: none)
      ``trains``    True if the pass trains the graph's weights (an instance may decide, e.g. QAT)
      ``inspects``  True if the pass only reports on the graph (its diagnostics), never changing it;
                    ``fxcompress inspect`` runs every such ONNX pass on the model it shows
      ``shares_weights``  True if the pass never writes into the parameters of the graph it is given
                    (it replaces what it changes: ``module.weight = nn.Parameter(new)``): the pipeline
                    then hands it a copy whose parameters share storage with the graph before, instead
                    of a deep copy, so a pass costs memory for what it replaces, not for the model
                    (default False: a deep copy, safe for passes that write in place, ``w.mul_(mask)``)
      ``order_preferences``  soft ordering rules (``prefer_before``/``prefer_after``), each with its
                    reason: the pipeline warns before any work starts when the order goes against one

    Hard constraints (an FX pass after an ONNX pass, an unmet ``requires``) are errors.

    Options are type-checked when the pass is constructed, exactly as in a pipeline string
    (``PruneChannels(ratio="x")`` raises ``PipelineError``: ``... expects a number``), before the
    dataclass ``__init__`` runs: a subclass's ``__post_init__`` sees checked, normalized values.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    stage: ClassVar[Stage] = "fx"
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    preserves: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[bool] = False
    inspects: ClassVar[bool] = False
    shares_weights: ClassVar[bool] = False
    order_preferences: ClassVar[tuple[OrderPreference, ...]] = ()

    def run(self, gm: "GraphModule", ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.run")

    def options(self) -> dict[str, Any]:
        """Options that differ from their defaults, in field order (what the pipeline string shows)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init or f.metadata.get("pipeline", True) is not True:
                continue
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = dataclasses.MISSING
            if default is dataclasses.MISSING or value != default:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        return format_pass(self)

    def replace(self, **changes: Any) -> "Pass":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class OnnxPass(Pass):
    """A pass on an onnx-graphsurgeon ``gs.Graph`` (after export). Exact ONNX passes are
    verified in ONNX Runtime."""

    stage: ClassVar[Stage] = "onnx"

    def run(self, graph: "gs.Graph", ctx: PassContext) -> PassResult:  # type: ignore[override]  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.run")
