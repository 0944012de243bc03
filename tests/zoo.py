"""The test model zoo, written in this project (no torchvision): small, seeded, eval-mode models
covering the architectures passes must handle. BatchNorm running statistics and affine
parameters are randomized so BN folding is really exercised.

``ZOO[name]()`` returns ``(model, example_inputs)`` with a batch of 2; each call builds the same
model and inputs again (seeded), without touching the global RNG.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from fxcompress.digits import DigitsResNet

Factory = Callable[[], tuple[nn.Module, tuple[Tensor, ...]]]
BATCH = 2


def _perturb_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BatchNorm non-trivial running stats and affine params, and LayerNorm affine params."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(10)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _build(ctor: Callable[[], nn.Module], *shapes: tuple[int, ...], seed: int
           ) -> tuple[nn.Module, tuple[Tensor, ...]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ctor()
    gen = torch.Generator().manual_seed(seed + 1)
    _perturb_norms(model, gen)
    inputs = tuple(torch.randn(shape, generator=gen) for shape in shapes)
    return model.eval(), inputs


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


# --- ResNet --------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(cin, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, cout, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], stem: int, out: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet_basic() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(lambda: TinyResNet([BasicBlock(8, 8), BasicBlock(8, 16, stride=2)], 8, 16),
                  (BATCH, 3, 16, 16), seed=1)


def resnet_bottleneck() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(lambda: TinyResNet([Bottleneck(8, 4), Bottleneck(16, 4), Bottleneck(16, 8, stride=2)],
                                     8, 32),
                  (BATCH, 3, 16, 16), seed=2)


# --- MobileNetV2 ---------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
            *_conv_bn(hidden, cout, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class TinyMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 8, 3, 2), nn.ReLU6(inplace=True),
            InvertedResidual(8, 8, 1, 4),
            InvertedResidual(8, 16, 2, 4),
            InvertedResidual(16, 16, 1, 6),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.classifier(x.flatten(1))


def inverted_residual() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(TinyMobileNet, (BATCH, 3, 16, 16), seed=3)


# --- DenseNet ------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu(self.norm1(x)))
        return self.conv2(self.relu(self.norm2(x)))


class TinyDenseNet(nn.Module):
    def __init__(self, stem: int = 8, growth: int = 4, layers: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.dense = nn.ModuleList(DenseLayer(stem + i * growth, growth) for i in range(layers))
        cout = stem + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                        nn.Conv2d(cout, cout // 2, 1, bias=False), nn.AvgPool2d(2))
        self.classifier = nn.Linear(cout // 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.relu(self.norm0(self.conv0(x)))]
        for layer in self.dense:
            features.append(layer(features))
        x = self.transition(torch.cat(features, 1))
        x = torch.mean(x, dim=(2, 3))
        return self.classifier(x)


def dense_block() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(TinyDenseNet, (BATCH, 3, 12, 12), seed=4)


# --- Transformer encoder block -------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention written with matmuls, reshapes, transposes and softmax."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.size(0), x.size(1)
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def transformer_block() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(TransformerBlock, (BATCH, 8, 16), seed=5)


# --- 1-D audio conv ------------------------------------------------------------------------------

class AudioConv1d(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(8, 16, 3, padding=1, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def audio_conv1d() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(AudioConv1d, (BATCH, 1, 64), seed=6)


# --- nn.MultiheadAttention / nn.LSTM leaves ------------------------------------------------------

class MhaLstm(nn.Module):
    def __init__(self, din: int = 12, dim: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(din, dim)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = self.norm(h + self.mha(h, h, h, need_weights=False)[0])
        out = self.lstm(h)[0]
        return self.head(out[:, -1])


def leaf_mha_lstm() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(MhaLstm, (BATCH, 6, 12), seed=7)


# --- clean-up targets ----------------------------------------------------------------------------

class ConvDropoutIdentity(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2), nn.Identity(),
            nn.Conv2d(8, 8, 3, padding=1), nn.Dropout2d(0.1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.skip = nn.Identity()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.skip(self.pool(self.features(x)).flatten(1))
        return self.fc(torch.nn.functional.dropout(self.drop(x), 0.3, training=self.training))


def conv_dropout_identity() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(ConvDropoutIdentity, (BATCH, 3, 8, 8), seed=8)


def classifier_digits() -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The digits CNN of ``fxcompress.digits`` (untrained, randomized BN stats), on 1x8x8 inputs."""
    return _build(lambda: DigitsResNet(width=8), (BATCH, 1, 8, 8), seed=9)


# --- ShuffleNetV2 --------------------------------------------------------------------------------

def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channel groups, written as torchvision's ShuffleNetV2 writes it."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleV2Unit(nn.Module):
    """A ShuffleNetV2 unit. stride 1: ``x.chunk(2, dim=1)``, one half passes through, the other
    goes through 1x1 conv-BN-ReLU, depthwise 3x3 conv-BN, 1x1 conv-BN-ReLU; stride 2 (downsampling):
    both branches (depthwise conv-BN, 1x1 conv-BN-ReLU / the 1x1-dw-1x1 one) read the same input.
    Then ``cat`` and a channel shuffle of 2 groups."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(*_conv_bn(cin, cin, 3, stride, groups=cin),
                                         *_conv_bn(cin, half, 1), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            *_conv_bn(cin if stride > 1 else half, half, 1), nn.ReLU(inplace=True),
            *_conv_bn(half, half, 3, stride, groups=half),
            *_conv_bn(half, half, 1), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNetV2(nn.Module):
    def __init__(self, stem: int = 8, widths: tuple[int, ...] = (16, 32), repeats: tuple[int, ...] = (3, 2),
                 last: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(3, stem, 3, 2), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], stem
        for width, n in zip(widths, repeats):
            stages.append(nn.Sequential(ShuffleV2Unit(cin, width, 2),
                                        *(ShuffleV2Unit(width, width, 1) for _ in range(n - 1))))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.conv5 = nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.maxpool(self.conv1(x)))
        return self.fc(self.conv5(x).mean([2, 3]))


def shufflenet_v2() -> tuple[nn.Module, tuple[Tensor, ...]]:
    return _build(TinyShuffleNetV2, (BATCH, 3, 32, 32), seed=10)


ZOO: dict[str, Factory] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "inverted_residual": inverted_residual,
    "dense_block": dense_block,
    "transformer_block": transformer_block,
    "audio_conv1d": audio_conv1d,
    "leaf_mha_lstm": leaf_mha_lstm,
    "conv_dropout_identity": conv_dropout_identity,
    "classifier_digits": classifier_digits,
    "shufflenet_v2": shufflenet_v2,
}
ZOO_NAMES: list[str] = list(ZOO)

__all__ = ["BATCH", "ZOO", "ZOO_NAMES"]
