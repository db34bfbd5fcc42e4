"""Conv4: four [3x3 conv -> BN -> ReLU -> 2x2 max-pool] blocks and a linear head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def norm2d(channels: int, bn: str) -> nn.Module:
    """``transductive``: batch statistics always (no running stats); ``standard``: usual BN."""
    if bn == "transductive":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if bn == "standard":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"bn must be 'transductive' or 'standard', got {bn!r}")


class Conv4(nn.Module):
    """Input (B, C, s, s) with s in 28..84 -> logits (B, num_classes).

    Head input is ``width * (s // 16) ** 2`` (128 at s=32, width 32), or ``width`` with
    ``adaptive_pool=True`` (AdaptiveMaxPool2d(1); one network for every input size).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        width: float = 32,
        bn: str = "transductive",
        adaptive_pool: bool = False,
    ):
        super().__init__()
        w = int(width)
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(c, w, 3, padding=1),
                norm2d(w, bn),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(2),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1) if adaptive_pool else nn.Identity()
        side = 1 if adaptive_pool else max(image_size // 16, 1)
        self.classifier = nn.Linear(w * side * side, num_classes)

    def stages(self) -> list[nn.Module]:
        """The four conv-BN-ReLU-pool blocks, in order (:mod:`apimeta.models.stages`)."""
        return [self.features[i : i + 4] for i in range(0, len(self.features), 4)]

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
