"""``Compiled``: the runnable result of ``compile``, and its save/load (never pickle).

An artifact directory holds ``model.onnx``, ``model.engine`` (TensorRT targets),
``report.json``, ``graphs/NN_<step>.fxg`` and ``manifest.json``: format version, library
versions, the pipeline string (canonical, defaults dropped) and ``pipeline_full`` (every option
written out, so the artifact reproduces even if a default changes), target and backend,
input/output specs, engine build options and the sha256 of every file. Saving into an existing
artifact directory removes the engine and graph files the new manifest does not list. ``load``
refuses an unknown format version, a file whose hash does not match, a required file (model,
report, snapshots, a present engine) the manifest does not list, and any manifest path that
leaves the directory. Input/output names are the ONNX graph's.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ArtifactError, BackendUnavailable, InputError
from .pipeline import Snapshot
from .report import Report
from .verify import flatten_outputs

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ENGINE = "model.engine"
#: what ``Compiled.use_backend`` accepts
BACKENDS = ("fx", "onnxruntime", "tensorrt", "tensorrt-rtx", "none")
_ENGINE_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def full_pipeline(pipeline: str) -> str | None:
    """``pipeline`` with every option written out; None when it names a pass that is not registered
    (a class used only as a Python object), which no pipeline string can rebuild anyway."""
    from .errors import FxCompressError
    from .registry import expand_pipeline

    try:
        return expand_pipeline(pipeline)
    except FxCompressError:
        return None


def tensor_specs(values: Any, names: Sequence[str] | None) -> list[dict[str, Any]]:
    """``{name, shape, dtype}`` of each flattened tensor; unnamed outputs get the exporter's names
    (``output``, ``output_1``, ...)."""
    tensors = flatten_outputs(values)
    names = list(names) if names else [f"output_{i}" if i else "output" for i in range(len(tensors))]
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, tensors)]


def onnx_io_names(model: Any) -> tuple[list[str], list[str]]:
    """The graph's real input names (initializers listed as inputs left out) and its output names."""
    initializers = {t.name for t in model.graph.initializer}
    return ([i.name for i in model.graph.input if i.name not in initializers],
            [o.name for o in model.graph.output])


def _renamed(specs: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """``specs`` (copies) named after the ONNX graph; unchanged when the counts differ."""
    if len(specs) != len(names):
        return [dict(s) for s in specs]
    return [{**s, "name": n} for s, n in zip(specs, names)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("fxcompress", "torch", "onnx", "onnxruntime", "onnx-graphsurgeon", "tensorrt",
                 "tensorrt-rtx-cu12"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


@dataclass
class Compiled:
    """A compiled model: call it with torch tensors; inspect its graphs and report; save it."""

    graph_module: Any
    onnx_model: Any
    report: Report
    snapshots: list[Snapshot]
    pipeline: str
    target: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    engine: bytes | None = None
    engine_info: dict[str, Any] = field(default_factory=dict)
    backend: str = "none"
    #: how to rebuild the source model (set by the CLI: ``{"factory": "mod:fn", "input_shape": ...}``)
    source: dict[str, Any] | None = None
    lower: Callable[[Any], Any] | None = field(default=None, repr=False)
    #: ``pipeline`` with every option written out (computed from ``pipeline`` when not given)
    pipeline_full: str | None = None
    _runner: Callable[..., Any] | None = field(default=None, repr=False)
    _backend_options: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.onnx_model is not None:
            self.inputs, self.outputs = self._io_specs(self.onnx_model)
        if self.pipeline_full is None:
            self.pipeline_full = full_pipeline(self.pipeline)

    def runnable_backends(self) -> list[str]:
        """The backends this object can run on: ``fx`` needs the GraphModule (not saved in an
        artifact), ``onnxruntime`` the ONNX model, TensorRT ones an engine built by that module."""
        found = ["fx"] if self.graph_module is not None else []
        if self.onnx_model is not None:
            found.append("onnxruntime")
        if self.engine is not None:
            module = self.engine_info.get("module")
            found += [b for b, m in _ENGINE_MODULES.items() if module in (None, m)]
        return found

    def _io_specs(self, model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Input/output specs named as in ``model``'s graph: the names a session or engine answers to."""
        in_names, out_names = onnx_io_names(model)
        return _renamed(self.inputs, in_names), _renamed(self.outputs, out_names)

    def use_backend(self, backend: str, *, providers: Sequence[str] | None = None, threads: int | None = None,
                    note: str | None = None) -> None:
        """Choose what ``__call__`` runs on: ``fx``, ``onnxruntime``, ``tensorrt``, ``tensorrt-rtx`` or ``none``
        (builds but does not run). ``note`` labels it (e.g. a fallback); it must name ``backend``."""
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        runnable = self.runnable_backends()
        # a TensorRT backend without any engine fails on the first call (as when no GPU is there), so
        # callers that handle BackendUnavailable around running keep one place for it
        lazy = backend in _ENGINE_MODULES and self.engine is None
        if backend != "none" and backend not in runnable and not lazy:
            need = {"fx": "the torch.fx GraphModule (an artifact saves ONNX, not the GraphModule)",
                    "onnxruntime": "an ONNX model"}.get(backend, f"an engine built with {_ENGINE_MODULES.get(backend)}")
            raise BackendUnavailable(f"backend {backend!r} needs {need}, which this model does not have; it can run "
                                     f"on: {', '.join(runnable) or 'nothing'} (or 'none')")
        self._backend_options = {"providers": list(providers) if providers else None, "threads": threads}
        self.backend = note or backend
        self.report.meta["backend"] = self.backend
        if backend == "fx":
            self._runner = self.graph_module
        elif backend == "onnxruntime":
            from .backends.onnxruntime import OrtRunner

            self._runner = OrtRunner(self.onnx_model, providers=providers, threads=threads)
        elif backend in ("tensorrt", "tensorrt-rtx"):
            self._runner = _LazyTrtRunner(self.engine, backend, runnable)
        else:
            self._runner = None

    def __call__(self, *inputs: Any) -> Any:
        if self._runner is None:
            raise BackendUnavailable(f"this model was compiled for target '{self.target}', which builds an "
                                     "artifact but does not run; compile with target='onnxruntime' to run it")
        if len(inputs) != len(self.inputs):
            raise InputError(f"the compiled model takes {len(self.inputs)} input(s) "
                             f"({', '.join(s['name'] for s in self.inputs)}); got {len(inputs)}")
        with torch.no_grad():
            return self._runner(*inputs)

    def __repr__(self) -> str:
        return f"Compiled(target={self.target!r}, backend={self.backend!r}, pipeline={self.pipeline!r})"

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the artifact directory; returns its path."""
        import onnx

        out = Path(directory)
        (out / "graphs").mkdir(parents=True, exist_ok=True)
        model = self.onnx_model
        if model is None:
            if self.lower is None or self.graph_module is None:
                raise ArtifactError("nothing to save: this Compiled has neither an ONNX model nor a graph to export")
            model = self.lower(self.graph_module)
        inputs, outputs = self._io_specs(model)
        files: list[str] = []
        graphs = {snap.filename for snap in self.snapshots}
        for stale in (out / "graphs").glob("*.fxg"):  # left by an earlier save: the manifest would not list it
            if stale.name not in graphs:
                stale.unlink()
        onnx.save_model(model, str(out / "model.onnx"))
        files.append("model.onnx")
        if self.engine is not None:
            (out / ENGINE).write_bytes(self.engine)
            files.append(ENGINE)
        elif (out / ENGINE).exists():  # left by an earlier save: load() would refuse it as unlisted
            (out / ENGINE).unlink()
        self.report.save(out / "report.json")
        files.append("report.json")
        for snap in self.snapshots:
            (out / "graphs" / snap.filename).write_text(snap.text, encoding="utf-8")
            files.append(f"graphs/{snap.filename}")
        runnable = "onnxruntime" if self.backend.startswith("onnxruntime") or self.target in ("fx", "onnx") \
            else self.target
        manifest = {
            "format": "fxcompress-artifact",
            "format_version": FORMAT_VERSION,
            "versions": library_versions(),
            "target": self.target,
            "backend": self.backend,
            "load_backend": runnable,
            "pipeline": self.pipeline,
            "pipeline_full": self.pipeline_full,
            "inputs": inputs,
            "outputs": outputs,
            "engine": self.engine_info or None,
            "source": self.source,
            "snapshots": [{"index": s.index, "name": s.name, "stage": s.stage, "file": f"graphs/{s.filename}"}
                          for s in self.snapshots],
            "files": {f: _sha256(out / f) for f in files},
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return out


class _LazyTrtRunner:
    """Deserializes the engine on first call: building works on a CPU, running needs a GPU."""

    def __init__(self, engine: bytes | None, target: str, runnable: Sequence[str] = ()) -> None:
        self.engine, self.target, self._runner = engine, target, None
        self.runnable = [b for b in runnable if b not in _ENGINE_MODULES]

    def __call__(self, *inputs: Any) -> Any:
        if self._runner is None:
            from .backends.tensorrt import TrtRunner

            if self.engine is None:
                raise BackendUnavailable(f"no {self.target} engine in this artifact; it can run on: "
                                         f"{', '.join(self.runnable) or 'nothing'} (use_backend(...) or load(dir, backend=...))")
            self._runner = TrtRunner(self.engine, self.target)
        return self._runner(*inputs)


def _inside(root: Path, rel: Any, manifest: Path) -> None:
    """Refuse a manifest path that is absolute or leaves the artifact directory (``..``, symlinks)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or \
            not (root / rel).resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{manifest}: file path {rel!r} leaves the artifact directory {root}; a manifest may "
                            "only name files inside it (relative paths without '..')")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory, checked: format version known, every file's hash right."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} is not an fxcompress artifact: {MANIFEST} is missing "
                            "(save one with Compiled.save(dir))")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    version = manifest.get("format_version")
    if manifest.get("format") != "fxcompress-artifact" or version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unknown artifact format version {version!r}; this fxcompress reads "
                            f"version {FORMAT_VERSION} (re-save it with this version)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{path}: the manifest lists no files (its 'files' map is missing or empty), so "
                            "nothing can be verified; re-save the artifact")
    for rel in files:
        _inside(root, rel, path)
    if (root / ENGINE).exists() and ENGINE not in files:
        raise ArtifactError(f"{root / ENGINE} is not listed in the manifest, so its sha256 cannot be checked; "
                            "refusing to load an unverified engine (delete it, or re-save the artifact)")
    required = ["model.onnx", "report.json",
                *(s.get("file") for s in manifest.get("snapshots") or [] if isinstance(s, dict))]
    for rel in required:
        if rel not in files:
            raise ArtifactError(f"{path}: {rel} is not listed in the manifest's files, so its sha256 cannot be "
                                "checked; refusing to load it (re-save the artifact)")
    for rel, digest in files.items():
        file = root / rel
        if not file.is_file():
            raise ArtifactError(f"{file} is listed in the manifest but missing")
        actual = _sha256(file)
        if actual != digest:
            raise ArtifactError(f"{file} was modified after saving: sha256 {actual[:12]}... does not match the "
                                f"manifest's {digest[:12]}...; re-save the artifact")
    return manifest


def load(directory: str | Path, *, backend: str | None = None, providers: Sequence[str] | None = None,
         threads: int | None = None) -> Compiled:
    """Rebuild a runnable ``Compiled`` from an artifact directory, without the source model.

    ``backend`` (default: the manifest's ``load_backend``, ONNX Runtime unless a TensorRT engine
    was saved) is one of ``BACKENDS`` the artifact can run on; ``Compiled.backend`` names what it
    runs on (an artifact compiled for ``fx`` or ``onnx`` runs on ONNX Runtime), ``target`` the
    target it was compiled for."""
    import onnx

    root = Path(directory)
    manifest = read_manifest(root)
    model = onnx.load_model(str(root / "model.onnx"))
    report = Report.from_dict(json.loads((root / "report.json").read_text(encoding="utf-8")))
    snapshots = [Snapshot(s["index"], s["name"], s["stage"], (root / s["file"]).read_text(encoding="utf-8"))
                 for s in manifest.get("snapshots", [])]
    engine_path = root / ENGINE if ENGINE in manifest["files"] else None
    compiled = Compiled(
        graph_module=None, onnx_model=model, report=report, snapshots=snapshots, pipeline=manifest["pipeline"],
        target=manifest["target"], inputs=manifest["inputs"], outputs=manifest["outputs"],
        engine=engine_path.read_bytes() if engine_path else None, engine_info=manifest.get("engine") or {},
        source=manifest.get("source"), pipeline_full=manifest.get("pipeline_full"))
    chosen = backend or manifest.get("load_backend", "onnxruntime")
    saved = manifest.get("backend")
    note = saved if isinstance(saved, str) and saved.split(" ", 1)[0] == chosen else None
    compiled.use_backend(chosen, providers=providers, threads=threads, note=note)
    return compiled
