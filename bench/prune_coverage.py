"""Pruning coverage: ``prune-channels{ratio=0.5}`` on every architecture family the tests can
build (every model of ``tests/zoo.py``, its ShuffleNetV2 at full ``x1.0`` size, and Hugging Face
``transformers`` vision models from small configs with random weights), lowered to ONNX and run in ONNX Runtime against the FX graph.

Per model: params and MACs after / before, max abs difference ONNX Runtime vs the pruned FX graph,
how many layers keep channels the analysis could not prove removable (and the most common
reason), and, for a model that does not compile, the first line of the error.

    python bench/prune_coverage.py [--models resnet_basic hf-vit ...] [--ratio 0.5] [--reasons]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import onnxruntime
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
# bench/transformers.py would shadow the `transformers` package for a script run from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))

import fxcompress as fxc  # noqa: E402
from zoo import ZOO, TinyShuffleNetV2, _build  # noqa: E402

Builder = Callable[[], tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]
IMAGE = 64


def _hf(config_name: str, model_name: str, size: int = IMAGE, **config: Any) -> Builder:
    """A ``transformers`` image classifier built from a small config, random weights, eval mode."""

    def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        import transformers

        cfg = getattr(transformers, config_name)(num_labels=10, **config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = getattr(transformers, model_name)(cfg).eval()
        x = torch.randn(2, cfg.num_channels if hasattr(cfg, "num_channels") else 3, size, size,
                        generator=torch.Generator().manual_seed(1))
        return model, (x,)

    return build


HF: dict[str, Builder] = {
    "hf-resnet": _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16,
                     hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="bottleneck"),
    "hf-mobilenet-v2": _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", depth_multiplier=0.35,
                           image_size=IMAGE),
    "hf-convnext": _hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32, 64, 128],
                       depths=[1, 1, 1, 1], image_size=IMAGE),
    "hf-vit": _hf("ViTConfig", "ViTForImageClassification", size=32, image_size=32, patch_size=8,
                  hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    "hf-swin": _hf("SwinConfig", "SwinForImageClassification", size=32, image_size=32, patch_size=2,
                   embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
    "hf-efficientnet": _hf("EfficientNetConfig", "EfficientNetForImageClassification", image_size=IMAGE,
                           width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=64),
    "hf-regnet": _hf("RegNetConfig", "RegNetForImageClassification", embedding_size=16,
                     hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8),
    "hf-mobilevit": _hf("MobileViTConfig", "MobileViTForImageClassification", image_size=IMAGE,
                        hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                        num_attention_heads=2),
}
#: the zoo's ShuffleNetV2 at torchvision's ``shufflenet_v2_x1_0`` widths (2,278,604 parameters)
FULL_SIZE: dict[str, Builder] = {
    "shufflenet_v2_x1_0": lambda: _build(lambda: TinyShuffleNetV2(24, (116, 232, 464), (4, 8, 4), 1024, 1000),
                                         (1, 3, 224, 224), seed=0),
}
MODELS: dict[str, Builder] = {**ZOO, **FULL_SIZE, **HF}


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _first_line(exc: BaseException) -> str:
    """The error's first line, and the next one when the first only introduces it (ends in ':')."""
    lines = [line.strip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    head = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return f"{type(exc).__name__}: {head}"


def _short(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def measure(name: str, ratio: float) -> dict[str, Any]:
    """Prune ``name`` at ``ratio``, lower to ONNX Runtime, compare with the pruned FX graph."""
    row: dict[str, Any] = {"model": name, "status": "ok", "reason": ""}
    start = time.perf_counter()
    try:
        model, inputs = MODELS[name]()
        compiled = fxc.compile(model, inputs, f"prune-channels{{ratio={ratio}}}", target="onnxruntime")
        stats = next(r for r in compiled.report if r.name == "prune-channels").stats
        row["params"] = stats["params_after"] / stats["params_before"]
        row["macs"] = stats["macs_after"] / stats["macs_before"]
        row["params_before"], row["macs_before"] = stats["params_before"], stats["macs_before"]
        unpruned = stats.get("unpruned", {})
        row["unpruned"] = len(unpruned)
        row["reasons"] = Counter(unpruned.values())
        with torch.no_grad():
            fx_out = _tensors(compiled.graph_module(*inputs))
        ort_out = _tensors(compiled(*inputs))
        row["max_abs"] = max((a - b).abs().max().item() for a, b in zip(ort_out, fx_out))
        row["out_scale"] = max(b.abs().max().item() for b in fx_out)
    except Exception as exc:  # noqa: BLE001 - the bench reports every failure and goes on
        row["status"], row["reason"] = "failed", _first_line(exc)
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--reasons", action="store_true", help="list every reason channels were kept")
    args = parser.parse_args()
    console = Console(width=200)
    console.print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
                  f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                  f"onnxruntime {onnxruntime.__version__}, prune-channels ratio {args.ratio}")
    table = Table(show_lines=False)
    for column, justify in (("model", "left"), ("params before", "right"), ("params ratio", "right"),
                            ("MACs before", "right"), ("MACs ratio", "right"), ("max |ORT - FX|", "right"),
                            ("|FX| max", "right"), ("layers kept whole", "right"), ("status", "left"),
                            ("reason (first line) / most common keep reason", "left"), ("s", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    rows = []
    for name in args.models:
        row = measure(name, args.ratio)
        rows.append(row)
        ok = row["status"] == "ok"
        top = row["reasons"].most_common(1)[0] if ok and row["reasons"] else None
        table.add_row(name,
                      f"{row['params_before']:,}" if ok else "-", f"{row['params']:.3f}" if ok else "-",
                      f"{row['macs_before']:,}" if ok else "-", f"{row['macs']:.3f}" if ok else "-",
                      f"{row['max_abs']:.2e}" if ok else "-", f"{row['out_scale']:.2f}" if ok else "-",
                      str(row["unpruned"]) if ok else "-", row["status"],
                      _short(row["reason"]) if not ok else (_short(f"{top[1]}x {top[0]}") if top else ""),
                      f"{row['seconds']:.1f}")
    console.print(table)
    for row in rows:
        if row["status"] != "ok":
            console.print(f"{row['model']} failed: {row['reason']}", soft_wrap=True)
    if args.reasons:
        for row in rows:
            for reason, n in (row.get("reasons") or {}).items():
                console.print(f"{row['model']}: {n} layer(s): {reason}")


if __name__ == "__main__":
    main()
