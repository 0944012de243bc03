"""The contract every pass implements: ``Pass`` (on a GraphModule), ``OnnxPass`` (on an
onnx-graphsurgeon graph), ``PassResult`` and ``PassContext``.

A pass is a frozen dataclass whose typed fields are its options, so the same object prints
as, and parses from, a pipeline string (see ``registry``). Whether a pass changed the graph
is decided by the pipeline (canonical text before/after), never self-reported.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal

import torch
from torch import nn

from .layer_rows import LayerRow

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
    layers: list[LayerRow] = field(default_factory=list)

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

    def invalidate(self, keep: Iterable[str] = ()) -> None:
        """Forget every cached analysis except those in ``keep``."""
        keep = set(keep)
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    @property
    def cached_analyses(self) -> tuple[str, ...]:
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
            raise ValueError(f"OrderPreference.relation must be 'before' or 'after'; got {self.relation!r}")
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


@dataclass(frozen=True)
class Pass:
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
    (``PruneChannels(ratio="x")`` raises ``PipelineError``: ``... expects a number``), before a
    subclass's own ``__post_init__`` runs, whether or not that one calls ``super()``.
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

    def __post_init__(self) -> None:
        _check_options(self)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make a subclass's own ``__post_init__`` check the options first (see the class docstring)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_checks_options", False):
            return

        @functools.wraps(own)
        def __post_init__(self: Pass, *args: Any, **kw: Any) -> None:
            _check_options(self)
            own(self, *args, **kw)

        __post_init__._checks_options = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

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
        from .registry import format_pass

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


def _check_options(p: Pass) -> None:
    from .registry import check_options

    check_options(p)


def checks_options_itself(post_init: Callable[..., None]) -> Callable[..., None]:
    """Mark a ``__post_init__`` that calls ``registry.check_options(self)`` itself (e.g. after giving
    its own, more specific messages), so ``Pass`` does not check the options before it."""
    post_init._checks_options = True  # type: ignore[attr-defined]
    return post_init


def not_in_pipeline_string(default: Any = None) -> Any:
    """A pass field that cannot be written in a pipeline string (a model, a data loader)."""
    return field(default=default, metadata={"pipeline": False}, compare=False, repr=False)


def copy_graph_module(gm: "GraphModule", share_parameters: bool = False) -> "GraphModule":
    """A deep copy that keeps node meta (shapes) and the module-level meta dict; with
    ``share_parameters`` its parameters share storage with ``gm``'s (see ``shared_copy``).

    The submodules are cloned first (``_clone_module``) into the memo ``copy.deepcopy`` then uses:
    the same result as deep-copying them, without reconstructing every module's empty hook
    dictionaries through the generic protocol (most of a large graph's copy time)."""
    memo = _parameter_aliases(gm) if share_parameters else {}
    for child in gm.children():
        _clone_module(child, memo)
    new = copy.deepcopy(gm, memo)
    new.meta = copy.deepcopy(getattr(gm, "meta", {}))
    return new


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are new ``nn.Parameter`` objects over the same
    storage (and version counter) as ``module``'s: no weight memory, and nothing done to the copy's
    modules, parameter objects (``requires_grad``, ``.grad``, ``param.data = ...``) or buffers
    reaches ``module``; only a write into a parameter's values in place would. Tied parameters stay tied."""
    return copy.deepcopy(module, _parameter_aliases(module))


def _parameter_aliases(module: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo mapping every plain ``nn.Parameter`` of ``module`` to an alias of it."""
    return {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad)
            for p in module.parameters() if type(p) is nn.Parameter}


def own_parameters(module: nn.Module, source: nn.Module) -> None:
    """Give each parameter of ``module`` that still shares storage with one of ``source``'s a copy of
    its own, in place (tied parameters stay tied): copy-on-write, deferred to the end, of what no
    pass replaced, so ``module`` no longer changes when ``source`` does."""
    theirs = {p.untyped_storage().data_ptr() for p in source.parameters()}
    for p in module.parameters():
        if p.untyped_storage().data_ptr() in theirs:
            p.data = p.data.clone()


def parameter_versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Every parameter with its version counter (bumped by any in-place write, also through an alias)."""
    return {name: (p, p._version) for name, p in module.named_parameters()}


def written_in_place(versions: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """Names of the parameters recorded by ``parameter_versions`` written in place since."""
    return [name for name, (p, v) in versions.items() if p._version != v]


_ATOMIC = (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device)
_CHILD_DICTS = ("_parameters", "_buffers", "_modules")


def _plain_module_type(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies ``cls`` by the default protocol: ``__getstate__()`` (a dict),
    deep-copied, into ``__setstate__`` of a new instance (no ``__deepcopy__``/``__reduce__`` of its own)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and not issubclass(cls, (list, dict))
            and not any("__slots__" in vars(k) for k in cls.__mro__))


def _clone_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster for modules that use ``nn.Module``'s own copy protocol:
    tensors and unknown attributes still go through ``copy.deepcopy`` (shared tensors stay shared),
    empty containers are made anew. Other module types are deep-copied as they define."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain_module_type(cls):
        return copy.deepcopy(module, memo)
    original = module.__getstate__()
    if type(original) is not dict:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in original.items():
        if key in _CHILD_DICTS and type(value) in (dict, collections.OrderedDict):
            items = ((k, _clone_module(v, memo) if isinstance(v, nn.Module) else copy.deepcopy(v, memo))
                     for k, v in value.items())
            state[key] = type(value)(items)
        elif isinstance(value, _ATOMIC):
            state[key] = value
        elif type(value) in (dict, collections.OrderedDict, set, list) and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new
