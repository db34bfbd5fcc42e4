"""Augmentations: differentiable, seeded, per-image, shape-preserving."""

from __future__ import annotations

import pytest
import torch

from apimeta.transforms import (
    center_or_random_crop,
    crop_flip,
    random_crop,
    random_flip,
    random_grey,
    resize,
)


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


def test_color_jitter_and_cutout_are_seeded_bounded_and_per_image() -> None:
    from apimeta.transforms import color_jitter, cutout

    for fn in (color_jitter, cutout):
        a = fn(x(), g(1))
        assert a.shape == x().shape and a.min() >= 0 and a.max() <= 1
        assert torch.equal(a, fn(x(), g(1))) and not torch.equal(a, fn(x(), g(2)))
    same = x(b=1).expand(6, 3, 8, 8).contiguous()  # one image six times: six different views
    for fn in (color_jitter, cutout):
        views = fn(same, g(5))
        assert len({tuple(v.flatten().tolist()) for v in views}) > 1


def test_cutout_zeroes_one_square_and_leaves_the_rest() -> None:
    from apimeta.transforms import cutout

    ones = torch.ones(16, 1, 8, 8)
    out = cutout(ones, g(3), frac=0.25)  # a 2x2 square, clipped at the border
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert ((zeros >= 1) & (zeros <= 4)).all() and (zeros == 4).any()
    assert ((out == 0) | (out == 1)).all()


def test_color_jitter_with_zero_strength_is_the_identity() -> None:
    from apimeta.transforms import color_jitter

    assert torch.allclose(color_jitter(x(), g(1), strength=0.0), x())


def test_augment_applies_named_augmentations_in_order_and_refuses_unknown_names() -> None:
    from apimeta.errors import ConfigError
    from apimeta.transforms import augment, parse_augment, random_flip

    assert parse_augment("") == () and parse_augment(" crop, flip ") == ("crop", "flip")
    assert torch.equal(augment(x(), (), g(1)), x())
    assert torch.equal(augment(x(), ("flip",), g(1)), random_flip(x(), g(1)))
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'"):
        parse_augment("crop,rotate")
    with pytest.raises(ConfigError, match="twice"):
        parse_augment("flip,flip")


def test_resized_crop_flip_is_seeded_bounded_and_full_area_is_identity_or_flip() -> None:
    from apimeta.transforms import resized_crop_flip

    x = torch.rand(16, 3, 12, 12)
    a = resized_crop_flip(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, resized_crop_flip(x, torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, x)
    # the whole image: each output is the image or its mirror
    full = resized_crop_flip(x, torch.Generator().manual_seed(4), min_area=1.0, max_aspect=1.0)
    same = (full - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (full - x.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert bool((same | mirrored).all()) and same.any() and mirrored.any()


def test_resized_crop_flip_max_area_bounds_the_crop() -> None:
    from apimeta.transforms import resized_crop_flip

    # a horizontal ramp 0..1: a crop of half the width spans half the ramp
    ramp = torch.linspace(0, 1, 32).expand(8, 3, 32, 32).contiguous()

    def span(y: torch.Tensor) -> torch.Tensor:
        return (y[..., 16, :].amax(-1) - y[..., 16, :].amin(-1))[:, 0]

    small = resized_crop_flip(ramp, torch.Generator().manual_seed(5), 0.25, 1.0, max_area=0.25)
    assert torch.allclose(span(small), torch.full((8,), 0.5), atol=0.05)
    # the default (max_area 1): crops of 0.25..1 of the area, wider spans too
    wide = resized_crop_flip(ramp, torch.Generator().manual_seed(5), 0.25, 1.0)
    assert bool((span(wide) >= 0.45).all()) and span(wide).max() > 0.6


def test_colour_distort_is_seeded_bounded_and_identity_at_zero_strength() -> None:
    from apimeta.transforms import colour_distort

    a = colour_distort(x(), g(1))
    assert a.shape == x().shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, colour_distort(x(), g(1))) and not torch.equal(
        a, colour_distort(x(), g(2))
    )
    # no saturation change, no hue turn, never grey: the image back (up to YIQ round-off)
    assert torch.allclose(colour_distort(x(), g(1), 0.0, 0.0, 0.0), x(), atol=1e-5)
    grey = torch.rand(4, 1, 8, 8)
    assert colour_distort(grey, g(1)) is grey  # no colour to change
    with pytest.raises(ValueError, match="RGB or grey"):
        colour_distort(torch.rand(2, 2, 4, 4), g(1))


def test_colour_distort_greys_with_p_keeps_luma_and_turns_hue() -> None:
    from apimeta.transforms import colour_distort

    imgs = torch.rand(400, 3, 4, 4) * 0.5 + 0.25  # mid-range: no clamping
    out = colour_distort(imgs, g(3), saturation=0.0, hue=0.0, grey_p=1.0)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    luma = 0.299 * imgs[:, 0] + 0.587 * imgs[:, 1] + 0.114 * imgs[:, 2]
    assert torch.allclose(out[:, 0], luma, atol=1e-5)  # grey is the image's luma
    part = colour_distort(imgs, g(3), saturation=0.0, hue=0.0, grey_p=0.2)
    greyed = ((part[:, 0] - part[:, 1]).abs().amax(dim=(1, 2)) < 1e-6).float().mean()
    assert 0.12 < float(greyed) < 0.28  # about one image in five
    # a pure hue turn keeps each pixel's luma (pale colours: no clamping) and changes colour
    pale = 0.5 + 0.2 * (imgs - 0.5)
    turned = colour_distort(pale, g(4), saturation=0.0, hue=0.1, grey_p=0.0)
    luma_p = 0.299 * pale[:, 0] + 0.587 * pale[:, 1] + 0.114 * pale[:, 2]
    luma_t = 0.299 * turned[:, 0] + 0.587 * turned[:, 1] + 0.114 * turned[:, 2]
    assert torch.allclose(luma_t, luma_p, atol=1e-4)
    assert (turned - pale).abs().amax() > 0.01
    red = torch.tensor([0.7, 0.3, 0.3]).view(1, 3, 1, 1).expand(64, 3, 1, 1).contiguous()
    sat = colour_distort(red, g(5), saturation=0.4, hue=0.0, grey_p=0.0)
    spread = sat.amax(1) - sat.amin(1)  # chroma: scaled by 0.6..1.4 around 0.4
    assert float(spread.min()) >= 0.4 * 0.6 - 1e-5 and float(spread.max()) <= 0.4 * 1.4 + 1e-5
    assert float(spread.max() - spread.min()) > 0.2


def test_random_grey_turns_rgb_images_into_their_luma_with_probability_p():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 5, 5, generator=g)
    all_grey = random_grey(x, torch.Generator().manual_seed(1), 1.0)
    assert torch.equal(all_grey[:, 0], all_grey[:, 1]) and torch.equal(
        all_grey[:, 1], all_grey[:, 2]
    )
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(all_grey[:, 0], luma)
    assert torch.equal(random_grey(x, torch.Generator().manual_seed(1), 0.0), x)
    some = random_grey(x, torch.Generator().manual_seed(1), 0.5)
    greyed = (some[:, 0] == some[:, 1]).flatten(1).all(1) & (some[:, 1] == some[:, 2]).flatten(
        1
    ).all(1)
    assert 10 < int(greyed.sum()) < 54  # about half of 64
    assert torch.equal(some[~greyed], x[~greyed])
    # grey images pass unchanged and draw nothing
    g2 = torch.Generator().manual_seed(3)
    before = g2.get_state()
    one = torch.rand(4, 1, 5, 5)
    assert random_grey(one, g2, 1.0) is one and torch.equal(g2.get_state(), before)
