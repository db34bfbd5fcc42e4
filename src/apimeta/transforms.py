"""Differentiable, per-image, seeded image augmentations (no torchvision).

All functions take float images (B, C, H, W) and an explicit ``torch.Generator``; the output is
differentiable with respect to the input, so recovery can back-propagate through them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from apimeta.errors import ConfigError
from apimeta.registry import Registry


def random_crop(x: Tensor, pad: int, generator: torch.Generator) -> Tensor:
    """Zero-pad by ``pad`` pixels, then take a random HxW crop per image."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = generator.device  # drawn where the generator lives (the run's device: no copies)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev).to(x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device).view(1, h)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device).view(1, w)).view(b, 1, 1, w)
    c = x.shape[1]
    idx_r = rows.expand(b, c, h, w + 2 * pad)
    xr = xp.gather(2, idx_r)
    idx_c = cols.expand(b, c, h, w)
    return xr.gather(3, idx_c)


def random_flip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image horizontally with probability ``p``."""
    draw = torch.rand(x.shape[0], generator=generator, device=generator.device)
    flip = (draw < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """The method's augmentation: random crop of the 4-px zero-padded image, random h-flip."""
    return random_flip(random_crop(x, pad, generator), generator)


def resized_crop_flip(
    x: Tensor,
    generator: torch.Generator,
    min_area: float = 0.25,
    max_aspect: float = 4 / 3,
    max_area: float = 1.0,
) -> Tensor:
    """SimCLR's view: per image a random crop of ``min_area``..``max_area`` of the area (aspect
    1/max_aspect..max_aspect; a side that would pass the border is clipped), resized back to the
    input size (bilinear), flipped with p 0.5. (B, C, H, W) -> (B, C, H, W)."""
    b = x.shape[0]
    u = torch.rand(5, b, generator=generator, device=generator.device).to(x.device)
    area = min_area + (max_area - min_area) * u[0]
    aspect = torch.exp((u[1] - 0.5) * 2 * math.log(max_aspect))
    sx, sy = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    flip = torch.where(u[4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(sx)
    row_x = torch.stack([sx * flip, zero, (1 - sx) * (2 * u[2] - 1)], 1)
    row_y = torch.stack([zero, sy, (1 - sy) * (2 * u[3] - 1)], 1)
    theta = torch.stack([row_x, row_y], 1).to(x.dtype)  # (B, 2, 3): output -> input coords
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def to_uint8(x: Tensor) -> Tensor:
    """Images in [0, 1] (any float dtype) -> uint8, rounded (the PNG precision, 4x less RAM)."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


def resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize to ``size`` x ``size`` (antialiased when shrinking); identity if equal."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    shrink = size < x.shape[-1]
    return F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
    )


def center_or_random_crop(x: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """Crop ``size`` x ``size`` patches: random per image with a generator, else centered."""
    b, _, h, w = x.shape
    if h == size and w == size:
        return x
    if generator is None:
        top, left = (h - size) // 2, (w - size) // 2
        return x[:, :, top : top + size, left : left + size]
    tops = torch.randint(0, h - size + 1, (b,), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (b,), generator=generator).tolist()
    return torch.stack(
        [
            x[i, :, t : t + size, left : left + size]
            for i, (t, left) in enumerate(zip(tops, lefts, strict=True))
        ]
    )


def color_jitter(x: Tensor, generator: torch.Generator, strength: float = 0.4) -> Tensor:
    """Per image, scale brightness by a factor in [1 - s, 1 + s] and contrast around the image
    mean by another; grey images (C = 1) get the same. Output clamped to [0, 1]."""
    b = x.shape[0]
    dev = generator.device
    u = torch.rand(2, b, generator=generator, device=dev).to(x.device)
    bright = (1 + strength * (2 * u[0] - 1)).view(b, 1, 1, 1)
    contrast = (1 + strength * (2 * u[1] - 1)).view(b, 1, 1, 1)
    y = x * bright
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    return ((y - mean) * contrast + mean).clamp(0.0, 1.0)


#: RGB -> YIQ (luma Y, chroma I and Q); a hue change is a rotation of (I, Q)
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB = torch.linalg.inv(_YIQ)  # YIQ -> RGB


def _luma(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma (YIQ's Y)."""
    return torch.einsum("c,bchw->bhw", _YIQ[0].to(x.device, x.dtype), x).unsqueeze(1)


def random_grey(x: Tensor, generator: torch.Generator, p: float) -> Tensor:
    """Each (B, 3, H, W) image in [0, 1] replaced by its luma (on all 3 channels) with
    probability ``p``; grey images (C = 1) are returned as they are, drawing nothing."""
    if x.shape[1] == 1:
        return x
    b = x.shape[0]
    u = torch.rand(b, generator=generator, device=generator.device).to(x.device)
    return _grey_where(x, u < p)


def _grey_where(x: Tensor, mask: Tensor) -> Tensor:
    """(B, 3, H, W) images with those where the (B,) bool ``mask`` holds replaced by their luma."""
    return torch.where(mask.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)


def colour_distort(
    x: Tensor,
    generator: torch.Generator,
    saturation: float = 0.4,
    hue: float = 0.1,
    grey_p: float = 0.2,
) -> Tensor:
    """The rest of SimCLR's colour distortion, per image: saturation scaled by a factor in
    [1 - s, 1 + s] (a blend with the image's luma), hue rotated by up to ``hue`` turns (a
    rotation of the YIQ chroma plane), then luma alone (grey) with probability ``grey_p``.
    (B, 3, H, W) in [0, 1] -> the same, clamped to [0, 1]; grey images (C = 1) have no colour
    to change and are returned as they are."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"colour_distort needs RGB or grey images, got {tuple(x.shape)}")
    b = x.shape[0]
    u = torch.rand(3, b, generator=generator, device=generator.device).to(x.device)
    yiq = _YIQ.to(x.device, x.dtype)
    luma = _luma(x)
    sat = (1 + saturation * (2 * u[0] - 1)).view(b, 1, 1, 1)
    x = (luma + sat * (x - luma)).clamp(0.0, 1.0)
    angle = (2 * u[1] - 1) * hue * 2 * math.pi
    cos, sin = angle.cos().view(b, 1, 1), angle.sin().view(b, 1, 1)
    y, i, q = torch.einsum("dc,bchw->bdhw", yiq, x).unbind(1)
    turned = torch.stack([y, i * cos - q * sin, i * sin + q * cos], 1)
    x = torch.einsum("dc,bchw->bdhw", _RGB.to(x.device, x.dtype), turned).clamp(0.0, 1.0)
    return _grey_where(x, u[2] < grey_p)


def cutout(x: Tensor, generator: torch.Generator, frac: float = 0.25) -> Tensor:
    """Zero one random square of side ``frac`` * H per image (it may reach past the border)."""
    b, _, h, w = x.shape
    side = max(1, round(frac * h))
    dev = generator.device
    cy = torch.randint(0, h, (b,), generator=generator, device=dev).to(x.device)
    cx = torch.randint(0, w, (b,), generator=generator, device=dev).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = (cy - side // 2).view(b, 1, 1), (cx - side // 2).view(b, 1, 1)
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return x * (~inside).unsqueeze(1).to(x.dtype)


Augmentation = Callable[[Tensor, torch.Generator], Tensor]
#: Replay augmentations by name (``memory.augment: "crop,flip,jitter,cutout"``).
AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")
AUGMENTATIONS.register("crop")(lambda x, g: random_crop(x, 4, g))
AUGMENTATIONS.register("flip")(random_flip)
AUGMENTATIONS.register("jitter")(color_jitter)
AUGMENTATIONS.register("cutout")(cutout)


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"crop,flip"`` -> ``("crop", "flip")``; "" -> (); unknown names raise ConfigError."""
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    for n in names:
        AUGMENTATIONS.get(n)
    if len(set(names)) != len(names):
        raise ConfigError(f"augmentation {spec!r} names an augmentation twice")
    return names


def augment(x: Tensor, names: tuple[str, ...], generator: torch.Generator) -> Tensor:
    """Apply the named augmentations in order to (B, C, H, W) images in [0, 1]."""
    for n in names:
        x = AUGMENTATIONS.get(n)(x, generator)
    return x
