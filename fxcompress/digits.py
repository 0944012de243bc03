"""Real data for demos, examples and accuracy tests: scikit-learn's digits (8x8 images, 1797
samples, shipped with scikit-learn, no download), a small residual CNN and a seeded trainer."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .errors import InputError

NUM_CLASSES = 10
TEST_FRACTION = 0.2
CALIBRATION_SAMPLES = 256


def load_digits_tensors(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: float32 ``N x 1 x 8 x 8`` in [0, 1], int64 labels,
    stratified 80/20 split decided by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=TEST_FRACTION, stratify=data.target, random_state=seed)
    tr, te = torch.tensor(idx_train), torch.tensor(idx_test)
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


@dataclass(frozen=True)
class DigitsData:
    """Loaders of ``(x, y)`` batches: shuffled train, ordered test, and a fixed calibration subset
    of the training set (for quantization observers)."""

    train: DataLoader
    test: DataLoader
    calibration: DataLoader


def digits_loaders(batch_size: int = 64, seed: int = 0) -> DigitsData:
    """DataLoaders over the digits split of ``load_digits_tensors(seed)``.

    The train loader shuffles with the global torch RNG, so ``train_classifier(seed=...)``
    (which seeds it) is reproducible."""
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
    perm = torch.randperm(len(y_tr), generator=torch.Generator().manual_seed(seed))
    calib = perm[:CALIBRATION_SAMPLES]
    return DigitsData(
        train=DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True),
        test=DataLoader(TensorDataset(x_te, y_te), batch_size=batch_size, shuffle=False),
        calibration=DataLoader(TensorDataset(x_tr[calib], y_tr[calib]), batch_size=batch_size,
                               shuffle=False),
    )


class ResidualBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (1x1 conv-bn when the shape changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DigitsResNet(nn.Module):
    """A small residual CNN for 1x8x8 digits: stem conv-bn-relu, an identity block at 8x8, a
    downsampling block to 4x4 (2*width channels), global average pooling, a linear classifier."""

    def __init__(self, width: int = 32, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = ResidualBlock(width, width)
        self.layer2 = ResidualBlock(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class DigitsMobileNet(nn.Module):
    """A MobileNetV2-style CNN for 1x8x8 digits: stem conv-bn-relu6, two inverted residual blocks
    (1x1 expand, 3x3 depthwise, 1x1 project; the first with a residual add, the second
    downsampling), global average pooling, a linear classifier. Depthwise convs give per-channel
    weight ranges far apart, the case cross-layer equalization is for."""

    def __init__(self, width: int = 16, expand: int = 4, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU6())
        self.block1 = _InvertedResidual(width, width, expand, stride=1)
        self.block2 = _InvertedResidual(width, 2 * width, expand, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class DigitsTransformer(nn.Module):
    """A small pre-norm transformer encoder for digits: the image's 8 rows are 8 tokens of 8
    pixels, embedded by a Linear, plus a learned position embedding; ``depth`` blocks of
    multi-head self-attention (explicit Q/K/V/output Linears and matmuls, as in BERT) and a GELU
    MLP; mean over tokens, LayerNorm, a linear classifier."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4, mlp_ratio: int = 2,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.zeros(1, 8, dim))
        self.blocks = nn.ModuleList(_EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x.flatten(1, 2)) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=1)))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        q, k, v = self._split(self.query(h)), self._split(self.key(h)), self._split(self.value(h))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        ctx = (attn @ v).transpose(1, 2).flatten(2)
        x = x + self.out(ctx)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def train_classifier(model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], *, epochs: int = 6,
                     lr: float = 5e-3, weight_decay: float = 1e-4, seed: int = 0,
                     threads: int | None = 1) -> nn.Module:
    """Train ``model`` in place with AdamW + one-cycle schedule on cross-entropy; returns it in
    eval mode. Deterministic for a given seed (the global RNG is restored afterwards).

    ``threads``: torch intra-op threads while training (restored afterwards). One thread is the
    default: on these tiny batches it is as fast as more, stays fast on a busy machine, and gives
    the same weights whatever the core count. ``None`` keeps the current setting."""
    steps = epochs * len(loader)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]), _num_threads(threads):
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                    pct_start=0.2)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(_logits(model(x)), y)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _logits(out: Any) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.as_tensor(out)


def accuracy(fn: Callable[[Tensor], Any], loader: Iterable[tuple[Tensor, Tensor]], *,
             threads: int | None = 1) -> float:
    """Top-1 accuracy of ``fn`` (a module, GraphModule or compiled model returning logits) on
    ``loader``. A module is evaluated in eval mode and its training flags are restored.
    ``threads``: torch intra-op threads meanwhile (see ``train_classifier``)."""
    modes = [(m, m.training) for m in fn.modules()] if isinstance(fn, nn.Module) else []
    if isinstance(fn, nn.Module):
        fn.eval()
    correct = total = 0
    try:
        with torch.no_grad(), _num_threads(threads):
            for x, y in loader:
                pred = _logits(fn(x)).argmax(dim=-1)
                correct += int((pred == y).sum())
                total += int(y.numel())
    finally:
        for m, mode in modes:
            m.training = mode
    if total == 0:
        raise InputError("accuracy: the loader yielded no samples")
    return correct / total


__all__ = ["DigitsData", "DigitsMobileNet", "DigitsResNet", "DigitsTransformer", "ResidualBlock", "accuracy", "digits_loaders",
           "load_digits_tensors", "train_classifier"]
