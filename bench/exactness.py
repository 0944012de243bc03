"""Does ``fold-batchnorm`` pass the pipeline's exactness check on a deep, realistic network?

A ResNet-50-shaped model (Bottleneck blocks [3, 4, 6, 3], torchvision's initialisation; written
here, torchvision is not needed) with BatchNorm statistics re-estimated on random inputs, so
activations have a realistic scale. Prints whether the pipeline accepts the fold, the fold's max
abs change, and the float32 model's own error against its float64 copy.

    python bench/exactness.py [--depth 50|101] [--size 224] [--batch 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.fx.experimental.optimization
from torch import nn

import fxcompress as fxc

LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...], classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, inplanes = [], 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(inplanes, planes, stride=2 if i > 0 and j == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def reestimate_batchnorm(model: nn.Module, shape: tuple[int, ...], batches: int = 2) -> nn.Module:
    """Running statistics = averages over ``batches`` random batches (train-mode forwards)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(shape))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, choices=sorted(LAYERS), default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    model = reestimate_batchnorm(ResNet(LAYERS[args.depth]), shape)
    x = torch.randn(shape)
    with torch.no_grad():
        out32 = model(x)
        out64 = copy.deepcopy(model).double()(x.double())
    t0 = time.perf_counter()
    try:
        compiled = fxc.compile(model, (x,), "fold-batchnorm", target="fx")
        status = "accepted"
        with torch.no_grad():
            folded = compiled.graph_module(x)
    except fxc.PassVerificationError as err:
        status = f"rejected: {str(err).splitlines()[0]}\n(fold below: torch.fx.experimental.optimization.fuse)"
        folded = torch.fx.experimental.optimization.fuse(copy.deepcopy(model))(x).detach()
    seconds = time.perf_counter() - t0
    print(f"resnet{args.depth}-shaped, input {list(shape)}, max |output| {float(out32.abs().max()):.3g}")
    print(f"fold-batchnorm through the pipeline: {status} ({seconds:.1f} s)")
    print(f"max abs change of the fold (folded vs unfolded, float32): {float((folded - out32).abs().max()):.3g}")
    print(f"max abs error, unfolded float32 vs float64:              {float((out32.double() - out64).abs().max()):.3g}")
    print(f"max abs error, folded float32 vs float64:                "
          f"{float((folded.double() - out64).abs().max()):.3g}")


if __name__ == "__main__":
    main()
