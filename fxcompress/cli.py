"""The ``fxcompress`` command line: compile, inspect, diff, bench, compare, demo.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import onnx
import torch
import typer
from rich.console import Console
from rich.table import Table

from . import bench as b
from . import compare as cmp
from .api import compile as fx_compile
from .artifact import check_save_target, load, read_manifest
from .cli_data import CLI_CAPABILITIES, CliError, check_data_files, check_pipeline_data, compile_data
from .demo import run_demo
from .errors import ArtifactError, BackendUnavailable, FxCompressError, InputError, PassOrderWarning
from .graph_text import diff as text_diff
from .graph_text import read_fxg, to_text
from .onnx_graph import to_graph
from .options import describe_options
from .ordering import CONTEXT_CAPABILITIES
from .pass_base import PassContext
from .registry import available, catalogue_markdown, recipes
from .report import Report
from .report_html import write_html

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress PyTorch models through torch.fx passes, lowered to ONNX Runtime and TensorRT.")
# Piped or captured output (CI logs, `| tee`) gets rich's 80 columns by default, too narrow for the
# report tables; a terminal keeps its own width.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1x3x224x224"`` or ``"1x3x8x8,1x10"`` (several inputs) -> shapes."""
    parts = text.split(",")
    if len(parts) > 1 and all(p.strip().isdigit() for p in parts):
        dims = [p.strip() for p in parts]
        raise CliError(f"--input-shape {text!r} reads as {len(parts)} inputs of one dimension each; for one "
                       f"input of shape ({', '.join(dims)}) write {'x'.join(dims)} ('x' between dimensions, ',' "
                       "only between inputs)")
    shapes = []
    for part in parts:
        try:
            dims = tuple(int(d) for d in part.strip().lower().split("x"))
        except ValueError:
            raise CliError(f"--input-shape {text!r}: write each shape as integers joined by 'x', e.g. 1x3x224x224; "
                           "separate several inputs with ','") from None
        if not dims or any(d <= 0 for d in dims):
            raise CliError(f"--input-shape {text!r}: dimensions must be positive integers")
        shapes.append(dims)
    return shapes


def load_factory(spec: str) -> Any:
    """Import ``module:factory`` and call it; returns its result."""
    if ":" not in spec:
        raise CliError(f"model {spec!r}: expected 'module:factory', e.g. mypkg.models:make_model")
    mod_name, attr = spec.split(":", 1)
    sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CliError(f"model {spec!r}: cannot import module '{mod_name}': {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: name it
        raise CliError(f"model {spec!r}: importing module '{mod_name}' raised {type(exc).__name__}: {exc} "
                       "(fix the module; --debug shows the traceback)") from exc
    finally:
        sys.path.pop(0)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CliError(f"model {spec!r}: module '{mod_name}' has no callable '{attr}'")
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: name it
        raise CliError(f"model {spec!r}: the factory {attr}() raised {type(exc).__name__}: {exc} "
                       "(fix the factory; --debug shows the traceback)") from exc


def _model_and_inputs(spec: str, input_shape: Optional[str]) -> tuple[Any, tuple[Any, ...]]:
    shapes = parse_shapes(input_shape) if input_shape else None
    made = load_factory(spec)
    example = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, example = made
    if not isinstance(made, torch.nn.Module):
        raise CliError(f"model {spec!r}: the factory returned {type(made).__name__}, not a torch.nn.Module "
                       "(or a (model, example_inputs) pair)")
    if shapes:
        example = tuple(torch.randn(*s) for s in shapes)
    if example is None:
        raise CliError(f"model {spec!r}: give --input-shape (e.g. 1x3x224x224) or return (model, example_inputs)")
    return made, example if isinstance(example, tuple) else (example,)


#: the Python API's advice in library messages, and what a command-line user does instead
_API_TO_CLI = (
    ("pass calibration= to fxcompress.compile()", "give --calibration samples.npy"),
    ("pass train_data= to fxcompress.compile()", "give --train-data inputs.npy"),
    ("pass train_data= or calibration= to fxcompress.compile()", "give --train-data or --calibration"),
    ("save one with Compiled.save(dir)", "make one with `fxcompress compile ... --out DIR`"),
    ("pass target='tensorrt-rtx' or 'tensorrt'", "give --target tensorrt-rtx or --target tensorrt"),
    ("pass overwrite=True", "give --overwrite"),
    ("give save() a directory path", "give --out a directory path"),
)
#: compile()'s keyword arguments that are also compile's flags: ``target='x'`` -> ``--target x``
_KEYWORD_FLAG = re.compile(r"\b(target|fallback|precision)='([\w-]+)'")


def cli_hints(message: str) -> str:
    """``message`` with the Python API's advice (``calibration=``, ``fallback=...``) replaced by the
    command-line flags that do the same."""
    for cap, fix in CONTEXT_CAPABILITIES.items():
        if cap in CLI_CAPABILITIES:
            message = message.replace(fix, CLI_CAPABILITIES[cap])
    for api, cli in _API_TO_CLI:
        message = message.replace(api, cli)
    return _KEYWORD_FLAG.sub(r"--\1 \2", message)


@app.command("compile")
def compile_cmd(
    model: Optional[str] = typer.Argument(None, help="module:factory returning the model (or (model, inputs))."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1x3x224x224; ',' between inputs."),
    passes: str = typer.Option("", "--passes", help='Pipeline string, e.g. "fold-batchnorm,prune-channels{ratio=0.5}".'),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="A named pipeline (see --list-recipes)."),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="List the named pipelines and exit."),
    target: str = typer.Option("onnxruntime", "--target", help="fx | onnx | onnxruntime | tensorrt | tensorrt-rtx"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | int8 | best (TensorRT)"),
    frontend: str = typer.Option("auto", "--frontend",
                                 help="auto | fx | export: symbolic tracing, torch.export, or tracing with export "
                                      "where tracing fails (default)."),
    fallback: Optional[str] = typer.Option(None, "--fallback", help="onnxruntime: run there when TensorRT cannot."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", "--calib",
        help="Calibration samples: .npy (one input, samples on axis 0) or .npz (keyed by input name)."),
    train_data: Optional[Path] = typer.Option(
        None, "--train-data", help="Training inputs for fine-tune/distill recipes: .npy or .npz like --calibration; "
                                   "also the calibration data when --calibration is not given."),
    train_targets: Optional[Path] = typer.Option(
        None, "--train-targets", help=".npy with one target per --train-data sample (class indices or floats)."),
    batch: int = typer.Option(32, "--batch", help="Batch size for --calibration and --train-data."),
    out: Path = typer.Option(Path("out"), "--out", help="Artifact directory to write."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Write --out even if it is a non-empty directory that is not an artifact (files "
                                   "named like an artifact's are replaced, others kept)."),
    report_html: Optional[Path] = typer.Option(None, "--report-html", help="Also write an HTML report here."),
) -> None:
    """Compile a model and save the artifact (model.onnx, manifest.json, report.json, graphs/)."""
    if list_recipes:
        for name, text in recipes().items():
            console.print(f"{name:22s} {text}", markup=False, highlight=False)
        return
    if model is None:
        raise CliError("compile needs a model: fxcompress compile mypkg.models:make_model --input-shape 1x3x32x32")
    if recipe and passes:
        raise CliError("give --passes or --recipe, not both")
    if recipe:
        table = recipes()
        if recipe not in table:
            raise CliError(f"unknown recipe {recipe!r}; known: {', '.join(table)}")
        passes = table[recipe]

    check_out(out, overwrite)
    check_data_files(calibration=calibration, train_data=train_data, train_targets=train_targets)
    check_pipeline_data(passes, calibration=calibration is not None or train_data is not None,
                        train_data=train_data is not None, train_targets=train_targets is not None)
    module, example = _model_and_inputs(model, input_shape)
    calib, train, notes = compile_data(module, example, calibration, train_data, train_targets, batch)
    for note in notes:
        console.print(note, markup=False, highlight=False)
    with _order_warnings_to_stderr():
        compiled = fx_compile(module, example, passes, target=target, precision=precision, fallback=fallback,
                              calibration=calib, train_data=train, frontend=frontend)
    compiled.source = {"factory": model, "input_shape": input_shape}
    compiled.save(out, overwrite=overwrite)
    console.print(compiled.report.table())
    console.print(f"backend: {compiled.backend}", markup=False)
    if report_html:
        write_html(compiled.report, report_html, snapshots=compiled.snapshots)
        console.print(f"wrote {report_html}", markup=False)
    console.print(f"wrote {out}/", markup=False)


@contextlib.contextmanager
def _order_warnings_to_stderr() -> Iterator[None]:
    """Print pass-order warnings to stderr as they are found (before any pass runs), as
    ``warning: ...`` lines; other warnings keep Python's own display."""
    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, PassOrderWarning):
            Console(stderr=True, soft_wrap=True).print(f"warning: {message}", markup=False, highlight=False)
        else:
            shown(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", PassOrderWarning)
        warnings.showwarning = show
        yield


def check_out(out: Path, overwrite: bool) -> None:
    """Before any long work: ``--out`` can be written as an artifact directory (the checks
    ``Compiled.save`` makes, and a writable parent), in ``--out``'s terms."""
    try:
        check_save_target(out.resolve(), overwrite)
    except ArtifactError as exc:
        raise CliError(f"--out {out}: {cli_hints(str(exc))}") from None
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"--out {out}: {parent} is a file, so no directory can be made under it; give another "
                       "--out")
    try:
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise CliError(f"--out {out}: cannot write in {parent} ({exc.strerror}); give a writable --out "
                       "directory") from None


def _inspections(model: Any, shapes: list[tuple[int, ...]] | None, target: str | None = None
                 ) -> list[tuple[str, list[Any]]]:
    """``(pass name, diagnostics)`` of every registered ONNX pass that declares ``inspects``, run on
    ``model`` like any pass; ``shapes`` (example input shapes) become its example inputs (e.g. the
    optimization profiles of dynamic inputs), ``target`` the context's compile target."""
    inputs = tuple(torch.zeros(s) for s in shapes or ())
    out = []
    for name, cls in available().items():
        if cls.stage == "onnx" and cls.inspects:
            out.append((name, cls().run(to_graph(model), PassContext(inputs, target=target or "onnx")).diagnostics))
    return out


@app.command("passes")
def list_passes(markdown: bool = typer.Option(False, "--markdown", help="Print the catalogue as Markdown.")) -> None:
    """List every registered pass with its options."""
    if markdown:
        console.print(catalogue_markdown(), markup=False, highlight=False)
        return

    table = Table(title="passes")
    for col in ("pass", "stage", "exact", "options"):
        table.add_column(col)
    for name, cls in available().items():
        opts = ", ".join(f"{o}={d}" for o, _, d in describe_options(cls))
        table.add_row(name, cls.stage, "yes" if cls.exact else "no", opts)
    console.print(table)


@app.command()
def inspect(path: Path = typer.Argument(..., help="An artifact directory, a .onnx file or a .fxg file."),
            input_shape: Optional[str] = typer.Option(
                None, "--input-shape", help="Example input shape(s): profiles for dynamic dims (an artifact's "
                                            "default: the shapes it was compiled with).")
            ) -> None:
    """Print a graph's canonical text, for artifacts the per-pass report, and TensorRT compatibility."""
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    if path.is_dir():
        manifest = read_manifest(path)
        snaps = manifest.get("snapshots") or []
        if snaps:
            console.print((path / snaps[-1]["file"]).read_text(encoding="utf-8"), markup=False, highlight=False)
        report = Report.from_dict(json.loads((path / "report.json").read_text(encoding="utf-8")))
        console.print(report.table())
        console.print(f"target: {manifest['target']}  backend: {manifest['backend']}", markup=False)
        console.print(f"pipeline: {manifest['pipeline']}", markup=False, highlight=False)
        shapes = parse_shapes(input_shape) if input_shape else \
            [tuple(s["shape"]) for s in manifest.get("inputs") or []] or None
        _print_inspections(onnx.load_model(str(path / "model.onnx")), shapes, manifest.get("target"))
        return
    if path.suffix == ".fxg":
        console.print(path.read_text(encoding="utf-8"), markup=False, highlight=False)
        return
    model = _load_onnx(path)
    console.print(to_text(model), markup=False, highlight=False)
    _print_inspections(model, parse_shapes(input_shape) if input_shape else None)


def _print_inspections(model: Any, shapes: list[tuple[int, ...]] | None, target: str | None = None) -> None:
    """The findings (warnings and errors) of every inspection pass (see ``_inspections``), one line
    each, after its notes (info diagnostics, in parentheses); findings of one rule on several nodes
    print once, naming the nodes. ``target``: what an artifact was compiled for."""
    for name, diagnostics in _inspections(model, shapes, target):
        findings = [d for d in diagnostics if d.severity != "info"]
        console.print(f"{name}: {len(findings)} finding(s)", markup=False)
        for note in (d for d in diagnostics if d.severity == "info"):
            console.print(f"  ({note.message})", markup=False, highlight=False)
        groups: dict[tuple[str, str], list[Any]] = {}
        for f in findings:
            groups.setdefault((f.severity, f.rule or f.message), []).append(f)
        for group in groups.values():
            first = group[0]
            if len(group) == 1:
                where = f"[{first.node}] " if first.node else ""
                console.print(f"  {first.severity} {where}{first.message}", markup=False, highlight=False)
                continue
            nodes = [f.node for f in group if f.node]
            shown = ", ".join(nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
            console.print(f"  {first.severity} on {len(group)} nodes [{shown}]: {first.message}",
                          markup=False, highlight=False)


def graph_text(path: Path) -> str:
    """The canonical graph text of ``path``: an ``.fxg`` file as it is, a ``.onnx`` model rendered,
    an artifact directory's final graph (its ``model.onnx``, rendered)."""
    if not path.exists():
        raise CliError(f"{path}: no such file or directory")
    if path.is_dir():
        read_manifest(path)
        return _onnx_text(path / "model.onnx")
    if path.suffix == ".onnx":
        return _onnx_text(path)
    try:
        return read_fxg(path)
    except UnicodeDecodeError:
        raise CliError(f"{path}: not a graph text; give a .fxg file, a .onnx model or an artifact "
                       "directory") from None


def _load_onnx(path: Path) -> Any:
    try:
        return onnx.load_model(str(path))
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user error
        raise CliError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc


def _onnx_text(path: Path) -> str:
    return to_text(_load_onnx(path))


@app.command()
def diff(a: Path = typer.Argument(..., help="Before: a .fxg file, a .onnx model or an artifact directory."),
         b: Path = typer.Argument(..., help="After: the same kinds."),
         ) -> None:
    """Unified diff of two canonical graph texts; exit status 0 when identical, 1 when they differ."""
    out = text_diff(graph_text(a), graph_text(b), str(a), str(b))
    console.print(out or "(no differences)", markup=False, highlight=False)
    if out:
        raise typer.Exit(1)


#: what ``bench --backend`` can run an artifact on
BENCH_BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


@app.command()
def bench(
    path: Path = typer.Argument(..., help="An artifact directory."),
    compare_eager: bool = typer.Option(
        False, "--compare-eager", help="Also run the source model (give it with --original module:factory)."),
    original: Optional[str] = typer.Option(
        None, "--original", help="module:factory of the source model, for --compare-eager (never taken from the "
                                 "artifact)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Batch size (default: the compiled input's)."),
    iters: int = typer.Option(100, "--iters"),
    warmup: int = typer.Option(10, "--warmup"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    backend: Optional[str] = typer.Option(
        None, "--backend", help=f"{' | '.join(BENCH_BACKENDS)} (default: what the artifact was compiled to run "
                                "on); onnxruntime runs a TensorRT artifact's model.onnx on the CPU."),
) -> None:
    """Latency (median, p90), throughput, process peak RSS, weight and file bytes; side by side with eager."""
    if not path.is_dir():
        raise CliError(f"{path}: not an artifact directory (make one with `fxcompress compile ... --out DIR`)")
    if backend is not None and backend not in BENCH_BACKENDS:
        raise CliError(f"--backend {backend!r}: choose one of {', '.join(BENCH_BACKENDS)}")
    if batch is not None and batch < 1:
        raise CliError(f"--batch {batch}: the batch size must be a positive integer (default: the compiled "
                       "input's)")
    compiled = load(path, backend=backend)
    if compare_eager and not original:
        raise CliError(f"--compare-eager needs the source model: give --original module:factory"
                       f"{_recorded(compiled)} (an artifact never makes fxcompress import or run code it names)")
    shapes = [list(s["shape"]) for s in compiled.inputs]
    if batch:
        shapes = [[batch, *s[1:]] for s in shapes]
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(*s, generator=gen) for s in shapes)
    results = []
    baseline = None
    if compare_eager and original:
        eager, _ = _model_and_inputs(original, ",".join("x".join(map(str, s)) for s in shapes))
        baseline = b.benchmark(eager.eval(), inputs, name="eager (torch)", warmup=warmup, iters=iters)
        results.append(baseline)
    try:
        results.append(b.benchmark(compiled, inputs, name=f"compiled ({compiled.backend})", warmup=warmup,
                                   iters=iters, file_bytes=b.file_size(path)))
    except BackendUnavailable as exc:
        if compiled.backend.startswith("onnxruntime"):
            raise
        reason = cli_hints(getattr(exc, "reason", str(exc)))
        raise CliError(f"{reason}; to benchmark the model here, run it on ONNX Runtime: "
                       f"fxcompress bench {path} --backend onnxruntime") from exc
    console.print(b.table(results, baseline))
    if json_out:
        json_out.write_text(b.to_json(results, baseline) + "\n", encoding="utf-8")


def _recorded(compiled: Any) -> str:
    """A hint naming the factory the artifact says it was compiled from (shown, never imported)."""
    factory = (compiled.source or {}).get("factory")
    return f" (the artifact records {factory!r})" if isinstance(factory, str) and factory else ""


def artifact_precision(compiled: Any) -> str:
    """The precision an artifact was built with: its engine's build options, else the report's."""
    options = (compiled.engine_info or {}).get("options") or {}
    return str(options.get("precision") or compiled.report.meta.get("precision") or "fp32")


@app.command("compare")
def compare_cmd(
    path: Path = typer.Argument(..., help="An artifact directory."),
    inputs: Path = typer.Option(..., "--inputs", help=".npy (one input) or .npz (several, keyed by input name)."),
    original: Optional[str] = typer.Option(
        None, "--original", help="module:factory of the source model (never taken from the artifact)."),
    tolerance: Optional[str] = typer.Option(None, "--tolerance",
                                            help='Drift limits, e.g. "cosine=0.999,abs=1e-3" (abs: x max(1,|ref|max)).'),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the comparison as JSON here."),
    target: Optional[str] = typer.Option(
        None, "--target", help="tensorrt | tensorrt-rtx: the TensorRT side, built per layer on a GPU (default: "
                               "the artifact's target when it is one of these)."),
) -> None:
    """Per-layer error: original torch vs rewritten FX vs ONNX Runtime (vs TensorRT on a GPU)."""
    if not path.is_dir():
        raise CliError(f"{path}: not an artifact directory (make one with `fxcompress compile ... --out DIR`)")
    if target is not None and target not in cmp.TRT_TARGETS:
        raise CliError(f"--target {target!r}: choose one of {', '.join(cmp.TRT_TARGETS)} (ONNX Runtime is "
                       "always compared)")
    compiled = load(path, backend="none")
    try:
        tol = cmp.Tolerance.parse(tolerance) if tolerance else cmp.Tolerance()
    except InputError as exc:
        raise CliError(f"--tolerance: {exc}") from exc
    try:
        args = cmp.load_inputs(inputs, compiled.inputs)
    except InputError as exc:
        raise CliError(f"--inputs: {exc}") from exc
    notes: list[str] = []
    model = graph = None
    spec = original
    if spec:
        made = load_factory(spec)
        example = args
        if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
            made, example = made[0], made[1] if isinstance(made[1], tuple) else (made[1],)
        if not isinstance(made, torch.nn.Module):
            raise CliError(f"{spec!r}: the factory returned {type(made).__name__}, not a torch.nn.Module")
        model = made
        graph, why = cmp.rebuild_graph(model, example, compiled.pipeline)
        if why:
            notes.append(f"FX column omitted: {why}")
    else:
        notes.append(f"FX and original columns omitted: give the source model with --original module:factory"
                     f"{_recorded(compiled)}; an artifact never makes fxcompress import or run code it names")
    if target is None:
        target = compiled.target if compiled.target in cmp.TRT_TARGETS else None
    engine = compiled.engine if target == compiled.target else None
    result = cmp.compare(model, graph, compiled.onnx_model, args, engine=engine, target=target, tolerance=tol,
                         precision=artifact_precision(compiled))
    result.notes[:0] = notes
    result.stages = {stage: cli_hints(status) for stage, status in result.stages.items()}
    if console.is_terminal:
        console.print(result.table())
    else:  # a pipe or file: the full table, never squeezed to 80 columns
        console.print(result.render(), markup=False, highlight=False)
    for line in result.summary():
        console.print(line, markup=False, highlight=False)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", help="Where to write the artifact and HTML report."),
    quick: bool = typer.Option(False, "--quick", help="Fewer training and distillation epochs (for CI)."),
) -> None:
    """The whole story on scikit-learn's digits: train, compress, lower, measure."""
    run_demo(out=out, quick=quick, console=console)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except (CliError, FxCompressError, OSError) as exc:
        if _state["debug"]:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, FxCompressError):  # the library's advice is for Python callers
            first = cli_hints(first)
        Console(stderr=True, soft_wrap=True).print(f"error: {first}", markup=False, highlight=False)
        raise SystemExit(2) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # usage errors (bad option, missing argument)
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if _state["debug"]:
            raise
        detail = str(exc).splitlines()[0] if str(exc) else ""
        Console(stderr=True, soft_wrap=True).print(f"error: {type(exc).__name__}: {detail} (rerun with --debug for "
                                                   "the traceback)", markup=False, highlight=False)
        raise SystemExit(1) from None
    if isinstance(code, int) and not isinstance(code, bool) and code:  # typer.Exit(code) of a command
        raise SystemExit(code)


if __name__ == "__main__":
    main()
