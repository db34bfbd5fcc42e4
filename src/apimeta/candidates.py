"""Procedural candidate images: inputs an API labels with one query each, with no data and no
generator (docs/design.md 4.9).

Recovery (:mod:`apimeta.recovery`) trains a generator through zero-order estimates to find
images an API assigns to each class: 50 iterations x (1 + q) queries per image, and the images
are near-copies of one blob per class. A procedural source instead draws images from a generic
image model and asks the API once what it sees in each; the labels are soft (the API's outputs),
so distillation on them transfers how the API responds to shapes, colours and edges it was
never shown. Sources are registered in :data:`SOURCES`: ``source(n, size, channels,
generator) -> (n, channels, size, size)`` float in [0, 1], on the generator's device.

- ``dead-leaves``: the dead-leaves model (occluding disks and rectangles with power-law sizes,
  random colours, on a random background), a classic model of natural-image statistics;
- ``smooth-noise``: uniform colour noise at a random resolution (4..16 px), upsampled bilinearly;
- ``icons``: one large outlined object with small outlined details on a plain ground (a prior on
  pictogram-style inputs such as emoji).

``folder`` (:func:`from_folder`, not a procedural source and NOT data-free): images drawn from a
user-supplied folder of unlabelled images (public images of the APIs' domain, or of any other),
again labelled with one query each. A domain prior the user brings; report it as its own
setting.

:func:`mixups` makes candidates from images an API has already seen (e.g. recovered ones):
convex combinations of random pairs, again labelled with one query each.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from apimeta.errors import ConfigError
from apimeta.registry import Registry

log = logging.getLogger(__name__)

CandidateSource = Callable[[int, int, int, torch.Generator], Tensor]

#: procedural image sources (``recovery.source`` names them)
SOURCES: Registry[CandidateSource] = Registry("candidate source")


LeafPainter = Callable[[Tensor, Callable[[Tensor], Tensor], Tensor, Callable[..., Tensor]], Tensor]


def paint_leaves(
    n: int, size: int, channels: int, generator: torch.Generator, shapes: int, paint: LeafPainter
) -> Tensor:
    """The dead-leaves model with a custom painter: a ground of random colour (n, channels,
    size, size), then ``shapes`` disks or rectangles (half each, aspect 0.5..1.5; radii with
    density ~ r^-3 between 1.5 px and size / 2), each handed to ``paint(x, mask, r, rand)``:
    ``mask(rr)`` (n, 1, s, s) is the shape at radius ``rr``, ``rand(*shape)`` the seeded
    uniform draw; it returns the new ``x``."""
    g, dev = generator, generator.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, device=dev)

    x = rand(n, channels, 1, 1).expand(n, channels, size, size).contiguous()
    coords = torch.arange(size, device=dev, dtype=torch.float32)
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    lo, hi = 1.5, size / 2
    for _ in range(shapes):
        cy, cx = rand(n, 1, 1) * size, rand(n, 1, 1) * size
        r = (lo**-2 - rand(n, 1, 1) * (lo**-2 - hi**-2)) ** -0.5  # inverse CDF of r^-3
        aspect = 0.5 + rand(n, 1, 1)
        use_rect = rand(n, 1, 1) < 0.5

        def mask(rr: Tensor, cy: Tensor = cy, cx: Tensor = cx, aspect: Tensor = aspect,
                 use_rect: Tensor = use_rect) -> Tensor:  # fmt: skip
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rr**2
            rect = ((yy - cy).abs() <= rr * aspect) & ((xx - cx).abs() <= rr / aspect)
            return torch.where(use_rect, rect, disk).unsqueeze(1)

        x = paint(x, mask, r, rand)
    return x


@SOURCES.register("dead-leaves")
def dead_leaves(
    n: int, size: int, channels: int, generator: torch.Generator, shapes: int = 24
) -> Tensor:
    """(n, channels, size, size) in [0, 1]: a random background, then ``shapes`` disks or
    rectangles (half each, aspect 0.5..1.5) of random colour painted over each other; radii
    have density ~ r^-3 between 1.5 px and size / 2 (many small shapes, few large)."""

    def paint(x: Tensor, mask: Callable[[Tensor], Tensor], r: Tensor, rand: Callable) -> Tensor:
        return _paint(x, mask(r), rand(n, channels, 1, 1))

    return paint_leaves(n, size, channels, generator, shapes, paint)


def _paint(x: Tensor, mask: Tensor, colour: Tensor) -> Tensor:
    """``x`` (n, c, s, s) with ``colour`` (n, c, 1, 1) where ``mask`` (n, 1, s, s) is true."""
    return torch.where(mask, colour, x)


@SOURCES.register("icons")
def icons(n: int, size: int, channels: int, generator: torch.Generator, details: int = 4) -> Tensor:
    """(n, channels, size, size) in [0, 1]: pictogram-like images — a plain background and one
    large object near the centre (a disk, an ellipse or a rounded box, radius 0.25..0.45 of the
    image) with a dark outline, carrying up to ``details`` small outlined disks or boxes inside
    it. A prior on icon-style inputs (one outlined object on a plain ground, as in emoji); not
    a generic natural-image model like ``dead-leaves``. Screened against dead leaves as bbkd's
    candidates on emoji APIs (BENCHMARKS.md §6): no 1-shot gain over random init, where dead
    leaves give +2.4 to +3.2."""
    g, dev = generator, generator.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, device=dev)

    coords = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)

    def shape_mask(cy: Tensor, cx: Tensor, ry: Tensor, rx: Tensor, kind: Tensor) -> Tensor:
        """(n, 1, s, s): an ellipse (kind 0) or a rounded box (kind 1) of radii ry, rx."""
        dy, dx = (yy - cy) / ry, (xx - cx) / rx
        ellipse = dy**2 + dx**2 <= 1.0
        box = dy.abs() ** 4 + dx.abs() ** 4 <= 1.0  # a superellipse: a box with round corners
        return torch.where(kind, box, ellipse).unsqueeze(1)

    def outline_colour(fill: Tensor) -> Tensor:
        return fill * 0.25 * rand(n, 1, 1, 1)  # a dark shade of the fill, or near black

    x = rand(n, channels, 1, 1).expand(n, channels, size, size).contiguous()
    cy = size / 2 + (rand(n, 1, 1) - 0.5) * size * 0.15
    cx = size / 2 + (rand(n, 1, 1) - 0.5) * size * 0.15
    r = size * (0.25 + 0.2 * rand(n, 1, 1))
    aspect = 0.75 + 0.5 * rand(n, 1, 1)
    ry, rx = r * aspect.sqrt(), r / aspect.sqrt()
    kind = rand(n, 1, 1) < 0.4
    line = size / 32 * (1.0 + rand(n, 1, 1))  # outline width, 1..2 px at 32 px
    fill = rand(n, channels, 1, 1)
    x = _paint(x, shape_mask(cy, cx, ry + line, rx + line, kind), outline_colour(fill))
    x = _paint(x, shape_mask(cy, cx, ry, rx, kind), fill)
    for _ in range(details):
        present = (rand(n, 1, 1, 1) < 0.7).expand(n, 1, size, size)
        ang = rand(n, 1, 1) * 2 * torch.pi
        dist = 0.6 * rand(n, 1, 1)  # inside the object
        dy, dx = cy + dist * ry * ang.sin(), cx + dist * rx * ang.cos()
        rr = size * (0.04 + 0.1 * rand(n, 1, 1))
        k = rand(n, 1, 1) < 0.3
        colour = rand(n, channels, 1, 1)
        outer = shape_mask(dy, dx, rr + line * 0.7, rr + line * 0.7, k) & present
        x = _paint(x, outer, outline_colour(colour))
        x = _paint(x, shape_mask(dy, dx, rr, rr, k) & present, colour)
    return x


def _draw_strokes(
    x: Tensor,
    strokes: int,
    generator: torch.Generator,
    widths: tuple[int, ...] = (1, 2, 3),
    margin: float = 0.0,
    bend: float | None = None,
    ink: tuple[float, float] | None = None,
) -> Tensor:
    """``x`` (n, c, s, s) with ``strokes`` quadratic Bezier curves painted over it, one after
    another, each ``widths`` px wide at 32 px (one of them per curve, scaled with s). End
    points uniform in the image less a ``margin`` (a fraction of s) on every side; the middle
    control point uniform there too, or, with ``bend``, the end points' midpoint moved by up to
    ``bend`` x s / 2 (near-straight strokes). Colour: random per curve, or with ``ink`` one
    grey level in [ink[0], ink[1]] on every channel. A curve is rasterized by marking the
    pixels of 4 s points along it, then widened by a max-pool."""
    g, dev = generator, generator.device
    n, c, size, _ = x.shape
    t = torch.linspace(0.0, 1.0, 4 * size, device=dev).view(1, -1, 1)  # (1, T, 1)
    rows = torch.arange(n, device=dev).view(n, 1)
    scale = max(1, round(size / 32))
    widths = tuple(k * scale for k in widths)
    lo_px, span = margin * size, (1 - 2 * margin) * size
    for _ in range(strokes):
        p = lo_px + torch.rand(n, 3, 1, 2, generator=g, device=dev) * span  # (n, 3, 1, 2)
        if bend is not None:
            off = (torch.rand(n, 1, 2, generator=g, device=dev) - 0.5) * bend * size
            p = torch.stack([p[:, 0], (p[:, 0] + p[:, 2]) / 2 + off, p[:, 2]], 1)
        curve = (1 - t) ** 2 * p[:, 0] + 2 * (1 - t) * t * p[:, 1] + t**2 * p[:, 2]  # (n, T, 2)
        pix = curve.long().clamp_(0, size - 1)
        line = torch.zeros(n, size * size, device=dev)
        line[rows, pix[..., 0] * size + pix[..., 1]] = 1.0
        line = line.view(n, 1, size, size)
        pick = torch.randint(len(widths), (n, 1, 1, 1), generator=g, device=dev)
        mask = torch.zeros_like(line, dtype=torch.bool)
        for i, k in enumerate(widths):
            lo, hi = (k - 1) // 2, k // 2
            wide = F.max_pool2d(F.pad(line, (lo, hi, lo, hi)), k, stride=1) > 0
            mask |= wide & (pick == i)
        if ink is None:
            colour = torch.rand(n, c, 1, 1, generator=g, device=dev)
        else:
            grey = ink[0] + (ink[1] - ink[0]) * torch.rand(n, 1, 1, 1, generator=g, device=dev)
            colour = grey.expand(n, c, 1, 1)
        x = _paint(x, mask, colour)
    return x


@SOURCES.register("strokes")
def strokes(n: int, size: int, channels: int, generator: torch.Generator, count: int = 8) -> Tensor:
    """(n, channels, size, size) in [0, 1]: glyph-like images, ``count`` curved strokes
    (quadratic Bezier curves of random width and colour) on a plain background of random
    colour. A prior on line structure (edges with two sides, bends, crossings) that dead
    leaves lack; no dataset. Benched as bbkd's candidates on emoji APIs with the union CE (row
    ``bbkd:union-strokes``, 3 seeds, BENCHMARKS.md §6): level with dead leaves and the default."""
    g, dev = generator, generator.device
    x = torch.rand(n, channels, 1, 1, generator=g, device=dev).expand(n, channels, size, size)
    return _draw_strokes(x.contiguous(), count, g)


@SOURCES.register("leaves-strokes")
def leaves_strokes(n: int, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """(n, channels, size, size) in [0, 1]: :func:`dead_leaves` with 6 :func:`strokes`-style
    curves painted over it (flat regions and line structure in one image)."""
    return _draw_strokes(dead_leaves(n, size, channels, generator), 6, generator)


@SOURCES.register("ink-strokes")
def ink_strokes(n: int, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """(n, channels, size, size) in [0, 1]: glyph-like images closer to handwritten
    characters: 6-12 near-straight strokes (2 px at 32 px) of dark grey ink (0..0.35) inside
    the central 70 % of a light grey ground (0.75..1), the same on every channel. Benched as
    bbkd's candidates on emoji APIs with the union CE (row ``bbkd:union-ink``, 3 seeds,
    BENCHMARKS.md §6): +1.5 over ``bbkd:contrastive-leaves`` at 5-shot, beyond the paired CI;
    level at 1-shot. Mixed with dead leaves in :func:`leaves_ink` (the ``cpu`` preset's)."""
    g, dev = generator, generator.device
    ground = 0.75 + 0.25 * torch.rand(n, 1, 1, 1, generator=g, device=dev)
    x = ground.expand(n, channels, size, size).contiguous()
    count = torch.randint(6, 13, (n,), generator=g, device=dev)
    for k in range(12):  # stroke k is kept where the image has more than k strokes
        drawn = _draw_strokes(x, 1, g, widths=(2,), margin=0.15, bend=0.3, ink=(0.0, 0.35))
        x = torch.where((count > k).view(n, 1, 1, 1), drawn, x)
    return x


@SOURCES.register("leaves-ink")
def leaves_ink(n: int, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """(n, channels, size, size) in [0, 1]: each image :func:`dead_leaves` or
    :func:`ink_strokes`, with probability 1/2 each (two priors in one pool)."""
    pick = torch.rand(n, 1, 1, 1, generator=generator, device=generator.device) < 0.5
    # both pools are drawn in full (2n images, ~0.2 s per 1,000 on CPU, once per API event): a
    # fixed random stream whatever the pick, and no host sync to count the picks
    leaves = dead_leaves(n, size, channels, generator)
    return torch.where(pick, ink_strokes(n, size, channels, generator), leaves)


@SOURCES.register("smooth-noise")
def smooth_noise(n: int, size: int, channels: int, generator: torch.Generator) -> Tensor:
    """(n, channels, size, size) in [0, 1]: uniform noise at r x r (r in 4..16, per image),
    upsampled bilinearly (so values stay in [0, 1])."""
    g, dev = generator, generator.device
    out = []
    for _ in range(n):
        r = int(torch.randint(4, 17, (1,), generator=g, device=dev))
        z = torch.rand(1, channels, r, r, generator=g, device=dev)
        out.append(F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(out) if out else torch.zeros(0, channels, size, size, device=dev)


#: ``recovery.source`` of :func:`from_folder` (``recovery.folder`` names the folder)
FOLDER = "folder"
FOLDER_EXTS = (".png", ".jpg", ".jpeg")


@functools.lru_cache(maxsize=4)
def folder_images(root: str, size: int, channels: int) -> Tensor:
    """Every image under ``root`` (any depth; *.png, *.jpg, *.jpeg, sorted by path), resized to
    (size, size) without cropping and converted to ``channels`` (1 = grey, 3 = RGB):
    (N, channels, size, size) uint8 on the CPU, decoded once per process. ConfigError if the
    folder is missing or holds no image."""
    from apimeta.data.real import decode_files  # Pillow only when a folder is used

    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"recovery.folder {root!r} is not a folder; give a folder of unlabelled images "
            "(*.png, *.jpg, *.jpeg) with --set recovery.folder=PATH"
        )
    files = sorted(
        str(p) for p in path.rglob("*") if p.suffix.lower() in FOLDER_EXTS and p.is_file()
    )
    if not files:
        raise ConfigError(f"recovery.folder {root!r} holds no *.png, *.jpg or *.jpeg images")
    log.info("reading %d candidate images from %s at %d px", len(files), path, size)
    mode = "L" if channels == 1 else "RGB"
    return torch.from_numpy(decode_files(files, size, mode))


def from_folder(
    root: str | None, n: int, size: int, channels: int, generator: torch.Generator
) -> Tensor:
    """(n, channels, size, size) float in [0, 1] on the generator's device: images of
    :func:`folder_images` drawn without replacement (with replacement when ``n`` exceeds the
    folder), in a random order from ``generator``."""
    if not root:
        raise ConfigError(
            "recovery.source folder needs a folder of unlabelled images: --set recovery.folder=PATH"
        )
    pool = folder_images(str(root), size, channels)
    g, dev = generator, generator.device
    m = pool.shape[0]
    if n <= m:
        idx = torch.randperm(m, generator=g, device=dev)[:n]
    else:
        idx = torch.randint(m, (n,), generator=g, device=dev)
    return pool[idx.cpu()].to(dev).float() / 255.0


def draw_candidates(
    source: str,
    n: int,
    size: int,
    channels: int,
    generator: torch.Generator,
    folder: str | None = None,
) -> Tensor:
    """``n`` images of the registered ``source``, or of ``folder`` when ``source`` is
    :data:`FOLDER` (ConfigError listing the choices if unknown)."""
    if source == FOLDER:
        return from_folder(folder, n, size, channels, generator)
    return SOURCES.get(source)(n, size, channels, generator)


def mixups(x: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` convex combinations ``lam * x[i] + (1 - lam) * x[j]`` of random pairs i != j of the
    (B, C, H, W) images ``x`` (B >= 2; float in [0, 1], or uint8 read as /255), ``lam`` uniform
    in [0, 1]. Returns (the (n, C, H, W) float images on ``x``'s device, i, j, lam); the draws
    are made on ``generator`` (CPU)."""
    b = int(x.shape[0])
    if b < 2:
        raise ValueError(f"mixups need at least 2 images, got {b}")
    i = torch.randint(b, (n,), generator=generator)
    j = (i + torch.randint(1, b, (n,), generator=generator)) % b  # never i itself
    lam = torch.rand(n, generator=generator)
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x
    dev = xf.device
    w = lam.to(dev).view(-1, 1, 1, 1)
    return w * xf[i.to(dev)] + (1 - w) * xf[j.to(dev)], i, j, lam


__all__ = [
    "FOLDER",
    "SOURCES",
    "CandidateSource",
    "dead_leaves",
    "draw_candidates",
    "folder_images",
    "from_folder",
    "icons",
    "mixups",
    "smooth_noise",
]
