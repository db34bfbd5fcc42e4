"""Backbones (written here; no torchvision) and their registry.

Every backbone takes float images in [0, 1] of shape (B, C, H, W), C in {1, 3}, 28..84 px, and
normalizes them itself with the ``mean``/``std`` it was built with, so callers never normalize.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from apimeta.models.conv4 import Conv4
from apimeta.models.resnet import ResNet
from apimeta.models.wrappers import Normalized
from apimeta.registry import Registry

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")


@BACKBONES.register("conv4")
def conv4(**kw: Any) -> nn.Module:
    return Conv4(**kw)


@BACKBONES.register("resnet10")
def resnet10(**kw: Any) -> nn.Module:
    return ResNet(blocks=(1, 1, 1, 1), **kw)


@BACKBONES.register("resnet12")
def resnet12(**kw: Any) -> nn.Module:
    return ResNet(blocks=(1, 1, 1, 1), variant="resnet12", **kw)


@BACKBONES.register("resnet18")
def resnet18(**kw: Any) -> nn.Module:
    return ResNet(blocks=(2, 2, 2, 2), **kw)


def build_backbone(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float | None = None,
    bn: str = "transductive",
    adaptive_pool: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels_last: bool = False,
) -> nn.Module:
    """Build a registered backbone wrapped with input normalization.

    ``bn``: ``"transductive"`` (always batch statistics, the meta-model's BN) or ``"standard"``
    (running statistics in eval mode, for API classifiers). ``width``: filters for ``conv4``
    (default 32), width multiplier for the ResNets (default 1.0 = 64-128-256-512).
    """
    factory = BACKBONES.get(name)
    kwargs: dict = dict(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        bn=bn,
        adaptive_pool=adaptive_pool,
    )
    if width is not None:
        kwargs["width"] = width
    net = factory(**kwargs)
    model = Normalized(net, mean=mean, std=std, channels=in_channels)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


__all__ = ["BACKBONES", "Conv4", "Normalized", "ResNet", "build_backbone"]
