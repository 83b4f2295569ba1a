"""Residual networks of bottleneck blocks (1x1 -> 3x3 -> 1x1, a BatchNorm after each conv, a strided 1x1
shortcut conv where the shape changes): a small one trained on scikit-learn's digits for the tests, and the
ResNet-50 shape (random weights) for the whole-network budget benchmark. The stride of a block sits on its 3x3
conv, as in torchvision's ResNet-50 (v1.5)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cpkernels.tools.digits import load_digits_tensors, train


class Bottleneck(nn.Module):
    """``cin -> width`` (1x1), ``width -> width`` (3x3, ``stride``), ``width -> width * expansion`` (1x1), each
    conv followed by its BatchNorm2d; plus the input, through a 1x1 conv and BatchNorm at ``stride`` where the
    channel count or the size changes."""

    def __init__(self, cin: int, width: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        cout = width * expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def bottleneck_resnet(stem: Sequence[nn.Module], cin: int, stages: Sequence[tuple[int, int, int]], classes: int,
                      expansion: int = 4) -> nn.Sequential:
    """``stem`` (its output has ``cin`` channels), then per stage ``(width, blocks, stride)`` that many
    bottleneck blocks (the first at ``stride``), then global average pooling and a Linear to ``classes``."""
    layers = list(stem)
    for width, blocks, stride in stages:
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1, expansion))
            cin = width * expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


def digits_bottleneck_net(stem: int = 32) -> nn.Sequential:
    """For 8x8 grey digits: a 3x3 stem conv to ``stem`` channels, three bottleneck blocks (widths 16, 32, 32,
    expansion 4; the second at stride 2 with its shortcut conv, the third with the identity shortcut)."""
    return bottleneck_resnet([nn.Conv2d(1, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()],
                             stem, [(16, 1, 1), (32, 2, 2)], classes=10)


def resnet50(width: int = 64, classes: int = 1000) -> nn.Sequential:
    """The ResNet-50 shape: a 7x7 stride-2 stem conv and 3x3 max-pool, then 3, 4, 6, 3 bottleneck blocks of
    widths ``width`` x 1, 2, 4, 8 (64: the real network, 23.5 M conv parameters), random weights."""
    stem = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    return bottleneck_resnet(stem, width, [(width, 3, 1), (2 * width, 4, 2), (4 * width, 6, 2), (8 * width, 3, 2)],
                             classes)


def trained_bottleneck_net(seed: int = 0, epochs: int = 15):
    """(model, data): the digits bottleneck network trained on the digits' training split (in eval mode), and
    ``load_digits_tensors(seed)``."""
    torch.manual_seed(seed)
    data = load_digits_tensors(seed)
    model = digits_bottleneck_net()
    train(model, data[0], data[1], epochs, lr=3e-3, seed=seed)
    return model, data
