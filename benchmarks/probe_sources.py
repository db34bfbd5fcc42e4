"""Candidate sources screened but not adopted (BENCHMARKS.md §6, "Other procedural priors"):
defined here, not in :mod:`apimeta.candidates`, so a screen can be rerun without them in the
library. Run as a script, it registers them and runs ``benchmarks/surrogate_kd.py`` with the
same arguments and environment, e.g.

    UNION_CE=1 UNION_CE_P=0.8 SSL=1 KD=1 REINIT=0,2 LRS=0.1 python benchmarks/probe_sources.py \
      leaves-ink-fractals 1000 1000 2022 runs/zoos/emoji-conv4 500,1000

- ``fractals``: iterated function systems (4 random contractive affine maps, singular values
  0.2..0.8, FractalDB-style), rendered by the chaos game (256 chains, 10 burn-in and 8 kept
  iterations), each map's points in its own random colour on a random ground;
- ``textured-leaves``: dead leaves, half of the shapes filled with a two-colour grating (random
  frequency, orientation and phase; smooth or hard-edged) instead of one flat colour;
- ``ink-var``: ``ink-strokes`` with 1-3 px strokes, a random tint per image, and light ink on a
  dark ground for half of the images;
- ``outlined-leaves``: dead leaves whose shapes carry a dark 1 px outline (flat art with
  contours);
- mixtures, image by image: ``leaves-ink-fractals`` and ``leaves-ink-noise`` (dead leaves, ink
  strokes and fractals / smooth noise, a third each), ``tleaves-ink``, ``leaves-inkvar`` and
  ``oleaves-ink`` (half each).
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from apimeta.candidates import (
    SOURCES,
    _draw_strokes,
    dead_leaves,
    ink_strokes,
    paint_leaves,
    smooth_noise,
)

Source = Callable[[int, int, int, torch.Generator], Tensor]


def fractals(
    n: int,
    size: int,
    channels: int,
    generator: torch.Generator,
    maps: int = 4,
    chains: int = 256,
    burn: int = 10,
    keep: int = 8,
) -> Tensor:
    """(n, channels, size, size) in [0, 1]: one IFS fractal per image (see the module doc)."""
    g, dev = generator, generator.device

    def rand(*s: int) -> Tensor:
        return torch.rand(*s, generator=g, device=dev)

    # A = R(a) diag(s1, +-s2) R(b): singular values 0.2..0.8, translation in [-1, 1]^2
    a, b = rand(n, maps) * 2 * torch.pi, rand(n, maps) * 2 * torch.pi
    s = 0.2 + 0.6 * rand(n, maps, 2)
    flip = torch.where(rand(n, maps) < 0.5, -1.0, 1.0)

    def rot(t: Tensor) -> Tensor:
        c, si = t.cos(), t.sin()
        return torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)

    mat = rot(a) @ torch.diag_embed(torch.stack([s[..., 0], s[..., 1] * flip], -1)) @ rot(b)
    shift = rand(n, maps, 2) * 2 - 1
    prob = s.prod(-1)  # a map is picked in proportion to its area, as in FractalDB
    prob = prob / prob.sum(-1, keepdim=True)
    colours = rand(n, maps, channels)
    p = rand(n, chains, 2) * 2 - 1
    rows = torch.arange(n, device=dev).view(n, 1)
    pts, cols = [], []
    for it in range(burn + keep):
        k = torch.multinomial(prob, chains, replacement=True, generator=g)  # (n, chains)
        p = (mat[rows, k] @ p.unsqueeze(-1)).squeeze(-1) + shift[rows, k]
        if it >= burn:
            pts.append(p)
            cols.append(colours[rows, k])
    pt, col = torch.cat(pts, 1), torch.cat(cols, 1)  # (n, P, 2), (n, P, channels)
    lo, hi = pt.amin(1, keepdim=True), pt.amax(1, keepdim=True)
    span = (hi - lo).amax(-1, keepdim=True).clamp_min(1e-6)
    margin = 0.1 * size
    pix = ((pt - (lo + hi) / 2) / span * (size - 2 * margin) + size / 2).long().clamp_(0, size - 1)
    idx = pix[..., 0] * size + pix[..., 1]  # (n, P)
    count = torch.zeros(n, size * size, device=dev).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float32)
    )
    csum = torch.zeros(n, size * size, channels, device=dev).scatter_add_(
        1, idx.unsqueeze(-1).expand(-1, -1, channels), col
    )
    fg = csum / count.clamp_min(1).unsqueeze(-1)
    alpha = (count / 2).clamp(max=1).unsqueeze(-1)
    img = rand(n, 1, channels) * (1 - alpha) + fg * alpha
    return img.view(n, size, size, channels).permute(0, 3, 1, 2).contiguous()


Rand = Callable[..., Tensor]


def textured_leaves(
    n: int, size: int, channels: int, generator: torch.Generator, shapes: int = 24
) -> Tensor:
    """(n, channels, size, size) in [0, 1]: dead leaves, half of the shapes with a grating."""
    coords = torch.arange(size, device=generator.device, dtype=torch.float32)
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)

    def paint(x: Tensor, mask: Callable[[Tensor], Tensor], r: Tensor, rand: Rand) -> Tensor:
        c1, c2 = rand(n, channels, 1, 1), rand(n, channels, 1, 1)
        th = rand(n, 1, 1) * torch.pi
        f = (0.08 + 0.3 * rand(n, 1, 1)) * 2 * torch.pi * 32 / size
        w = 0.5 + 0.5 * torch.sin(
            f * (xx * th.cos() + yy * th.sin()) + rand(n, 1, 1) * 2 * torch.pi
        )
        w = torch.where(rand(n, 1, 1) < 0.5, (w > 0.5).float(), w).unsqueeze(1)
        flat = rand(n, 1, 1, 1) < 0.5
        fill = torch.where(flat, c1.expand(-1, -1, size, size), c1 * (1 - w) + c2 * w)
        return torch.where(mask(r), fill, x)

    return paint_leaves(n, size, channels, generator, shapes, paint)


def ink_var(n: int, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """(n, channels, size, size) in [0, 1]: ink strokes of 1-3 px, tinted, half inverted."""
    g, dev = generator, generator.device
    ground = 0.75 + 0.25 * torch.rand(n, 1, 1, 1, generator=g, device=dev)
    x = ground.expand(n, channels, size, size).contiguous()
    count = torch.randint(6, 13, (n,), generator=g, device=dev)
    for k in range(12):
        drawn = _draw_strokes(x, 1, g, widths=(1, 2, 3), margin=0.15, bend=0.3, ink=(0.0, 0.35))
        x = torch.where((count > k).view(n, 1, 1, 1), drawn, x)
    tint = 0.6 + 0.4 * torch.rand(n, channels, 1, 1, generator=g, device=dev)
    flip = torch.rand(n, 1, 1, 1, generator=g, device=dev) < 0.5
    return torch.where(flip, 1 - x, x) * tint


def outlined_leaves(
    n: int, size: int, channels: int, generator: torch.Generator, shapes: int = 24
) -> Tensor:
    """(n, channels, size, size) in [0, 1]: dead leaves with a dark outline on every shape."""
    line = max(1.0, size / 32)

    def paint(x: Tensor, mask: Callable[[Tensor], Tensor], r: Tensor, rand: Rand) -> Tensor:
        dark = (0.25 * rand(n, 1, 1, 1)).expand(n, channels, 1, 1)
        x = torch.where(mask(r + line), dark, x)
        return torch.where(mask(r), rand(n, channels, 1, 1), x)

    return paint_leaves(n, size, channels, generator, shapes, paint)


def mixture(*parts: tuple[Source, float]) -> Source:
    """A source drawing each image from one of ``parts`` (source, probability); every part
    is drawn in full, so the random stream does not depend on the picks."""

    def source(n: int, size: int, channels: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(n, 1, 1, 1, generator=generator, device=generator.device)
        imgs = [f(n, size, channels, generator) for f, _ in parts]
        bounds = torch.tensor([w for _, w in parts]).cumsum(0).tolist()
        x = imgs[-1]
        for img, bound in reversed(list(zip(imgs[:-1], bounds[:-1], strict=True))):
            x = torch.where(u < bound, img, x)
        return x

    return source


PROBES: dict[str, Source] = {
    "fractals": fractals,
    "textured-leaves": textured_leaves,
    "ink-var": ink_var,
    "outlined-leaves": outlined_leaves,
    "leaves-ink-fractals": mixture((dead_leaves, 1 / 3), (ink_strokes, 1 / 3), (fractals, 1 / 3)),
    "leaves-ink-noise": mixture((dead_leaves, 1 / 3), (ink_strokes, 1 / 3), (smooth_noise, 1 / 3)),
    "tleaves-ink": mixture((textured_leaves, 0.5), (ink_strokes, 0.5)),
    "leaves-inkvar": mixture((dead_leaves, 0.5), (ink_var, 0.5)),
    "oleaves-ink": mixture((outlined_leaves, 0.5), (ink_strokes, 0.5)),
}
for _name, _fn in PROBES.items():
    SOURCES.register(_name)(_fn)

if __name__ == "__main__":
    sys.argv = ["surrogate_kd.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("surrogate_kd.py")), run_name="__main__")
