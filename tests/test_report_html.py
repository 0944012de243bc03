"""The self-contained HTML report: table, run facts, plots, escaped diffs, one file, headless render."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import matplotlib
import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import fxcompress as fxc
from fxcompress.errors import InputError
from fxcompress.pass_base import PassContext, PassResult
from fxcompress.pipeline import Snapshot
from fxcompress.report import PassRecord, Report
from fxcompress.report_html import report_to_html_string, write_html
from fxcompress.report_html.layers import layer_table


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.relu(self.conv2(y))
        return self.fc(y.mean(dim=(2, 3)))


X = (torch.randn(2, 3, 8, 8),)


@dataclass(frozen=True)
class ReluToSigmoid(fxc.Pass):
    """Claims to be exact but changes the activation: the pipeline rolls it back."""

    name: ClassVar[str] = "test-html-relu-to-sigmoid"
    exact: ClassVar[bool] = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        for n in gm.graph.nodes:
            if n.target is torch.relu:
                n.target = torch.sigmoid
        gm.recompile()
        return PassResult(gm)


class Page(HTMLParser):
    """Just enough of the DOM for the checks: table rows (cells as text), images, svgs, details."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[dict[str, str], list[str]]] = []
        self.imgs: list[dict[str, str]] = []
        self.svgs = 0
        self.details = 0
        self._row: tuple[dict[str, str], list[str]] | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "tr":
            self._row = (a, [])
            self.rows.append(self._row)
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "svg":
            self.svgs += 1
        elif tag == "details":
            self.details += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def pass_rows(self) -> dict[int, tuple[dict[str, str], list[str]]]:
        return {int(a["id"].split("-")[1]): (a, cells) for a, cells in self.rows
                if a.get("id", "").startswith("pass-")}


@pytest.fixture(scope="module")
def compiled() -> Any:
    from passes import EliminateDeadCode, FoldBatchNorm

    return fxc.compile(Net(), X, [FoldBatchNorm(), ReluToSigmoid(), EliminateDeadCode()], target="fx",
                       on_error="skip")


@pytest.fixture(scope="module")
def page_html(compiled: Any) -> str:
    return report_to_html_string(compiled.report, snapshots=compiled.snapshots)


def _decode_png(src: str) -> Any:
    import matplotlib.image as mpimg

    assert src.startswith("data:image/png;base64,")
    return mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")


def _assert_self_contained(text: str) -> None:
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    for src in re.findall(r'\b(?:src|href)="([^"]*)"', text):
        assert src.startswith(("data:", "#")), src


# ------------------------------------------------------------------ a real compile()

def test_table_has_one_row_per_pass_with_its_numbers(compiled: Any, page_html: str) -> None:
    report = compiled.report
    assert [r.status for r in report] == ["ok", "ok", "rolled-back", "unchanged"]
    rows = Page(page_html).pass_rows()
    assert sorted(rows) == [0, 1, 2, 3]
    for r in report:
        attrs, cells = rows[r.index]
        assert cells[0] == str(r.index) and cells[1] == r.name and cells[2] == "fx" and cells[3] == r.status
        assert cells[7] == f"{r.nodes:,}" and cells[8] == f"{r.params:,}" and cells[9] == f"{r.nonzero:,}"
        assert cells[13] == f"{r.error['max_abs']:.3e}"
        assert cells[15] == f"{r.error['cosine']:.6f}"
    # folding BN removed parameters: the numbers differ between the first two rows
    assert rows[0][1][8] != rows[1][1][8]


def test_rolled_back_row_is_marked_and_its_diagnostic_listed(compiled: Any, page_html: str) -> None:
    rows = Page(page_html).pass_rows()
    assert rows[2][0]["class"] == "status-rolled-back"
    assert [rows[i][0]["class"] for i in (0, 1, 3)] == ["status-ok", "status-ok", "status-unchanged"]
    assert rows[2][1][-1] == "1"  # one diagnostic, linked to its list entry
    assert 'id="diag-2"' in page_html
    assert "declared exact but changed the outputs" in page_html
    assert "first divergent node: &#x27;relu&#x27;" in page_html
    # the attempted change (from the error) is shown as a diff
    assert '<span class="add">+call_function %relu = torch.sigmoid' in page_html


def test_plots_are_embedded_png_images(page_html: str) -> None:
    page = Page(page_html)
    # stages (error/size), quality vs size, params+MACs
    assert len(page.imgs) == 3
    for img in page.imgs:
        pixels = _decode_png(img["src"])
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.05  # not a blank image
    alts = " ".join(img["alt"] for img in page.imgs)
    assert "max abs error" in alts and "size" in alts and "MACs" in alts


def test_graph_diff_of_each_pass_is_collapsible(compiled: Any, page_html: str) -> None:
    bn_line = next(line for line in compiled.snapshots[0].text.splitlines() if "BatchNorm2d" in line)
    assert '<span class="del">-' + bn_line.replace("<", "&lt;").replace(">", "&gt;") + "</span>" in page_html
    diffs = page_html[page_html.index('id="diffs"'):]
    assert "#1 <code>fold-batchnorm</code>: +" in diffs
    assert "#2 <code>test-html-relu-to-sigmoid</code>" in diffs and "rolled back" in diffs
    assert "#3 <code>eliminate-dead-code</code>: no change" in diffs
    assert Page(diffs).details >= 3
    assert "-&gt; f32[2,8,6,6]" in diffs  # '->' in the graph text is escaped


def test_run_meta_is_shown(compiled: Any, page_html: str) -> None:
    run = page_html[page_html.index('id="run"'):page_html.index('id="passes"')]
    assert "<dt>target</dt><dd>fx</dd>" in run
    assert "<dt>backend</dt><dd>fx</dd>" in run
    assert f"<code>{compiled.report.meta['pipeline']}</code>" in run
    assert "opaque modules" in run and "none" in run


def test_single_self_contained_file(compiled: Any, tmp_path: Path) -> None:
    out = write_html(compiled, tmp_path / "sub" / "report.html")
    assert out == tmp_path / "sub" / "report.html" and list(out.parent.iterdir()) == [out]
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    _assert_self_contained(text)
    # given a Compiled, its snapshots are used
    assert "fold-batchnorm</code>: +" in text


def _layers_part(text: str) -> str:
    return text[text.index('id="layers"'):text.index('id="diffs"')]


def test_real_pruning_layers_are_plotted_from_the_typed_rows() -> None:
    c = fxc.compile(Net(), X, "fold-batchnorm,prune-channels{ratio=0.5},prune-magnitude{amount=0.5}",
                    target="fx")
    (channels_step,) = c.report.find("prune-channels")
    channels = {row.layer: row for row in channels_step.layers}
    conv = channels["conv"]
    assert (conv.kind, conv.unit, conv.before, conv.after) == ("Conv2d", "channels", 8, 4)
    # the layer's share of removed params (112 of 224), as the pass's stats say
    assert conv.metrics == {"sparsity": pytest.approx(0.5)} and conv.key_metric == "sparsity"
    assert conv.metrics["sparsity"] == channels_step.stats["layers"]["conv"]["sparsity"]
    (magnitude_step,) = c.report.find("prune-magnitude")
    magnitude = magnitude_step.layers
    assert magnitude and all(0.0 < row.key_value < 1.0 and row.after < row.before for row in magnitude)
    text = report_to_html_string(c.report, snapshots=c.snapshots)
    page = Page(text)
    # stages, quality vs size, params+MACs, counts + sparsity of #2, of #3
    assert len(page.imgs) == 5
    assert page.imgs[3]["alt"] == "per-layer channels before and after and sparsity of step 2 prune-channels"
    assert page.imgs[4]["alt"] == ("per-layer active params before and after and sparsity of step 3 "
                                   "prune-magnitude")
    tables = [cells for _, cells in page.rows]
    assert ["layer", "kind", "channels before", "channels after", "sparsity"] in tables
    assert ["conv", "Conv2d", "8", "4", "0.5"] in tables
    first = magnitude[0]
    assert [first.layer, first.kind, f"{first.before:g}", f"{first.after:g}",
            f"{first.key_value:.4g}"] in tables
    # drawn from the typed rows alone: without the stats dicts the section is the same, without the rows gone
    no_stats = Report([replace(r, stats={}) for r in c.report], c.report.meta)
    assert _layers_part(report_to_html_string(no_stats)) == _layers_part(text)
    no_rows = report_to_html_string(Report([replace(r, layers=[]) for r in c.report], c.report.meta))
    assert 'id="layers"' not in no_rows and len(Page(no_rows).imgs) == 3


def test_real_quant_sensitivity_ranking_is_plotted_from_the_typed_rows() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    c = fxc.compile(Net(), X, "fold-batchnorm,quant-sensitivity{k=1,eval_batches=2,calibration_batches=2}",
                    calibration=batches, target="fx")
    (step,) = c.report.find("quant-sensitivity")
    ranked = step.stats["layers"]
    assert [row.layer for row in step.layers] == [r["node"] for r in ranked]  # worst first, as the pass ranks
    assert [row.metrics for row in step.layers] == [{"rel_mse": r["rel_mse"], "cosine": r["cosine"]}
                                                    for r in ranked]
    assert [row.precision for row in step.layers] == ["float"] + ["int8"] * (len(ranked) - 1)
    assert {(row.key_metric, row.worse) for row in step.layers} == {("rel_mse", "higher")}
    page = Page(report_to_html_string(c.report))
    assert page.imgs[-1]["alt"] == f"per-layer rel_mse of step {step.index} {step.name}"
    assert [row.key_value for row in step.layers] == sorted((r["rel_mse"] for r in ranked), reverse=True)
    tables = [cells for _, cells in page.rows]
    assert ["layer", "kind", "precision", "rel_mse", "cosine", "note"] in tables
    worst = ranked[0]
    assert [worst["node"], worst["kind"], "float", f"{worst['rel_mse']:.4g}", f"{worst['cosine']:.4g}",
            "among the k most sensitive"] in tables


# ------------------------------------------------------------------ hand-made records

def _records() -> Report:
    channels = [fxc.PassLayerRow("conv1", kind="Conv2d", unit="channels", before=16, after=8,
                             metrics={"sparsity": 0.5}, key_metric="sparsity"),
                fxc.PassLayerRow("layer1.0.conv<lambda>", kind="Conv2d", unit="channels", before=32, after=24,
                             metrics={"sparsity": 0.25}, key_metric="sparsity")]
    sparse = [fxc.PassLayerRow("conv1", unit="active params", before=1000, after=250, metrics={"sparsity": 0.75},
                           key_metric="sparsity"),
              fxc.PassLayerRow("fc", unit="active params", before=4000, after=2250, metrics={"sparsity": 0.4375},
                           key_metric="sparsity")]
    ranked = [fxc.PassLayerRow("fc", precision="float", metrics={"max_abs": 0.2, "cosine": 0.97},
                           key_metric="max_abs", worse="higher", note="kept in float"),
              fxc.PassLayerRow("conv1", precision="int8", metrics={"max_abs": 0.05, "cosine": 0.999},
                           key_metric="max_abs", worse="higher")]
    rows = [
        PassRecord(0, "input", "fx", nodes=10, params=10000, nonzero=10000, bytes=40000, macs=200000,
                   error={"max_abs": 0.0, "mean_abs": 0.0, "cosine": 1.0, "top1": 1.0},
                   stats={"accuracy": 0.975, "ort_latency_ms": 0.5}),
        PassRecord(1, "prune-channels{ratio=0.5}", "fx", status="ok", changed=True, weights_changed=True,
                   seconds=0.25, nodes=10, params=5000, nonzero=5000, bytes=20000, macs=90000,
                   error={"max_abs": 0.3, "mean_abs": 0.05, "cosine": 0.99, "top1": 0.9},
                   stats={"accuracy": 0.95, "ort_latency_ms": 0.3, "sparsity": 0.5}, layers=channels),
        PassRecord(2, "prune-magnitude", "fx", status="ok", changed=False, weights_changed=True,
                   nodes=10, params=5000, nonzero=2500, bytes=20000, macs=90000,
                   error={"max_abs": 0.4, "mean_abs": 0.06, "cosine": 0.98, "top1": 0.88},
                   stats={"accuracy": 0.94, "ort_latency_ms": 0.3}, layers=sparse),
        PassRecord(3, "quant-sensitivity", "fx", status="unchanged", nodes=10, params=5000, nonzero=2500,
                   bytes=20000, macs=90000,
                   error={"max_abs": 0.4, "mean_abs": 0.06, "cosine": 0.98, "top1": 0.88},
                   stats={"accuracy": 0.94, "ort_latency_ms": 0.3}, layers=ranked),
        PassRecord(4, "<script>alert(1)</script>", "fx", status="rolled-back", nodes=10, params=5000,
                   nonzero=2500, bytes=20000, macs=90000,
                   diagnostics=[{"severity": "error", "message": "broke node <lambda> & more",
                                 "node": "a<b"}]),
        PassRecord(5, "quantize-int8", "onnx", status="ok", changed=True, weights_changed=True, seconds=1.5,
                   nodes=30, params=5000, nonzero=2500, bytes=6000, macs=90000,
                   error={"max_abs": 0.5, "mean_abs": 0.07, "cosine": 0.97, "top1": 0.85},
                   stats={"accuracy": 0.935, "ort_latency_ms": 0.2},
                   layers=[fxc.PassLayerRow("conv1", precision="int8"), fxc.PassLayerRow("fc", precision="float",
                                                                                   note="head <fc>")],
                   diagnostics=[{"severity": "info", "message": "stays in floating point: head",
                                 "node": "fc"}]),
        PassRecord(6, "fine-tune", "fx", status="not-run", nodes=30, params=5000, nonzero=2500, bytes=6000,
                   macs=90000),
    ]
    meta = {"target": "tensorrt-rtx", "backend": "onnxruntime (fallback from tensorrt-rtx: no GPU <none>)",
            "pipeline": "prune-channels{ratio=0.5},quantize-int8", "precision": "int8",
            "opaque_modules": {"attn": "untraceable control flow in forward() <if x.sum() > 0>"}}
    return Report(rows, meta)


def _snapshots() -> list[Snapshot]:
    base = "# fxg 1 fx\nplaceholder   %x -> f32[1,3]\ncall_function %y = <lambda> (%x) -> f32[1,3]\n"
    return [Snapshot(0, "input", "fx", base),
            Snapshot(1, "prune-channels{ratio=0.5}", "fx", base.replace("f32[1,3]\n", "f32[1,2]\n")),
            Snapshot(2, "prune-magnitude", "fx", base.replace("f32[1,3]\n", "f32[1,2]\n")),
            Snapshot(3, "quant-sensitivity", "fx", base.replace("f32[1,3]\n", "f32[1,2]\n")),
            Snapshot(4, "quantize-int8", "onnx", "# fxg 1 onnx\nnode QuantizeLinear <q>\n")]


@pytest.fixture(scope="module")
def hand_html() -> str:
    return report_to_html_string(_records(), snapshots=_snapshots(), title="digits <demo>")


def test_hand_made_report_tables_and_columns(hand_html: str) -> None:
    text = hand_html
    page = Page(text)
    rows = page.pass_rows()
    header = next(cells for a, cells in page.rows if "accuracy" in cells and "#" in cells)
    assert header[-3:] == ["accuracy", "ORT latency (ms)", "diagnostics"]
    assert rows[1][1][header.index("accuracy")] == "95.00%"
    assert rows[5][1][header.index("ORT latency (ms)")] == "0.200"
    assert rows[2][1][header.index("sparsity")] == "50.00%"
    assert rows[4][0]["class"] == "status-rolled-back" and rows[6][0]["class"] == "status-not-run"
    assert rows[3][0]["class"] == "status-unchanged"
    # the summary compares the first and the last stage that produced a graph (#5, not the not-run #6)
    summary = next(cells for _, cells in page.rows if cells and cells[0] == "weights")
    assert summary == ["weights", "39.1 KiB", "5.86 KiB", "6.67x"]  # 40000 and 6000 bytes
    assert "<title>digits &lt;demo&gt;</title>" in text


def test_every_report_string_is_escaped(hand_html: str) -> None:
    text = hand_html
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<lambda>" not in text and "&lt;lambda&gt;" in text
    assert "broke node &lt;lambda&gt; &amp; more" in text and "[a&lt;b]" in text
    assert "&lt;if x.sum() &gt; 0&gt;" in text
    assert "no GPU &lt;none&gt;" in text
    _assert_self_contained(text)


def test_fallback_backend_and_opaque_modules(hand_html: str) -> None:
    text = hand_html
    assert '<span class="fallback">onnxruntime (fallback from tensorrt-rtx' in text
    assert "<dt>target</dt><dd>tensorrt-rtx</dd>" in text
    assert "<code>attn</code>" in text


def test_hand_made_plots_count_and_order(hand_html: str) -> None:
    page = Page(hand_html)
    alts = [img["alt"] for img in page.imgs]
    # stages, quality vs size, params+MACs, pruning #1 (channels), pruning #2 (sparsity), sensitivity #3
    assert len(alts) == 6
    assert alts[0].startswith("quality, size and latency")
    assert "accuracy" in alts[0] and "ORT latency" in alts[0]
    assert alts[1] == "accuracy (%) vs size per stage"
    assert "step 1 prune-channels" in alts[3] and "step 2 prune-magnitude" in alts[4]
    assert alts[5] == "per-layer max_abs of step 3 quant-sensitivity"
    for img in page.imgs:
        assert _decode_png(img["src"]).shape[1] >= 500


def test_svg_images_are_inline_and_self_contained() -> None:
    text = report_to_html_string(_records(), snapshots=_snapshots(), image_format="svg")
    page = Page(text)
    assert page.svgs == 6 and not page.imgs
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text
    _assert_self_contained(text)
    with pytest.raises(InputError, match="image_format"):
        report_to_html_string(_records(), image_format="gif")
    with pytest.raises(InputError, match="needs a fxcompress Report"):
        report_to_html_string(42)


def test_snapshot_diffs_and_stage_change(hand_html: str) -> None:
    text = hand_html
    diffs = text[text.index('id="diffs"'):]
    assert '<span class="add">+call_function %y = &lt;lambda&gt; (%x) -&gt; f32[1,2]</span>' in diffs
    assert "#2 <code>prune-magnitude</code>: weights changed, graph text unchanged" in diffs
    assert "#5 <code>quantize-int8</code>: onnx graph text" in diffs and "QuantizeLinear &lt;q&gt;" in diffs
    assert "#6 <code>fine-tune</code>: not-run" in diffs
    no_snaps = report_to_html_string(Report(_records()[:1]))
    assert "No graph snapshots were given" in no_snaps


def test_report_loaded_from_json_renders() -> None:
    data = json.loads(Report(_records()[:3]).to_json())
    data["passes"][1]["error"]["max_abs"] = "nan"
    text = report_to_html_string(Report.from_dict(data))
    rows = Page(text).pass_rows()
    assert rows[1][1][13] == "-" and rows[2][1][13] == "4.000e-01"


def test_matplotlib_global_state_untouched(tmp_path: Path) -> None:
    before_backend = matplotlib.get_backend()
    before_rc = dict(matplotlib.rcParams)
    had_pyplot = "matplotlib.pyplot" in sys.modules
    write_html(_records(), tmp_path / "r.html", image_format="svg")
    assert matplotlib.get_backend() == before_backend
    assert dict(matplotlib.rcParams) == before_rc
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot


# ------------------------------------------------------------------ per-layer tables

def test_hand_made_layer_tables(hand_html: str) -> None:
    part = _layers_part(hand_html)
    assert [int(i) for i in re.findall(r'<h3 id="layers-(\d+)">', part)] == [1, 2, 3, 5]
    tables = [cells for _, cells in Page(part).rows]
    assert ["layer1.0.conv<lambda>", "Conv2d", "32", "24", "0.25"] in tables
    assert ["layer", "active params before", "active params after", "sparsity"] in tables
    assert ["layer", "precision", "max_abs", "cosine", "note"] in tables
    assert ["fc", "float", "0.2", "0.97", "kept in float"] in tables
    assert ["fc", "float", "head <fc>"] in tables  # a precision-only step: a table, no plot
    assert "head &lt;fc&gt;" in part


def test_layer_table_columns_follow_the_filled_fields() -> None:
    mixed = [fxc.PassLayerRow("a", unit="channels", before=8, after=4),
             fxc.PassLayerRow("b", unit="heads", before=4, after=2, metrics={"x": float("nan")})]
    page = Page(layer_table(mixed))
    assert [cells for _, cells in page.rows] == [["layer", "unit", "before", "after", "x"],
                                                 ["a", "channels", "8", "4", "-"],
                                                 ["b", "heads", "4", "2", "-"]]
    assert [cells for _, cells in Page(layer_table([fxc.PassLayerRow("c")])).rows] == [["layer"], ["c"]]


# ------------------------------------------------------------------ headless browser

VIEWPORT = (1280, 2000)

#: appended to a copy of the report: on ``load`` it measures what the reader sees and writes it into
#: the DOM, which ``--dump-dom`` then prints
_MEASURE = """<script>
window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const rows = [...document.querySelectorAll('tr[id^="pass-"]')];
  const table = rows.length ? rows[0].closest('table') : null;
  const out = {
    innerWidth: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
    table: table ? box(table) : null,
    names: rows.map(r => box(r.cells[1])),
    imgs: [...document.images].map(i => ({loaded: i.complete && i.naturalWidth > 0, box: box(i)})),
    overflowing: [...document.querySelectorAll('body *')]
      .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
      .map(e => e.tagName + (e.id ? '#' + e.id : '') + (e.className ? '.' + e.className : '')).slice(0, 10),
  };
  const pre = document.createElement('pre');
  pre.id = 'fxc-measure';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    """What a reader of the report sees at 1280 px in a real browser: the whole pass table (one row
    per step, names readable) and every plot loaded, inside the window: no horizontal scrolling."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (.ci/run installs Debian's chromium package where apt-get works)")
    html_path = write_html(_records(), tmp_path / "report.html", snapshots=_snapshots())
    width, height = VIEWPORT
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},{height}",
              f"--user-data-dir={tmp_path / 'profile'}"]

    dom = subprocess.run([*common, "--dump-dom", html_path.resolve().as_uri()], check=True,
                         capture_output=True, text=True, cwd=tmp_path).stdout
    page = Page(dom)
    assert sorted(page.pass_rows()) == list(range(7)) and len(page.imgs) == 6

    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text(encoding="utf-8").replace("</body>", _MEASURE + "</body>"),
                     encoding="utf-8")
    dumped = subprocess.run([*common, "--dump-dom", probe.resolve().as_uri()], check=True,
                            capture_output=True, text=True, cwd=tmp_path).stdout
    found = re.search(r'<pre id="fxc-measure">(.*?)</pre>', dumped, re.S)
    assert found, dumped[-2000:]
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["innerWidth"] == width
    assert seen["scrollWidth"] <= width and seen["overflowing"] == [], seen
    left, top, right, bottom = seen["table"]
    assert 0 <= left and right <= width and bottom - top > 7 * 15, seen["table"]
    assert len(seen["names"]) == 7
    assert all(r - l >= 100 for l, _, r, _ in seen["names"]), seen["names"]  # pass names are not squeezed
    assert len(seen["imgs"]) == 6 and all(i["loaded"] for i in seen["imgs"]), seen["imgs"]
    assert all(0 <= i["box"][0] and i["box"][2] <= width and i["box"][3] - i["box"][1] > 100
               for i in seen["imgs"]), seen["imgs"]

    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", html_path.resolve().as_uri()],
                   check=True, capture_output=True, cwd=tmp_path)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (height, width)
    assert pixels.reshape(-1, 3).std(axis=0).max() > 0.05  # text, tables and plots, not one colour
    t_left, t_top, t_right, t_bottom = (round(v) for v in seen["table"])
    assert pixels[t_top:min(t_bottom, height), t_left:t_right].std() > 0.05  # the table is painted
    visible = [i["box"] for i in seen["imgs"] if i["box"][3] <= height]
    assert visible, seen["imgs"]  # at least one plot above the fold
    for l, t, r, b in visible:
        assert pixels[round(t):round(b), round(l):round(r)].std() > 0.02, (l, t, r, b)  # a drawn plot


def test_quality_vs_size_labels_of_nearly_coincident_stages_are_stacked() -> None:
    from fxcompress.report_html.plots import _label_groups

    groups = _label_groups([20.3, 21.1, 5.6, 5.6, 1.9, 2.0], [0.0, 0.0, 0.2, 0.2, 0.2, 0.2],
                           ["0 input", "1 fold", "2 prune", "3 sens", "4 int8", "5 export"])
    assert groups == [((20.3, 0.0), ["0 input", "1 fold"]), ((5.6, 0.2), ["2 prune", "3 sens"]),
                      ((1.9, 0.2), ["4 int8", "5 export"])]
    assert [n for _, n in _label_groups([1.0, 5.0], [0.0, 1.0], ["a", "b"])] == [["a"], ["b"]]
