"""Backbones: forward shapes on 1/3 channels and 32/84 px, conv4 head sizes, BN modes, wrappers."""

from __future__ import annotations

import pytest
import torch

from apimeta.models import BACKBONES, build_backbone
from apimeta.models.wrappers import Normalized, match_channels

SMALL = {"conv4": 4, "resnet10": 0.0625, "resnet12": 0.0625, "resnet18": 0.0625}


def test_registry_lists_all_backbones() -> None:
    assert set(BACKBONES.names()) >= {"conv4", "resnet10", "resnet12", "resnet18"}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [32, 84])
def test_forward_shapes(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(
        name, num_classes=5, in_channels=channels, image_size=size, width=SMALL[name]
    )
    x = torch.rand(2, channels, size, size)
    out = net(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(("size", "features"), [(32, 128), (84, 800), (28, 32)])
def test_conv4_head_size(size: int, features: int) -> None:
    net = build_backbone("conv4", num_classes=5, image_size=size, width=32)
    assert net.net.classifier.in_features == features
    assert net(torch.rand(2, 3, size, size)).shape == (2, 5)


def test_conv4_adaptive_pool_accepts_every_size() -> None:
    net = build_backbone("conv4", num_classes=5, width=8, adaptive_pool=True)
    assert net.net.classifier.in_features == 8
    for s in (32, 84):
        assert net(torch.rand(2, 3, s, s)).shape == (2, 5)


def test_resnet_width_multiplier() -> None:
    full = build_backbone("resnet18", num_classes=5)
    quarter = build_backbone("resnet18", num_classes=5, width=0.25)
    assert full.net.classifier.in_features == 512
    assert quarter.net.classifier.in_features == 128
    n_full = sum(p.numel() for p in full.parameters())
    n_quarter = sum(p.numel() for p in quarter.parameters())
    assert 11e6 < n_full < 11.3e6  # CIFAR-stem ResNet-18 with 5 outputs
    assert n_quarter < n_full / 10


def test_transductive_bn_uses_batch_statistics_in_eval() -> None:
    torch.manual_seed(0)
    net = build_backbone("conv4", num_classes=5, width=4, bn="transductive").eval()
    x = torch.rand(4, 3, 32, 32)
    # batch statistics: one image's output depends on the rest of the batch even in eval mode
    assert not torch.allclose(net(x)[:1], net(x[:1].repeat(4, 1, 1, 1))[:1], atol=1e-5)
    assert not any(b.numel() and "running" in n for n, b in net.named_buffers())


def test_standard_bn_eval_is_per_image() -> None:
    torch.manual_seed(0)
    net = build_backbone("conv4", num_classes=5, width=4, bn="standard")
    net.train()
    net(torch.rand(8, 3, 32, 32))  # update running stats
    net.eval()
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(net(x)[:1], net(x[:1]))


def test_bad_bn_mode() -> None:
    with pytest.raises(ValueError, match="bn must be"):
        build_backbone("conv4", num_classes=5, bn="group")


def test_unknown_backbone() -> None:
    with pytest.raises(Exception, match="vgg"):
        build_backbone("vgg", num_classes=5)


def test_normalization_inside_model() -> None:
    net = torch.nn.Identity()
    model = Normalized(net, mean=[0.5, 0.4, 0.3], std=[0.5, 0.2, 0.1], channels=3)
    x = torch.full((1, 3, 2, 2), 0.5)
    out = model(x)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.5, 2.0]))
    assert not list(model.parameters())  # mean/std are buffers
    assert {"mean", "std"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="mean/std need 3"):
        Normalized(net, mean=[0.5], std=[0.5], channels=3)


def test_match_channels() -> None:
    gray = torch.rand(2, 1, 4, 4)
    rgb = match_channels(gray, 3)
    assert rgb.shape == (2, 3, 4, 4) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = match_channels(rgb, 1)
    torch.testing.assert_close(back, gray)  # luminance weights sum to 1
    assert match_channels(gray, 1) is gray
    with pytest.raises(ValueError, match="cannot convert"):
        match_channels(torch.rand(1, 2, 4, 4), 3)
    x = torch.rand(1, 3, 4, 4, requires_grad=True)
    match_channels(x, 1).sum().backward()
    torch.testing.assert_close(x.grad[0, :, 0, 0], torch.tensor([0.299, 0.587, 0.114]))
