"""Issue 14: artifacts never run code, never lose data, are written whole or not at all; every bad
input is a clear error (or warning) naming the argument, layer, pass or file and the fix."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxcompress as fxc
from fxcompress.artifact import write_manifest
from fxcompress.report import Report
from test_cli import cli_main


class Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


X = torch.randn(2, 3, 6, 6)


@pytest.fixture(scope="module")
def compiled() -> fxc.Compiled:
    return fxc.compile(Net().eval(), (X,), "eliminate-dead-code", target="onnxruntime", progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------ 1. no code execution
EVIL = textwrap.dedent("""
    from pathlib import Path
    Path(__file__).with_name("RAN").write_text("evil_mod was imported")

    def boom():
        Path(__file__).with_name("RAN").write_text("boom() was called")
""")


@pytest.fixture()
def evil(tmp_path: Path, compiled: fxc.Compiled) -> Path:
    """An artifact whose manifest names ``evil_mod:boom`` as its source, with ``evil_mod.py`` both
    inside the artifact and in the working directory; either running would write ``RAN``."""
    compiled.source = {"factory": "evil_mod:boom", "input_shape": "2x3x6x6"}
    try:
        art = compiled.save(tmp_path / "art")
    finally:
        compiled.source = None
    (art / "evil_mod.py").write_text(EVIL)
    (tmp_path / "evil_mod.py").write_text(EVIL)
    np.save(tmp_path / "x.npy", X.numpy())
    return tmp_path


def test_compare_without_original_never_imports_the_manifests_factory(
        evil: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match=r"ignoring evil_mod\.py: not part of the artifact"):
        code, out, err = cli_main(evil, monkeypatch, capsys, "compare", "art", "--inputs", "x.npy")
    assert code == 0, err
    assert not (evil / "RAN").exists() and not (evil / "art" / "RAN").exists()
    assert "evil_mod" not in sys.modules
    note = ("FX and original columns omitted: give the source model with --original module:factory (the "
            "artifact records 'evil_mod:boom'); an artifact never makes fxcompress import or run code it names")
    assert note in " ".join(out.split())


def test_bench_compare_eager_needs_original(evil: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match=r"ignoring evil_mod\.py"):
        code, _, err = cli_main(evil, monkeypatch, capsys, "bench", "art", "--compare-eager", "--iters", "2")
    assert code == 2 and not (evil / "RAN").exists() and not (evil / "art" / "RAN").exists()
    assert err.strip().splitlines() == [
        "error: --compare-eager needs the source model: give --original module:factory (the artifact records "
        "'evil_mod:boom') (an artifact never makes fxcompress import or run code it names)"]


def test_manifest_edited_without_its_digest_is_refused(tmp_path: Path, compiled: fxc.Compiled) -> None:
    art = compiled.save(tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["pipeline"] = "prune-magnitude"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxc.ArtifactError, match=r"manifest.json was modified after saving: its digest does "
                                                r"not match its content; re-save the artifact"):
        fxc.load(art)


def test_unlisted_file_named_like_the_artifacts_is_refused(tmp_path: Path, compiled: fxc.Compiled) -> None:
    art = compiled.save(tmp_path / "art")
    (art / "graphs" / "99_extra.fxg").write_text("# fxg 1 fx\n")
    with pytest.raises(fxc.ArtifactError, match=r"graphs/99_extra\.fxg is not listed in the manifest, so its "
                                                r"sha256 cannot be checked; refusing to load an unverified file"):
        fxc.load(art)


# ------------------------------------------------------------------------ malformed manifests
def _signed(edit: Any) -> Any:
    def apply(art: Path) -> None:
        manifest = json.loads((art / "manifest.json").read_text())
        edit(manifest)
        write_manifest(art, manifest)
    return apply


def _raw(data: bytes) -> Any:
    return lambda art: (art / "manifest.json").write_bytes(data)


MALFORMED = [
    ("list", _raw(b"[1, 2, 3]"), r"malformed manifest: the file holds a list, not an object"),
    ("binary", _raw(b"\x80\x04\x95\xff\xfe"),
     r"manifest.json is not text \(byte 0 is not UTF-8\); it is not an fxcompress manifest"),
    ("truncated", _raw(b'{"format": "fxcompress-artifact", '), r"manifest.json is not valid JSON"),
    ("no digest", _raw(json.dumps({"format": "fxcompress-artifact", "format_version": 2}).encode()),
     r"malformed manifest: 'digest' is missing"),
    ("version as text", _signed(lambda m: m.update(format_version="2")),
     r"unknown artifact format version '2'; this fxcompress reads version 2"),
    ("missing key", _signed(lambda m: m.pop("target")), r"malformed manifest: 'target' is missing"),
    ("wrong type", _signed(lambda m: m.update(inputs="x")),
     r"malformed manifest: 'inputs' is a string, expected a list"),
    ("wrong entry", _signed(lambda m: m["snapshots"][0].update(index="0")),
     r"malformed manifest: 'snapshots\[0\]\.index' is a string, expected an integer"),
    ("bad spec", _signed(lambda m: m["outputs"].__setitem__(0, 5)),
     r"malformed manifest: 'outputs\[0\]' is an integer, expected an object"),
    ("bad hash", _signed(lambda m: m["files"].update({"report.json": 7})),
     r"malformed manifest: 'files\['report\.json'\]' is an integer, expected a sha256 hex digest"),
]


@pytest.mark.parametrize("case, damage, message", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_artifact_error_naming_the_file(
        case: str, damage: Any, message: str, tmp_path: Path, compiled: fxc.Compiled,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    art = compiled.save(tmp_path / "art")
    damage(art)
    with pytest.raises(fxc.ArtifactError, match=message) as info:
        fxc.load(art)
    assert str(art / "manifest.json") in str(info.value)
    code, out, err = cli_main(tmp_path, monkeypatch, capsys, "inspect", "art")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and "manifest.json" in lines[0], err
    assert "Traceback" not in err and out == ""


# ------------------------------------------------------------------------ 2. save: whole or not at all
def test_save_refuses_a_directory_that_is_not_an_artifact(tmp_path: Path, compiled: fxc.Compiled) -> None:
    d = tmp_path / "mine"
    (d / "graphs").mkdir(parents=True)
    (d / "graphs" / "my_golden.fxg").write_text("# fxg 1 fx\nmine\n")
    (d / "model.engine").write_bytes(b"my engine")
    (d / "notes.txt").write_text("my notes")
    before = _files(d)
    with pytest.raises(fxc.ArtifactError, match=r"mine is not empty and is not an fxcompress artifact \(it has "
                                                r"no manifest\.json\); .* or pass overwrite=True"):
        compiled.save(d)
    assert _files(d) == before
    compiled.save(d, overwrite=True)  # the user's own file stays; the artifact-named ones are replaced
    assert (d / "notes.txt").read_text() == "my notes"
    assert not (d / "model.engine").exists() and not (d / "graphs" / "my_golden.fxg").exists()
    with pytest.warns(UserWarning, match=r"ignoring notes\.txt"):
        assert fxc.load(d).pipeline == "eliminate-dead-code"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(fxc.ArtifactError, match=r"afile is a file, not a directory"):
        compiled.save(tmp_path / "afile", overwrite=True)
    assert (tmp_path / "afile").read_text() == "x"


class InterruptedReport(Report):
    """Ctrl-C while the artifact is being written: after model.onnx, half-way through report.json."""

    def save(self, path: Any) -> None:
        Path(path).write_text('{"passes": [')
        raise KeyboardInterrupt


def _interrupted(compiled: fxc.Compiled) -> fxc.Compiled:
    from dataclasses import replace

    return replace(compiled, report=InterruptedReport(compiled.report.rows, compiled.report.meta))


def test_an_interrupted_save_leaves_the_old_artifact_and_no_partial_one(tmp_path: Path,
                                                                       compiled: fxc.Compiled) -> None:
    art = compiled.save(tmp_path / "art")
    before = _files(art)
    with pytest.raises(KeyboardInterrupt):
        _interrupted(compiled).save(art)
    assert _files(art) == before
    assert fxc.load(art).pipeline == "eliminate-dead-code"
    with pytest.raises(KeyboardInterrupt):
        _interrupted(compiled).save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no partial "new", no temporary directory


SAVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import fxcompress as fxc

    classes, out, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    torch.manual_seed(classes)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes)).eval()
    compiled = fxc.compile(model, (torch.randn(1, 8),), "eliminate-dead-code", target="onnxruntime",
                           progress=False)
    print("ready", flush=True)
    for _ in range(rounds):
        compiled.save(out)
""")


def _consistent(art: Path) -> int:
    """Load ``art``; the class count its manifest states is the one its model.onnx computes."""
    loaded = fxc.load(art)
    classes = loaded.outputs[0]["shape"][-1]
    y = loaded(torch.randn(1, 8))
    assert y.shape == (1, classes), (y.shape, classes)
    assert loaded.report.rows[0].params == 8 * 16 + 16 + 16 * classes + classes
    return classes


def test_concurrent_saves_end_with_one_complete_artifact(tmp_path: Path) -> None:
    """Two processes save a 10-class and a 20-class model into one directory, 12 times each, while
    this process loads it: every load is one whole artifact, never a mix."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, str(script), str(c), str(out), "12"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in (10, 20)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        seen = set()
        while any(p.poll() is None for p in procs):
            if (out / "manifest.json").exists():
                seen.add(_consistent(out))
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert _consistent(out) in (10, 20) and seen <= {10, 20}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saver.py", "shared"]


# ------------------------------------------------------------------------ 3. command-line inputs
MODELS = textwrap.dedent("""
    from pathlib import Path
    import torch
    from torch import nn

    def make_model():
        Path("FACTORY_RAN").write_text("built")
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 16 * 16, 3)).eval()

    def broken():
        raise RuntimeError("no weights here")
""")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, compiled: fxc.Compiled) -> Path:
    d = tmp_path_factory.mktemp("bad_cli")
    (d / "badmodels.py").write_text(MODELS)
    (d / "badimport.py").write_text("1 / 0\n")
    (d / "samples.txt").write_text("1.0 2.0 3.0\n4.0 5.0 6.0\n")
    (d / "afile").write_text("not a directory")
    (d / "mine").mkdir()
    (d / "mine" / "model.engine").write_bytes(b"the user's engine")
    compiled.save(d / "art")
    return d


COMPILE = ("compile", "badmodels:make_model", "--input-shape", "1x3x16x16")
CLI_CASES = [
    (("compile", "badmodels:make_model", "--input-shape", "1,3,16,16"),
     "--input-shape '1,3,16,16' reads as 4 inputs of one dimension each; for one input of shape "
     "(1, 3, 16, 16) write 1x3x16x16 ('x' between dimensions, ',' only between inputs)"),
    (("compile", "badmodels:broken", "--input-shape", "1x3x16x16"),
     "model 'badmodels:broken': the factory broken() raised RuntimeError: no weights here"),
    (("compile", "badimport:make", "--input-shape", "1x3x16x16"),
     "model 'badimport:make': importing module 'badimport' raised ZeroDivisionError: division by zero"),
    ((*COMPILE, "--passes", "quantize-int8", "--calibration", "samples.txt", "--out", "o1"),
     "--calibration: inputs file samples.txt is not a .npy/.npz numpy file: it starts with b'1.0 2.' (text, "
     "not numpy's header); save the arrays with numpy.save (.npy) or numpy.savez (.npz)"),
    ((*COMPILE, "--out", "afile"), "--out afile: "),
    ((*COMPILE, "--out", "afile/sub"), "is a file, so no directory can be made under it; give another --out"),
    ((*COMPILE, "--out", "mine"),
     "is not empty and is not an fxcompress artifact (it has no manifest.json); saving there would replace or mix "
     "with its files: give a new or empty directory, or give --overwrite"),
    (("bench", "art", "--batch", "0"), "--batch 0: the batch size must be a positive integer"),
    (("bench", "art", "--batch", "-2"), "--batch -2: the batch size must be a positive integer"),
]


@pytest.mark.parametrize("args, message", CLI_CASES)
def test_cli_bad_inputs_are_one_line_before_any_work(work: Path, args: tuple[str, ...], message: str,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (work / "FACTORY_RAN").unlink(missing_ok=True)
    code, _, err = cli_main(work, monkeypatch, capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and "pickle" not in err
    if args[0] == "compile":  # checked before the model is even built
        assert not (work / "FACTORY_RAN").exists()
    assert (work / "mine" / "model.engine").read_bytes() == b"the user's engine"


# ------------------------------------------------------------------------ 3. passes
def _warnings(c: fxc.Compiled) -> list[str]:
    return [d["message"] for row in c.report.rows for d in row.diagnostics if d["severity"] == "warning"]


@pytest.mark.parametrize("passes, message", [
    ("prune-magnitude{exclude=[conv0]}", "exclude= pattern(s) 'conv0' match no layer, so they keep no layer "
                                         "from being pruned; check the spelling against the layers here: conv, fc"),
    ("prune-nm{exclude=[fcc]}", "exclude= pattern(s) 'fcc' match no layer"),
    ("prune-channels{exclude=[conv0]}", "exclude= pattern(s) 'conv0' match no layer, so they keep no layer "
                                        "from being pruned; check the spelling against the layers here: conv, fc"),
    ("quantize-int8{skip=[lienar]}", "skip= pattern(s) 'lienar' match no layer, so they keep no layer in "
                                     "floating point; check the spelling against the layers here: conv, fc"),
    ("quantize-dynamic{skip=[fc1]}", "skip= pattern(s) 'fc1' match no layer"),
])
def test_unmatched_exclude_and_skip_patterns_warn(passes: str, message: str) -> None:
    c = fxc.compile(Net().eval(), (X,), passes, target="fx", calibration=[X], progress=False)
    assert any(message in w for w in _warnings(c)), _warnings(c)


def test_matched_patterns_do_not_warn() -> None:
    c = fxc.compile(Net().eval(), (X,), "prune-magnitude{exclude=[conv]},quantize-int8{skip=[fc]}",
                    target="fx", calibration=[X], progress=False)
    assert not [w for w in _warnings(c) if "match no layer" in w]


def test_one_shot_calibration_read_by_two_passes_is_refused_before_any_work() -> None:
    """Up front when the pipeline shows two readers; at run time, a pass names the one that consumed it."""
    from passes import QuantizeInt8, QuantSensitivity

    from fxcompress.trace import trace

    batches = (torch.randn(2, 3, 6, 6) for _ in range(4))
    with pytest.raises(fxc.PipelineError, match=r"calibration= is a one-shot iterator \(e\.g\. a generator\), but "
                                                r"passes quant-sensitivity, quantize-int8 each read it: the first would "
                                                r"consume it; pass a list \(e\.g\. list\(batches\)\) or a DataLoader"):
        fxc.compile(Net().eval(), (X,), "quant-sensitivity,quantize-int8", target="fx", calibration=batches,
                    progress=False)
    assert next(batches).shape == (2, 3, 6, 6)  # untouched: refused before anything read it
    ctx = fxc.PassContext((X,), calibration=(torch.randn(2, 3, 6, 6) for _ in range(4)))
    QuantSensitivity().run(trace(Net().eval(), (X,)), ctx)
    with pytest.raises(fxc.PassError, match=r"pass 'quantize-int8': calibration= is a one-shot iterator "
                                            r"\(e\.g\. a generator\) that pass 'quant-sensitivity' already "
                                            r"consumed, .*; pass a list \(e\.g\. list\(batches\)\) or a DataLoader"):
        QuantizeInt8().run(trace(Net().eval(), (X,)), ctx)
    exhausted = iter([X])
    next(exhausted)
    with pytest.raises(fxc.PassError, match=r"calibration= yielded no batches: it is a one-shot iterator "
                                            r"\(e\.g\. a generator\), already exhausted; pass a list"):
        fxc.compile(Net().eval(), (X,), "quantize-int8", target="fx", calibration=exhausted, progress=False)
    same = [torch.randn(2, 3, 6, 6) for _ in range(4)]
    assert fxc.compile(Net().eval(), (X,), "quant-sensitivity,quantize-int8", target="fx", calibration=same,
                       progress=False).report.rows[-1].status == "ok"


class Tied(nn.Module):
    """An embedding and its output head sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(ids))))


IDS = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(0))
TIED_PARAMS = 10 * 8 + 8 * 8 + 8  # the shared weight counts once


@pytest.mark.parametrize("passes", ["", "prune-magnitude{exclude-head=false}", "prune-nm{exclude-head=false}",
                                    "prune-magnitude{exclude-head=false},onnx-fold-constants"])
def test_tied_weights_stay_one_tensor_and_one_initializer(passes: str) -> None:
    model = Tied().eval()
    c = fxc.compile(model, (IDS,), passes, target="onnxruntime", progress=False)
    gm = c.graph_module
    assert gm.emb.weight is gm.head.weight
    assert [row.params for row in c.report.rows] == [TIED_PARAMS] * len(c.report.rows)
    for row in c.report.rows[1:-1]:
        if row.name.startswith("prune"):
            assert row.stats["params_after"] == TIED_PARAMS and 0.0 < row.stats["sparsity"] < 1.0
            assert any("weight tied with emb.weight: pruned together, still one tensor" in d["message"]
                       for d in row.diagnostics)
    shared = [t for t in c.onnx_model.graph.initializer if tuple(t.dims) in ((10, 8), (8, 10))]
    assert [t.name for t in shared] == ["emb.weight"]
    np.testing.assert_array_equal(numpy_helper.to_array(shared[0]), gm.emb.weight.detach().numpy())
    with torch.no_grad():
        torch.testing.assert_close(c(IDS), gm(IDS), rtol=1e-5, atol=1e-5)
    assert not _warnings(c)


def test_a_pass_that_unties_weights_says_so() -> None:
    c = fxc.compile(Tied().eval(), (IDS,), "quantize-int8", target="fx", calibration=[IDS], progress=False)
    assert ("tied weights emb.weight, head.weight are no longer one tensor after this pass (head.weight replaced "
            "or removed); the model now stores them separately") in " ".join(_warnings(c))


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.fc(x)
        return {"logits": y, "probs": y.softmax(-1)}


class Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Any:
        y = self.fc(x)
        return None if self.kind == "none" else 3.5 if self.kind == "float" else y.sum().item()


def test_dict_output_warns_that_onnx_runtime_returns_a_tuple() -> None:
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"forward returns a dict \('logits', 'probs'\); ONNX has no dicts, so "
                                         r"ONNX Runtime and a loaded artifact return a tuple of its tensors in "
                                         r"this order"):
        c = fxc.compile(DictOut().eval(), (x,), "", target="onnxruntime", progress=False)
    logits, probs = c(x)
    expected = DictOut().eval()(x)
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, expected["probs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind, message", [
    ("none", r"the model's forward returns None .*; an ONNX model needs at least one tensor output"),
    ("float", r"the model's forward returns a Python float \(3\.5\), not a tensor; ONNX outputs are tensors"),
    ("item", r"the model's forward returns a Python float computed by node 'item', not a tensor; .* \(not "
             r"\.item\(\)/float\(\)\)"),
])
def test_forward_returning_no_tensor_is_an_export_error_before_any_pass(kind: str, message: str) -> None:
    class Seen:
        def __init__(self) -> None:
            self.passes: list[str] = []

        def before_pass(self, p: Any, graph: Any, ctx: Any) -> None:
            self.passes.append(p.name)

    seen = Seen()
    with pytest.raises(fxc.ExportError, match=message):
        fxc.compile(Returns(kind).eval(), (torch.randn(2, 4),), "prune-magnitude", target="onnxruntime",
                    instruments=[seen], progress=False)
    assert seen.passes == []
    assert fxc.compile(Returns(kind).eval(), (torch.randn(2, 4),), "", target="fx", progress=False).backend == "fx"


def test_saved_hashes_cover_every_file(tmp_path: Path, compiled: fxc.Compiled) -> None:
    """The manifest's sha256 of each file and its own digest: a changed byte anywhere is caught."""
    art = compiled.save(tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    files = _files(art)
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert all(hashlib.sha256(files[f]).hexdigest() == h for f, h in manifest["files"].items())
    onnx.checker.check_model(onnx.load_model_from_string(files["model.onnx"]))
