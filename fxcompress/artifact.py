"""``Compiled``: the runnable result of ``compile``, and its save/load (never pickle).

An artifact directory holds ``model.onnx`` (and ``model.onnx.data``, its weights as ONNX external data, over
protobuf's 2 GiB), ``model.engine`` (TensorRT targets),
``report.json``, ``graphs/NN_<step>.fxg`` and ``manifest.json``: format version, library
versions, the pipeline string (canonical, defaults dropped) and ``pipeline_full`` (every option
written out, so the artifact reproduces even if a default changes), target and backend,
input/output specs, engine build options, the sha256 of every file and a ``digest`` of the
manifest itself (so of the whole artifact).

``save`` writes a complete artifact into a temporary directory beside the target and swaps it in
with one rename (see ``Compiled.save``); it only ever removes files a previous manifest listed.
``load`` imports and runs nothing the artifact names; it reads every file through one directory
descriptor and refuses an unknown format version, a malformed or edited manifest, a file whose
hash does not match, a required file the manifest does not list, an unlisted file named like an
artifact's (other unlisted files are ignored with a warning) and any manifest path that leaves
the directory. Input/output names are the ONNX graph's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import signal
import sys
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import onnx
import torch

from .backends.onnxruntime import OrtRunner
from .backends.tensorrt import TrtRunner
from .errors import ArtifactError, BackendUnavailable, FxCompressError, InputError
from .onnx_graph import load_external_data, needs_external_data, with_external_data
from .pipeline import Snapshot
from .registry import expand_pipeline
from .report import Report
from .verify import flatten_outputs

#: 2: the manifest carries a digest of itself (and so of the whole artifact)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ENGINE = "model.engine"
#: the initializers of a model over protobuf's 2 GiB (``onnx_graph.EXTERNAL_DATA_THRESHOLD``), as ONNX external data
ONNX_DATA = "model.onnx.data"
#: what ``Compiled.use_backend`` accepts
BACKENDS = ("fx", "onnxruntime", "tensorrt", "tensorrt-rtx", "none")
_ENGINE_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def full_pipeline(pipeline: str) -> str | None:
    """``pipeline`` with every option written out; None when it names a pass that is not registered
    (a class used only as a Python object), which no pipeline string can rebuild anyway."""
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
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the artifact directory, whole or not at all; returns its path.

        The files are written into a temporary directory beside ``directory``, which then replaces
        it in one rename: a reader sees the old artifact or the new one, never a mix, and an
        interrupted save leaves the old one as it was. Only files the previous manifest listed are
        removed; other files in the directory are kept. A directory that is not empty and is not an
        artifact (or holds unlisted files named like an artifact's) is refused unless
        ``overwrite=True``, which replaces the files named like an artifact's and keeps the rest."""
        out = Path(directory)
        target = out.resolve()
        kept = check_save_target(target, overwrite)
        model = self.onnx_model
        if model is None:
            if self.lower is None or self.graph_module is None:
                raise ArtifactError("nothing to save: this Compiled has neither an ONNX model nor a graph to export")
            model = self.lower(self.graph_module)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.fxc-tmp"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise ArtifactError(f"cannot write the artifact {out}: {exc.strerror} in {target.parent} (save "
                                "writes a temporary directory beside the target); choose a writable directory") \
                from exc
        try:
            self._write(tmp, model)
            for rel in kept:
                _carry(target / rel, tmp / rel)
            _swap(tmp, target)
        finally:
            if tmp.exists():  # a failed or interrupted save, or the replaced artifact
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    def _write(self, out: Path, model: Any) -> None:
        """Every file of the artifact, manifest last, into the (new, empty) directory ``out``."""
        (out / "graphs").mkdir()
        inputs, outputs = self._io_specs(model)
        files: list[str] = ["model.onnx"]
        if needs_external_data(model):
            with (out / ONNX_DATA).open("wb") as data:
                model = with_external_data(model, ONNX_DATA, write=data.write)
            files.append(ONNX_DATA)
        (out / "model.onnx").write_bytes(model.SerializeToString())
        if self.engine is not None:
            (out / ENGINE).write_bytes(self.engine)
            files.append(ENGINE)
        self.report.save(out / "report.json")
        files.append("report.json")
        for snap in self.snapshots:
            (out / "graphs" / snap.filename).write_text(snap.text, encoding="utf-8")
            files.append(f"graphs/{snap.filename}")
        runnable = "onnxruntime" if self.backend.startswith("onnxruntime") or self.target in ("fx", "onnx") \
            else self.target
        write_manifest(out, {
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
        })


class _LazyTrtRunner:
    """Deserializes the engine on first call: building works on a CPU, running needs a GPU."""

    def __init__(self, engine: bytes | None, target: str, runnable: Sequence[str] = ()) -> None:
        self.engine, self.target, self._runner = engine, target, None
        self.runnable = [b for b in runnable if b not in _ENGINE_MODULES]

    def __call__(self, *inputs: Any) -> Any:
        if self._runner is None:
            if self.engine is None:
                raise BackendUnavailable(f"no {self.target} engine in this artifact; it can run on: "
                                         f"{', '.join(self.runnable) or 'nothing'} (use_backend(...) or load(dir, backend=...))")
            self._runner = TrtRunner(self.engine, self.target)
        return self._runner(*inputs)


# -- the manifest: digest, schema ------------------------------------------------------------------
def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its ``digest`` entry, as sorted compact JSON. The manifest holds
    the sha256 of every other file, so this one digest covers the whole artifact."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` into ``directory`` with its ``digest`` (recomputed)."""
    signed = {**manifest, "digest": manifest_digest(manifest)}
    (Path(directory) / MANIFEST).write_text(json.dumps(signed, indent=2) + "\n", encoding="utf-8")


_SPEC_KEYS = {"name": str, "shape": list, "dtype": str}
_SNAPSHOT_KEYS = {"index": int, "name": str, "stage": str, "file": str}
#: top-level manifest entries and their JSON types (None: null allowed)
_MANIFEST_KEYS: dict[str, tuple[type, ...]] = {
    "target": (str,), "backend": (str,), "load_backend": (str,), "pipeline": (str,),
    "pipeline_full": (str, type(None)), "inputs": (list,), "outputs": (list,), "engine": (dict, type(None)),
    "source": (dict, type(None)), "snapshots": (list,), "files": (dict,), "versions": (dict,),
    "digest": (str,),
}
_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", type(None): "null",
               float: "a number", bool: "a boolean"}


def _json_kind(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _malformed(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}: malformed manifest: {what}; it was not written by Compiled.save (re-save "
                         "the artifact, or recompile the model)")


def _check_entries(path: Path, key: str, items: list[Any], fields: dict[str, type]) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _malformed(path, f"'{key}[{i}]' is {_json_kind(item)}, expected an object")
        for field_name, tp in fields.items():
            value = item.get(field_name)
            if not isinstance(value, tp) or isinstance(value, bool):
                got = "missing" if field_name not in item else _json_kind(value)
                raise _malformed(path, f"'{key}[{i}].{field_name}' is {got}, expected {_JSON_NAMES[tp]}")


def parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """The manifest in ``data`` (the bytes of ``path``), checked without touching any other file:
    JSON object, known format version, digest, every entry of the right type."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not text (byte {exc.start} is not UTF-8); it is not an fxcompress "
                            "manifest (re-save the artifact)") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise _malformed(path, f"the file holds {_json_kind(manifest)}, not an object")
    version = manifest.get("format_version")
    if manifest.get("format") != "fxcompress-artifact" or version != FORMAT_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION
        fix = "recompile the model with this fxcompress" if older else "re-save it with this version"
        raise ArtifactError(f"{path}: unknown artifact format version {version!r}; this fxcompress reads "
                            f"version {FORMAT_VERSION} ({fix})")
    if "digest" not in manifest:
        raise _malformed(path, "'digest' is missing")
    if manifest["digest"] != manifest_digest(manifest):
        raise ArtifactError(f"{path} was modified after saving: its digest does not match its content; re-save "
                            "the artifact (a tool that edits a manifest rewrites it with "
                            "fxcompress.artifact.write_manifest)")
    if not manifest.get("files"):
        raise ArtifactError(f"{path}: the manifest lists no files (its 'files' map is missing or empty), so "
                            "nothing can be verified; re-save the artifact")
    for key, types in _MANIFEST_KEYS.items():
        if key not in manifest:
            if types[-1] is type(None):
                continue
            raise _malformed(path, f"'{key}' is missing")
        if not isinstance(manifest[key], types) or isinstance(manifest[key], bool):
            raise _malformed(path, f"'{key}' is {_json_kind(manifest[key])}, expected "
                                   f"{' or '.join(_JSON_NAMES[t] for t in types)}")
    for key in ("inputs", "outputs"):
        _check_entries(path, key, manifest[key], _SPEC_KEYS)
    _check_entries(path, "snapshots", manifest["snapshots"], _SNAPSHOT_KEYS)
    for rel, digest in manifest["files"].items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise _malformed(path, f"'files[{rel!r}]' is {_json_kind(digest)}, expected a sha256 hex digest")
    return manifest


# -- reading one directory consistently --------------------------------------------------------------
def _artifact_kind(rel: str) -> bool:
    """Whether ``rel`` is named like one of an artifact's own files (which load refuses unlisted)."""
    return rel in ("model.onnx", ONNX_DATA, ENGINE, "report.json", MANIFEST) or \
        (rel.startswith("graphs/") and rel.endswith(".fxg"))


class _Dir:
    """An artifact directory read through one open descriptor: every file comes from the same
    directory even if a concurrent save swaps another one in under its name meanwhile."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if _DIR_FD else None

    def read(self, rel: str) -> bytes:
        if self.fd is None:
            return (self.root / rel).read_bytes()
        fd = os.open(rel, os.O_RDONLY, dir_fd=self.fd)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def files(self) -> list[str]:
        """Every file (and symlink) under the directory, as relative POSIX paths."""
        if self.fd is None:
            return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if not p.is_dir()]
        found = []
        for top, _, names, _ in os.fwalk(".", dir_fd=self.fd):
            found += [os.path.normpath(os.path.join(top, n)).replace(os.sep, "/") for n in names]
        return found

    def replaced(self) -> bool:
        """Whether another directory took this one's name since it was opened (a concurrent save)."""
        if self.fd is None:
            return False
        try:
            return os.stat(self.root).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "fwalk")


def _consistent(root: Path, read: Callable[[_Dir], Any]) -> Any:
    """``read(dir)`` of the directory at ``root``; retried (a few times) when a concurrent save
    replaced the directory while it was being read."""
    for attempt in range(5):
        d = _Dir(root)
        try:
            return read(d)
        except (ArtifactError, OSError):
            if attempt == 4 or not d.replaced():
                raise
        finally:
            d.close()
    raise AssertionError("unreachable")


def _inside(root: Path, rel: Any, manifest: Path) -> None:
    """Refuse a manifest path that is absolute or leaves the artifact directory (``..``, symlinks)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or \
            not (root / rel).resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{manifest}: file path {rel!r} leaves the artifact directory {root}; a manifest may "
                            "only name files inside it (relative paths without '..')")


def _read_checked(d: _Dir) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and the bytes of every file it lists, each checked against its sha256."""
    root = d.root
    path = root / MANIFEST
    try:
        data = d.read(MANIFEST)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ArtifactError(f"{root} is not an fxcompress artifact: {MANIFEST} is missing "
                            "(save one with Compiled.save(dir))") from None
    manifest = parse_manifest(data, path)
    files = manifest["files"]
    for rel in files:
        _inside(root, rel, path)
    required = ["model.onnx", "report.json", *(s["file"] for s in manifest["snapshots"])]
    for rel in required:
        if rel not in files:
            raise ArtifactError(f"{path}: {rel} is not listed in the manifest's files, so its sha256 cannot be "
                                "checked; refusing to load it (re-save the artifact)")
    present = set(d.files())
    ignored = []
    for rel in sorted(present - set(files) - {MANIFEST}):
        if _artifact_kind(rel):
            what = "engine" if rel == ENGINE else "file"
            raise ArtifactError(f"{root / rel} is not listed in the manifest, so its sha256 cannot be "
                                f"checked; refusing to load an unverified {what} (delete it, or re-save the "
                                "artifact)")
        ignored.append(rel)
    contents: dict[str, bytes] = {}
    for rel, digest in files.items():
        try:
            contents[rel] = d.read(rel)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ArtifactError(f"{root / rel} is listed in the manifest but missing") from None
        actual = hashlib.sha256(contents[rel]).hexdigest()
        if actual != digest:
            raise ArtifactError(f"{root / rel} was modified after saving: sha256 {actual[:12]}... does not "
                                f"match the manifest's {digest[:12]}...; re-save the artifact")
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        warnings.warn(f"{root}: ignoring {shown}: not part of the artifact (its manifest does not list "
                      "them); nothing in an artifact directory is imported or run", stacklevel=4)
    return manifest, contents


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory, checked: format version known, digest and every
    file's hash right, no unlisted file named like an artifact's."""
    return _consistent(Path(directory), _read_checked)[0]


def _listed(d: _Dir) -> tuple[set[str] | None, str, list[str]]:
    """``(files the manifest lists or None, why it is not an artifact, every file present)``."""
    present = d.files()
    if MANIFEST not in present:
        return None, f"it has no {MANIFEST}", present
    try:
        manifest = parse_manifest(d.read(MANIFEST), d.root / MANIFEST)
    except ArtifactError as exc:
        return None, str(exc), present
    return set(manifest["files"]) | {MANIFEST}, "", present


def check_save_target(target: Path, overwrite: bool = False) -> list[str]:
    """What ``Compiled.save`` checks before writing anything: raises ``ArtifactError`` where it
    would refuse ``target``; else the files it keeps there (carried into the new artifact), those a
    previous manifest did not list."""
    if not target.exists():
        return []
    if not target.is_dir():
        raise ArtifactError(f"{target} is a file, not a directory; give save() a directory path for the "
                            "artifact (the file is left as it is)")
    listed, why, present = _consistent(target, _listed)
    if not present:
        return []
    if listed is None:
        if not overwrite:
            raise ArtifactError(f"{target} is not empty and is not an fxcompress artifact ({why}); saving there "
                                "would replace or mix with its files: give a new or empty directory, or pass "
                                "overwrite=True (files named like an artifact's - model.onnx, model.engine, "
                                "report.json, manifest.json, graphs/*.fxg - are then replaced, the others "
                                "kept)")
        return [rel for rel in present if not _artifact_kind(rel)]
    unlisted = sorted(rel for rel in present if rel not in listed)
    clash = [rel for rel in unlisted if _artifact_kind(rel)]
    if clash and not overwrite:
        raise ArtifactError(f"{target / clash[0]} is not listed in the artifact's manifest; save only removes "
                            "files a previous manifest listed: move it away, or pass overwrite=True to replace it")
    return [rel for rel in unlisted if not _artifact_kind(rel)]


# -- writing: temporary directory, one rename ------------------------------------------------------------
def _carry(src: Path, dst: Path) -> None:
    """Keep the user's file ``src`` in the new artifact directory: a hard link (no copy), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except FileNotFoundError:
        return
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) and SIGTERM wait until the block ends (main thread, POSIX)."""
    blocked = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target``: one rename when ``target`` does not exist
    (or is empty), else an atomic exchange (``new`` then holds the old artifact, for the caller to
    remove). Concurrent saves end with one complete artifact: the last rename wins."""
    with _signals_deferred():
        for _ in range(100):
            try:
                os.rename(new, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            try:
                if _exchange(new, target):
                    return
            except FileNotFoundError:  # another save moved it away meanwhile: rename again
                continue
            aside = new.with_name(new.name + ".old")  # no atomic exchange here: move the old one aside
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue
            try:
                os.rename(new, target)
            except OSError:
                os.rename(aside, target)
                raise
            shutil.rmtree(aside, ignore_errors=True)
            return
    raise ArtifactError(f"could not move the new artifact into {target}: other processes keep replacing it")


def _onnx_model(contents: dict[str, bytes], root: Path) -> Any:
    """``model.onnx`` with its external data (if any) filled in from the verified bytes of ``ONNX_DATA``."""
    model = onnx.load_model_from_string(contents["model.onnx"])
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        if ONNX_DATA not in contents:
            raise ArtifactError(f"{root / 'model.onnx'} keeps its weights in external data, but the manifest lists no "
                                f"{ONNX_DATA}, so they cannot be verified; re-save the artifact")
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        if locations - {ONNX_DATA}:
            raise ArtifactError(f"{root / 'model.onnx'} refers to external data {sorted(locations - {ONNX_DATA})}; an "
                                f"artifact keeps its weights only in {ONNX_DATA}; re-save the artifact")
        load_external_data(model, contents.pop(ONNX_DATA))
    return model


def load(directory: str | Path, *, backend: str | None = None, providers: Sequence[str] | None = None,
         threads: int | None = None) -> Compiled:
    """Rebuild a runnable ``Compiled`` from an artifact directory, without the source model.

    Nothing in the directory is imported or run: the manifest is data (``source`` is only
    recorded, never called), the model is ONNX, the engine is given to TensorRT only when used.
    ``backend`` (default: the manifest's ``load_backend``, ONNX Runtime unless a TensorRT engine
    was saved) is one of ``BACKENDS`` the artifact can run on; ``Compiled.backend`` names what it
    runs on (an artifact compiled for ``fx`` or ``onnx`` runs on ONNX Runtime), ``target`` the
    target it was compiled for."""
    root = Path(directory)
    manifest, contents = _consistent(root, _read_checked)
    try:
        model = _onnx_model(contents, root)
        report = Report.from_dict(json.loads(contents["report.json"].decode("utf-8")))
        snapshots = [Snapshot(s["index"], s["name"], s["stage"], contents[s["file"]].decode("utf-8"))
                     for s in manifest["snapshots"]]
    except Exception as exc:  # noqa: BLE001 - hashes matched, so the artifact was written broken or re-signed
        raise ArtifactError(f"{root}: a file of the artifact cannot be read ({type(exc).__name__}: {exc}); "
                            "re-save the artifact") from exc
    compiled = Compiled(
        graph_module=None, onnx_model=model, report=report, snapshots=snapshots, pipeline=manifest["pipeline"],
        target=manifest["target"], inputs=manifest["inputs"], outputs=manifest["outputs"],
        engine=contents.get(ENGINE), engine_info=manifest.get("engine") or {},
        source=manifest.get("source"), pipeline_full=manifest.get("pipeline_full"))
    chosen = backend or manifest["load_backend"]
    saved = manifest["backend"]
    note = saved if saved.split(" ", 1)[0] == chosen else None
    compiled.use_backend(chosen, providers=providers, threads=threads, note=note)
    return compiled
