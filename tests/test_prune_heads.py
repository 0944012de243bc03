"""prune-heads: whole attention heads removed from Hugging Face BERT / ViT (torch.export front end)
and from the zoo's hand-written transformer block (fused qkv Linear, literal head counts in its
reshapes); shapes, parameter counts, ONNX Runtime agreement, exact removal of a dead head, and the
blocks it must leave alone."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import fxcompress as fxc
from fxcompress import ops
from fxcompress.errors import PipelineError
from fxcompress.options import format_pipeline
from fxcompress.registry import parse_pipeline
from fxcompress.trace import trace
from fxcompress.verify import propagate_shapes
from passes import PruneHeads
from passes.prune.heads import find_blocks
from zoo import ZOO

transformers = pytest.importorskip("transformers")
from test_frontends import bert, distilbert, gpt2, vit  # noqa: E402  (needs transformers)

#: FX graph vs ONNX Runtime (fp32, different kernels)
ATOL_ORT = 1e-4
#: outputs after removing a head whose output is exactly zero (float reassociation only)
ATOL_EXACT = 1e-5

HIDDEN, LAYERS, HEADS, HEAD_DIM = 32, 2, 4, 8
BERT_PATHS = ("encoder.layer.{i}.attention.self.{p}", "encoder.layer.{i}.attention.output.dense")
VIT_PATHS = ("vit.layers.{i}.attention.{p}", "vit.layers.{i}.attention.o_proj")
QKV = {"bert": ("query", "key", "value"), "vit": ("q_proj", "k_proj", "v_proj")}


def _compile(model: nn.Module, inputs: tuple[Tensor, ...], passes: str, **kwargs) -> fxc.Compiled:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(padding_idx|advanced indexing|Constant folding).*")
        return fxc.compile(model, inputs, passes, progress=False, **kwargs)


def _first(out):
    if isinstance(out, Tensor):
        return out
    return out[0]


def _row(compiled: fxc.Compiled, name: str = "prune-heads"):
    return next(r for r in compiled.report.rows if r.name.split("{")[0] == name)


def _assert_onnxruntime_matches_fx(compiled: fxc.Compiled, inputs: tuple[Tensor, ...]) -> None:
    """The ONNX Runtime model agrees with the pruned FX graph, at the example batch and twice it."""
    gm = compiled.graph_module
    for x in (inputs, tuple(torch.cat([t, t]) for t in inputs)):
        with torch.no_grad():
            torch.testing.assert_close(_first(compiled(*x)), _first(gm(*x)), rtol=0, atol=ATOL_ORT)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_ratio_half_halves_heads_and_runs_in_onnxruntime(name: str) -> None:
    model, inputs = {"bert": bert, "vit": vit}[name]()
    state = _state(model)
    compiled = _compile(model, inputs, "prune-heads{ratio=0.5}", target="onnxruntime")
    gm = compiled.graph_module
    proj, out = BERT_PATHS if name == "bert" else VIT_PATHS
    for i in range(LAYERS):
        for p in QKV[name]:
            assert gm.get_submodule(proj.format(i=i, p=p)).out_features == HIDDEN // 2
        assert gm.get_submodule(out.format(i=i)).in_features == HIDDEN // 2
        assert gm.get_submodule(out.format(i=i)).out_features == HIDDEN
    # per block: 2 heads x 8 rows of q, k, v (weight row + bias) and 16 input columns of the output projection
    removed = LAYERS * (3 * (HIDDEN // 2) * (HIDDEN + 1) + (HIDDEN // 2) * HIDDEN)
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in gm.parameters()) == before - removed
    stats = _row(compiled).stats
    assert stats["params_before"] - stats["params_after"] == removed
    assert [(b["heads_before"], b["heads_after"]) for b in stats["blocks"].values()] == [(HEADS, HEADS // 2)] * LAYERS
    _assert_onnxruntime_matches_fx(compiled, inputs)
    for k, v in model.state_dict().items():  # the user's model is never mutated
        assert torch.equal(v, state[k]), k


def _kill_bert_head(model: nn.Module, layer: int, head: int) -> None:
    """Zero head ``head``'s q/k/v rows and the output projection's columns of it in ``layer``: the head
    contributes exactly nothing, and its output (the output projection's input) is exactly zero."""
    att = model.encoder.layer[layer].attention
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    with torch.no_grad():
        for lin in (att.self.query, att.self.key, att.self.value):
            lin.weight[rows] = 0
            lin.bias[rows] = 0
        att.output.dense.weight[:, rows] = 0


@pytest.mark.parametrize("importance", ["norm", "taylor"])
def test_a_dead_head_is_exactly_the_one_removed(importance: str) -> None:
    model, inputs = bert()
    _kill_bert_head(model, 0, 1)
    data = [(torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(s)),
             torch.ones(2, 8, dtype=torch.long)) for s in range(2)]
    compiled = _compile(model, inputs, f"prune-heads{{ratio=0.25,importance={importance},exclude=[encoder.layer.1.*]}}",
                        calibration=data, target="fx")
    stats = _row(compiled).stats
    assert list(stats["blocks"]) == ["encoder.layer.0.attention"]
    block = stats["blocks"]["encoder.layer.0.attention"]
    assert block["removed_heads"] == [1]
    assert block["scores"][1] == 0.0 and min(block["scores"][:1] + block["scores"][2:]) > 0.0
    assert "excluded by pattern" in stats["skipped"]["encoder.layer.1.attention"]
    gm = compiled.graph_module
    assert gm.get_submodule("encoder.layer.1.attention.self.query").out_features == HIDDEN
    assert gm.get_submodule("encoder.layer.0.attention.self.query").out_features == HIDDEN - HEAD_DIM
    for x in (inputs, data[0]):
        with torch.no_grad():
            torch.testing.assert_close(_first(gm(*x)), _first(model(*x)), rtol=0, atol=ATOL_EXACT)


def test_ratio_zero_changes_nothing_and_is_exact() -> None:
    model, inputs = bert()
    p = PruneHeads(ratio=0.0)
    assert p.exact
    compiled = _compile(model, inputs, [p], target="fx")
    row = _row(compiled)
    assert not row.changed
    assert row.stats["blocks"] == {} and len(row.stats["skipped"]) == LAYERS
    assert all("removes none" in r for r in row.stats["skipped"].values())
    assert compiled.graph_module.get_submodule("encoder.layer.0.attention.self.query").out_features == HIDDEN


def test_zoo_transformer_block_fused_qkv_and_literal_head_counts() -> None:
    """The zoo block fuses q/k/v in one Linear (rows ordered part, head, head_dim) and reshapes with
    literal head counts (``reshape(b, t, 3, 4, 4)``, ``reshape(b, t, 16)``): both are rewritten."""
    model, inputs = ZOO["transformer_block"]()
    heads, head_dim, dim = model.attn.heads, model.attn.head_dim, model.attn.proj.in_features
    dead = 2
    with torch.no_grad():  # head `dead` of the value part outputs exactly zero
        start = 2 * dim + dead * head_dim
        model.attn.qkv.weight[start:start + head_dim] = 0
        model.attn.qkv.bias[start:start + head_dim] = 0
    compiled = _compile(model, inputs, "prune-heads{ratio=0.25}", target="onnxruntime")
    gm = compiled.graph_module
    assert gm.get_submodule("attn.qkv").out_features == 3 * (heads - 1) * head_dim
    assert gm.get_submodule("attn.proj").in_features == (heads - 1) * head_dim
    assert _row(compiled).stats["blocks"]["attn"]["removed_heads"] == [dead]
    reshapes = [n.args for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert reshapes[0][-3:] == (3, heads - 1, head_dim) and reshapes[1][-1] == (heads - 1) * head_dim
    with torch.no_grad():
        expected = model(*inputs)
        torch.testing.assert_close(gm(*inputs), expected, rtol=0, atol=ATOL_EXACT)
    torch.testing.assert_close(compiled(*inputs), gm(*inputs), rtol=0, atol=ATOL_ORT)


class _PerHeadBias(nn.Module):
    """Attention whose scores get a learned bias per head (ALiBi-like): heads cannot be removed
    without slicing that bias, which the pass does not do, so it must skip the block."""

    def __init__(self, dim: int = 16, heads: int = 4, seq: int = 8) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(heads, seq, seq))

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + self.bias
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def test_blocks_it_cannot_prove_safe_are_skipped_with_the_reason() -> None:
    torch.manual_seed(0)
    model = _PerHeadBias().eval()
    x = torch.randn(2, 8, 16)
    compiled = _compile(model, (x,), "prune-heads{ratio=0.5}", target="fx")
    row = _row(compiled)
    assert row.stats["blocks"] == {}
    (reason,) = row.stats["skipped"].values()
    assert "differs per head" in reason
    assert any("no attention block found" in d["message"] and "differs per head" in d["message"]
               for d in row.diagnostics)
    assert compiled.graph_module.get_submodule("q").out_features == 16


def test_a_model_without_attention_says_so() -> None:
    model, inputs = ZOO["resnet_basic"]()
    row = _row(_compile(model, inputs, "prune-heads", target="fx"))
    assert any("no attention block found" in d["message"] and "scaled_dot_product_attention" in d["message"]
               for d in row.diagnostics)
    assert row.stats["params_before"] == row.stats["params_after"]


def test_min_heads_and_pipeline_string() -> None:
    (p,) = parse_pipeline("prune-heads{ratio=0.9,importance=taylor,exclude=[pooler.*],min-heads=2}")
    assert p == PruneHeads(ratio=0.9, importance="taylor", exclude=("pooler.*",), min_heads=2)
    assert parse_pipeline(format_pipeline([p])) == [p]
    assert p.n_remove(4) == 2 and PruneHeads(ratio=0.5).n_remove(3) == 1 and PruneHeads(ratio=0.9).n_remove(4) == 3
    with pytest.raises(PipelineError, match="ratio=1.0"):
        PruneHeads(ratio=1.0)
    with pytest.raises(PipelineError, match="min_heads"):
        PruneHeads(min_heads=0)
    model, inputs = bert()
    with pytest.raises(Exception, match="taylor.*needs data"):
        _compile(model, inputs, "prune-heads{importance=taylor}", target="fx", on_error="raise")


def test_issue_pipeline_on_bert_runs_in_onnxruntime() -> None:
    model, inputs = bert()
    data = [(torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(s)),
             torch.ones(2, 8, dtype=torch.long)) for s in range(2)]
    compiled = _compile(model, inputs, "prune-heads{ratio=0.5},prune-channels{ratio=0.5},distill{epochs=1},quantize-int8",
                        train_data=data, calibration=data, target="onnxruntime")
    assert [r.status for r in compiled.report.rows] == ["ok"] * len(compiled.report.rows)
    assert [b["heads_after"] for b in _row(compiled).stats["blocks"].values()] == [HEADS // 2] * LAYERS
    ops_ = {n.op_type for n in compiled.onnx_model.graph.node}
    assert "QuantizeLinear" in ops_ or "DynamicQuantizeLinear" in ops_
    with torch.no_grad():
        expected = _first(model(*inputs))
    got = _first(compiled(*inputs))
    assert got.shape == expected.shape
    with torch.no_grad():
        fx_out = _first(compiled.graph_module(*inputs))
    # lowering keeps what the passes made; half the heads and channels of a random BERT, distilled for
    # one epoch on two batches, stays correlated with it but not close
    assert torch.nn.functional.cosine_similarity(got.flatten(), fx_out.flatten(), dim=0) > 0.99
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.5


def test_distilbert_blocks_are_found_with_their_projections() -> None:
    model, inputs = distilbert()
    gm = trace(model, inputs)
    propagate_shapes(gm, inputs)
    blocks, skipped = find_blocks(gm)
    assert skipped == {}
    att = "transformer.layer.{}.attention."
    assert [(b.name, list(b.sources), b.outputs, b.heads, b.head_dim) for b in blocks] == [
        (att.format(i)[:-1], [att.format(i) + p for p in ("q_lin", "k_lin", "v_lin")], [att.format(i) + "out_lin"],
         HEADS, HEAD_DIM) for i in range(LAYERS)]
    assert all(b.sizes == [] for b in blocks)  # its reshapes count heads with -1: nothing to rewrite


class _FusedQKV(nn.Module):
    """GPT-2-style attention: one ``Linear(dim, 3 * dim)`` cut into q, k, v by ``split``, ``chunk``
    or slicing, each viewed into heads; literal sizes everywhere."""

    def __init__(self, cut: str, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.cut, self.dim, self.heads, self.head_dim = cut, dim, heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        y = self.qkv(x)
        if self.cut == "split":
            q, k, v = y.split(self.dim, dim=2)
        elif self.cut == "chunk":
            q, k, v = y.chunk(3, dim=-1)
        elif self.cut == "slice":
            q, k, v = y[..., :self.dim], y[:, :, self.dim:2 * self.dim], y[..., 2 * self.dim:]
        else:  # "shifted": k and v start one head into the next part, so heads are not whole parts
            q, k, v = y[..., :self.dim], y[..., self.dim + 8:2 * self.dim + 8], y[..., 2 * self.dim - 8:-8]
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, self.dim))


def _kill_value_heads(qkv: Tensor, bias: Tensor, dim: int, head_dim: int, heads: tuple[int, ...]) -> None:
    """Zero the value rows of ``heads`` in a fused (q, k, v) projection (``qkv`` in Linear layout
    [3 * dim, in]): those heads output exactly zero, so they are the ones pruned, exactly."""
    with torch.no_grad():
        for h in heads:
            rows = slice(2 * dim + h * head_dim, 2 * dim + (h + 1) * head_dim)
            qkv[rows] = 0
            bias[rows] = 0


@pytest.mark.parametrize("frontend", ["auto", "export"])
@pytest.mark.parametrize("cut", ["split", "chunk", "slice"])
def test_fused_qkv_cut_by_split_chunk_or_slices_loses_half_its_heads(cut: str, frontend: str) -> None:
    torch.manual_seed(0)
    model = _FusedQKV(cut).eval()
    x = torch.randn(2, 8, 32)
    _kill_value_heads(model.qkv.weight, model.qkv.bias, 32, 8, (1, 3))
    compiled = _compile(model, (x,), "prune-heads{ratio=0.5}", target="fx", frontend=frontend)
    row, gm = _row(compiled), compiled.graph_module
    assert row.changed
    assert [b["removed_heads"] for b in row.stats["blocks"].values()] == [[1, 3]]
    assert (gm.get_submodule("qkv").out_features, gm.get_submodule("qkv").in_features) == (48, 32)
    assert (gm.get_submodule("proj").in_features, gm.get_submodule("proj").out_features) == (16, 32)
    removed = 3 * 16 * (32 + 1) + 16 * 32  # 2 heads x 8 rows (+ bias) of q, k, v; 16 columns of proj
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in gm.parameters()) == before - removed == 2128
    assert row.stats["params_before"] - row.stats["params_after"] == removed
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=ATOL_EXACT)
        wide = torch.randn(3, 8, 32)
        torch.testing.assert_close(gm(wide), model(wide), rtol=0, atol=ATOL_EXACT)


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_fused_qkv_ratio_zero_is_exact(cut: str) -> None:
    torch.manual_seed(0)
    model = _FusedQKV(cut).eval()
    x = torch.randn(2, 8, 32)
    compiled = _compile(model, (x,), [PruneHeads(ratio=0.0)], target="fx")
    row = _row(compiled)
    assert not row.changed and row.stats["blocks"] == {} and len(row.stats["skipped"]) == 1
    assert "removes none" in next(iter(row.stats["skipped"].values()))
    with torch.no_grad():
        assert torch.equal(compiled.graph_module(x), model(x))


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_fused_qkv_cut_across_parts_is_skipped(frontend: str) -> None:
    model, x = _FusedQKV("shifted").eval(), torch.randn(2, 8, 32)
    row = _row(_compile(model, (x,), "prune-heads{ratio=0.5}", target="fx", frontend=frontend))
    assert not row.changed and row.stats["blocks"] == {}
    (reason,) = row.stats["skipped"].values()
    assert "not at whole parts" in reason


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_gpt2_fused_c_attn_loses_half_its_heads_and_runs_in_onnxruntime(frontend: str) -> None:
    model, inputs = gpt2()
    compiled = _compile(model, inputs, "prune-heads{ratio=0.5}", target="onnxruntime", frontend=frontend)
    row, gm = _row(compiled), compiled.graph_module
    assert row.changed and row.stats["skipped"] == {}
    heads = [(b["heads_before"], b["heads_after"]) for b in row.stats["blocks"].values()]
    assert heads == [(HEADS, HEADS // 2)] * LAYERS
    for i in range(LAYERS):
        assert gm.get_submodule(f"transformer.h.{i}.attn.c_attn").weight.shape == (3 * HIDDEN // 2, HIDDEN)
        assert gm.get_submodule(f"transformer.h.{i}.attn.c_proj").in_features == HIDDEN // 2
    assert [n.args[1] for n in gm.graph.nodes if ops.kind(n) == "split"] == [HIDDEN // 2] * LAYERS
    removed = LAYERS * (3 * (HIDDEN // 2) * (HIDDEN + 1) + (HIDDEN // 2) * HIDDEN)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    assert row.stats["params_before"] - row.stats["params_after"] == removed == 4192
    _assert_onnxruntime_matches_fx(compiled, inputs)


def test_gpt2_dead_heads_are_exactly_the_ones_removed() -> None:
    model, inputs = gpt2()
    for block in model.transformer.h:  # Conv1D weight is [in, out]: its transpose is the Linear layout
        _kill_value_heads(block.attn.c_attn.weight.T, block.attn.c_attn.bias, HIDDEN, HEAD_DIM, (0, 2))
    compiled = _compile(model, inputs, "prune-heads{ratio=0.5}", target="fx")
    assert [b["removed_heads"] for b in _row(compiled).stats["blocks"].values()] == [[0, 2]] * LAYERS
    with torch.no_grad():
        torch.testing.assert_close(_first(compiled.graph_module(*inputs)), _first(model(*inputs)), rtol=0,
                                   atol=ATOL_EXACT)
