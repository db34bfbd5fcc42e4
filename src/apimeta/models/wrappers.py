"""Input normalization as part of the model (as in a real service)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalized(nn.Module):
    """``net((x - mean) / std)`` for x in [0, 1]; mean/std are buffers, not parameters.

    A 1-channel image fed to a 3-channel net is repeated over channels; a 3-channel image fed
    to a 1-channel net is converted to luminance.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels: int = 3,
    ):
        super().__init__()
        self.net = net
        self.channels = channels
        mean = list(mean) if mean is not None else [0.5] * channels
        std = list(std) if std is not None else [0.25] * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values, got {len(mean)}/{len(std)}")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=True)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=True)

    def forward(self, x: Tensor) -> Tensor:
        x = match_channels(x, self.channels)
        return self.net((x - self.mean) / self.std)


def match_channels(x: Tensor, channels: int) -> Tensor:
    """Convert (B, C, H, W) images to ``channels`` channels (1 <-> 3) differentiably."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        w = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
