"""The recovery generator G_phi of docs/design.md 3.2 (a DCGAN-style decoder, no label input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Generator(nn.Module):
    """z (B, nz) -> images (B, channels, image_size, image_size) in [0, 1].

    Linear(nz -> 2ngf * init^2) -> reshape -> BN -> up x2 -> conv3x3 (no bias) -> BN -> LReLU(0.2)
    -> up x2 -> conv3x3 2ngf->ngf (no bias) -> BN -> LReLU(0.2) -> conv3x3 ngf->channels -> sigmoid,
    with init = image_size // 4 (8 at 32 px, 21 at 84 px). With the defaults nz=256, ngf=64 this
    is the paper's generator (128 channels after the linear layer). Sizes not divisible by 4 are
    bilinearly resized to ``image_size`` after the sigmoid. Upsampling is nearest-neighbour.
    """

    def __init__(self, nz: int = 256, ngf: int = 64, image_size: int = 32, channels: int = 3):
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.nz, self.ngf, self.image_size, self.channels = nz, ngf, image_size, channels
        self.init_size = image_size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size**2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z).view(z.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        img = self.conv_blocks(out)
        if img.shape[-1] != self.image_size:
            img = F.interpolate(
                img, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            ).clamp(0.0, 1.0)
        return img


@torch.no_grad()
def reset_parameters(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """docs/design.md 3.2: conv/linear weights ~ N(0, 0.02^2), biases 0, BN weights
    ~ N(1, 0.02^2), BN biases 0, BN running statistics reset. In place; returns ``module``.

    Values are drawn on ``generator``'s device in module order, then copied to each parameter.
    """

    def normal(p: Tensor, mean: float) -> None:
        v = torch.randn(p.shape, generator=generator, device=generator.device) * 0.02 + mean
        p.copy_(v.to(p.device, p.dtype))

    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.ConvTranspose2d):
            normal(m.weight, 0.0)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            if m.weight is not None:
                normal(m.weight, 1.0)
            if m.bias is not None:
                m.bias.zero_()
            if m.track_running_stats:
                m.reset_running_stats()
    return module


__all__ = ["Generator", "reset_parameters"]
