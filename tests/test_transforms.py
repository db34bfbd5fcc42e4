"""Augmentations: differentiable, seeded, per-image, shape-preserving."""

from __future__ import annotations

import pytest
import torch

from apimeta.transforms import center_or_random_crop, crop_flip, random_crop, random_flip, resize


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def x(b: int = 6, c: int = 3, s: int = 8) -> torch.Tensor:
    return torch.rand(b, c, s, s, generator=g(123))


def test_crop_flip_is_seeded_and_shape_preserving() -> None:
    a = crop_flip(x(), g(1))
    assert a.shape == (6, 3, 8, 8)
    assert torch.equal(a, crop_flip(x(), g(1)))
    assert not torch.equal(a, crop_flip(x(), g(2)))


def test_crop_flip_is_differentiable() -> None:
    inp = x().double().requires_grad_(True)
    out = crop_flip(inp, g(3))
    w = torch.rand(out.shape, dtype=torch.float64, generator=g(4))
    (out * w).sum().backward()
    assert inp.grad is not None and inp.grad.abs().sum() > 0
    # the map is linear in x: each output pixel copies one input pixel (or padding zero)
    small = inp[:2, :1, :5, :5].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: crop_flip(t, g(3)), (small,))


def test_random_crop_is_a_shift_per_image() -> None:
    inp = torch.arange(36.0).view(1, 1, 6, 6).repeat(50, 1, 1, 1)
    out = random_crop(inp, 2, g(0))
    # each output is the padded image shifted by (dy, dx) in [-2, 2]: find it
    shifts = set()
    for i in range(50):
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.nn.functional.pad(inp[i], (2, 2, 2, 2))[
                    :, 2 + dy : 8 + dy, 2 + dx : 8 + dx
                ]
                if torch.equal(out[i], ref):
                    shifts.add((dy, dx))
                    break
            else:
                continue
            break
        else:
            pytest.fail(f"image {i} is not a shifted crop")
    assert len(shifts) > 5  # per-image, not per-batch
    assert torch.equal(random_crop(inp, 0, g(0)), inp)


def test_random_flip_probability_extremes_and_per_image() -> None:
    inp = x(40)
    assert torch.equal(random_flip(inp, g(0), p=0.0), inp)
    assert torch.equal(random_flip(inp, g(0), p=1.0), inp.flip(3))
    out = random_flip(inp, g(0))
    flipped = [torch.equal(o, i.flip(2)) for o, i in zip(out, inp, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, inp, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 40


def test_resize() -> None:
    inp = x(2, 1, 8).requires_grad_(True)
    assert resize(inp, 8) is inp
    up = resize(inp, 16)
    down = resize(inp, 4)
    assert up.shape == (2, 1, 16, 16) and down.shape == (2, 1, 4, 4)
    down.sum().backward()
    assert inp.grad is not None
    const = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(resize(const, 5), torch.full((1, 3, 5, 5), 0.3))


def test_center_or_random_crop() -> None:
    inp = torch.arange(64.0).view(1, 1, 8, 8).repeat(10, 1, 1, 1)
    c = center_or_random_crop(inp, 4, None)
    assert torch.equal(c, inp[:, :, 2:6, 2:6])
    r1 = center_or_random_crop(inp, 4, g(5))
    assert r1.shape == (10, 1, 4, 4)
    assert torch.equal(r1, center_or_random_crop(inp, 4, g(5)))
    assert len({t[0, 0, 0].item() for t in r1}) > 1  # per-image positions
    assert center_or_random_crop(inp, 8, g(0)) is inp
