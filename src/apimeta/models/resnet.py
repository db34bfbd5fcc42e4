"""CIFAR-style ResNets (3x3 stride-1 stem, no max-pool): resnet10/18 and a resnet12 variant."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from apimeta.models.conv4 import norm2d


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 projection when shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, bn: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm2d(cout, bn)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm2d(cout, bn)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm2d(cout, bn)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Block12(nn.Module):
    """ResNet-12 block: three 3x3 convs, 1x1 shortcut, leaky ReLU, 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, bn: str):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(cin if i == 0 else cout, cout, 3, 1, 1, bias=False) for i in range(3)]
        )
        self.bns = nn.ModuleList([norm2d(cout, bn) for _ in range(3)])
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), norm2d(cout, bn))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            out = bn(conv(out))
            if i < 2:
                out = F.leaky_relu(out, 0.1)
        return self.pool(F.leaky_relu(out + self.shortcut(x), 0.1))


class ResNet(nn.Module):
    """(B, C, s, s) -> (B, num_classes). ``width`` multiplies the 64-128-256-512 stage widths."""

    def __init__(
        self,
        num_classes: int,
        blocks: Sequence[int] = (2, 2, 2, 2),
        in_channels: int = 3,
        image_size: int = 32,
        width: float = 1.0,
        bn: str = "standard",
        adaptive_pool: bool = True,
        variant: str = "basic",
    ):
        super().__init__()
        del image_size, adaptive_pool  # global average pooling accepts every size
        widths = [max(round(c * width), 4) for c in (64, 128, 256, 512)]
        self.variant = variant
        if variant == "resnet12":
            stages, c = [], in_channels
            for w in widths:
                stages.append(Block12(c, w, bn))
                c = w
            self.stem: nn.Module = nn.Identity()
            self.layers = nn.Sequential(*stages)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                norm2d(widths[0], bn),
                nn.ReLU(),
            )
            stages, c = [], widths[0]
            for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
                for j in range(n):
                    stages.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, bn))
                    c = w
            self.layers = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def stages(self) -> list[nn.Module]:
        """The stem (if any) and the residual blocks, in order (:mod:`apimeta.models.stages`)."""
        stem = [] if isinstance(self.stem, nn.Identity) else [self.stem]
        return [*stem, *self.layers]

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
