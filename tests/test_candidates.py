"""Procedural candidate sources: shapes, range, seeding, channels, the registry's errors."""

from __future__ import annotations

import pytest
import torch

from apimeta.candidates import (
    SOURCES,
    dead_leaves,
    draw_candidates,
    icons,
    ink_strokes,
    leaves_ink,
    leaves_strokes,
    mixups,
    strokes,
)
from apimeta.errors import ConfigError


@pytest.mark.parametrize("source", SOURCES.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_sources_draw_seeded_images_in_range(source, channels):
    x = draw_candidates(source, 6, 20, channels, torch.Generator().manual_seed(0))
    assert x.shape == (6, channels, 20, 20) and x.dtype == torch.float32
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    again = draw_candidates(source, 6, 20, channels, torch.Generator().manual_seed(0))
    other = draw_candidates(source, 6, 20, channels, torch.Generator().manual_seed(1))
    assert torch.equal(x, again) and not torch.equal(x, other)
    assert float(x.flatten(1).std(1).min()) > 0.01  # no flat image
    assert not torch.equal(x[0], x[1])


def test_dead_leaves_paints_many_flat_regions():
    """Piecewise constant: most neighbouring pixels are equal, and an image holds several
    distinct colours (occluding shapes over a background)."""
    x = dead_leaves(4, 32, 3, torch.Generator().manual_seed(0))
    same = (x[..., 1:] == x[..., :-1]).all(1).float().mean()
    assert same > 0.6
    colours = [len(torch.unique(img.flatten(1).T, dim=0)) for img in x]
    assert min(colours) >= 5


def test_icons_put_one_outlined_object_on_a_plain_ground():
    """The border is the background, one colour per image; the centre is the object, another
    colour; an outline darker than both separates them along a line through the centre."""
    x = icons(16, 32, 3, torch.Generator().manual_seed(0))
    corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (n, c, 4)
    assert torch.equal(corners, corners[..., :1].expand_as(corners))
    background = corners[..., 0]
    centre = x[:, :, 16, 16]
    assert (centre - background).abs().amax(1).min() > 0  # the object covers the centre
    row = x[:, :, 16, :].sum(1)  # brightness along the middle row (n, 32)
    darkest = row.min(1).values
    assert bool((darkest < background.sum(1)).all())  # the outline is darker than the ground


def test_strokes_are_thin_curves_on_a_plain_ground():
    """No stroke: one plain colour. One stroke: a thin connected line of one other colour
    (at most 3 px wide along a curve no longer than twice the image's diagonal)."""
    g = torch.Generator().manual_seed(0)
    plain = strokes(4, 32, 3, g, count=0)
    assert torch.equal(plain, plain[:, :, :1, :1].expand_as(plain))
    x = strokes(64, 32, 3, g, count=1)
    painted = []
    for img in x:  # the ground is the commonest colour (a corner may lie on the stroke)
        colours, inverse, counts = torch.unique(
            img.flatten(1).T, dim=0, return_inverse=True, return_counts=True
        )
        assert len(colours) <= 2
        painted.append((inverse != counts.argmax()).view(32, 32))
    painted = torch.stack(painted)  # (n, 32, 32)
    area = painted.flatten(1).sum(1)
    assert int(area.min()) >= 1 and int(area.max()) <= 3 * 2 * 46 + 9  # diagonal 45.3 px
    assert float(area.float().mean()) < 0.25 * 32 * 32  # lines, not regions
    # a max-pool widens each line: some image has a 3-px-thick run somewhere
    runs = painted[:, :, :-2] & painted[:, :, 1:-1] & painted[:, :, 2:]
    assert bool(runs.any())


def test_leaves_strokes_are_dead_leaves_with_strokes_over_them():
    """Same generator state: the dead-leaves image underneath, changed only along strokes."""
    x = leaves_strokes(8, 32, 3, torch.Generator().manual_seed(3))
    base = dead_leaves(8, 32, 3, torch.Generator().manual_seed(3))
    changed = (x != base).any(1).float().mean()
    assert 0.02 < float(changed) < 0.6


def test_ink_strokes_are_dark_grey_lines_inside_a_light_grey_ground():
    """Grey (every channel equal); the ground light and the strokes dark; strokes stay
    inside the image's central part."""
    x = ink_strokes(32, 32, 3, torch.Generator().manual_seed(0))
    assert torch.equal(x, x[:, :1].expand_as(x))
    ground = x[:, 0, 0, 0]  # a corner is never inked
    assert float(ground.min()) >= 0.75
    inked = x[:, 0] < ground.view(-1, 1, 1)
    assert float(x[:, 0][inked].max()) <= 0.35
    frac = inked.flatten(1).float().mean(1)
    assert float(frac.min()) > 0.03 and float(frac.max()) < 0.6
    # end points lie in [4.8, 27.2] px; a bend of 0.3 moves a curve at most 2.4 px outside,
    # the 2-px width one more: the outer ring of pixels is never inked, the inner area is
    assert not bool(inked[:, [0, -1]].any() or inked[:, :, [0, -1]].any())
    assert bool(inked[:, 8:24, 8:24].any((1, 2)).all())


def test_leaves_ink_mixes_the_two_sources_image_by_image():
    """Grey images with a light ground are the ink strokes, colourful ones dead leaves; about
    half of each."""
    x = leaves_ink(200, 32, 3, torch.Generator().manual_seed(0))
    grey = (x == x[:, :1]).flatten(1).all(1)
    assert 60 < int(grey.sum()) < 140
    assert float(x[grey][:, :, 0, 0].min()) >= 0.75  # the ink's light ground in a corner
    assert float(x[~grey].flatten(1).std(1).min()) > 0.05


def test_unknown_source_lists_the_choices():
    with pytest.raises(ConfigError, match="dead-leaves"):
        draw_candidates("fractals", 2, 8, 3, torch.Generator())


def test_mixups_are_convex_combinations_of_two_different_images():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    xm, i, j, lam = mixups(x, 50, torch.Generator().manual_seed(1))
    assert xm.shape == (50, 3, 8, 8) and bool((i != j).all())
    assert set(i.tolist()) == set(range(5))  # every image is drawn over 50 pairs
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(xm, w * x[i] + (1 - w) * x[j])
    again, *_ = mixups(x, 50, torch.Generator().manual_seed(1))
    assert torch.equal(again, xm)
    x8 = (x * 255).round().to(torch.uint8)  # uint8 pools are read as /255
    xm8, i8, j8, lam8 = mixups(x8, 50, torch.Generator().manual_seed(1))
    w8 = lam8.view(-1, 1, 1, 1)
    torch.testing.assert_close(xm8, w8 * x8[i8] / 255.0 + (1 - w8) * x8[j8] / 255.0)
    with pytest.raises(ValueError, match="at least 2 images"):
        mixups(x[:1], 3, torch.Generator())


def _write_pngs(root, colours):
    from PIL import Image

    for i, c in enumerate(colours):
        d = root / ("deep" if i % 2 else "") / ("er" if i % 4 == 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 14), tuple(c)).save(d / f"{i}.png")
    (root / "notes.txt").write_text("not an image")


def test_folder_source_draws_the_folders_images_seeded_resized_and_converted(tmp_path):
    colours = [(10 * i, 255 - 20 * i, 7 * i) for i in range(8)]
    _write_pngs(tmp_path, colours)
    root = str(tmp_path)
    x = draw_candidates("folder", 5, 6, 3, torch.Generator().manual_seed(0), folder=root)
    assert x.shape == (5, 3, 6, 6) and x.dtype == torch.float32  # resized, no crop
    seen = {tuple(round(float(v) * 255) for v in img[:, 0, 0]) for img in x}
    assert len(seen) == 5 and seen <= {tuple(c) for c in colours}  # distinct folder images
    assert float(x.flatten(2).std(2).max()) == 0  # plain images stay plain
    again = draw_candidates("folder", 5, 6, 3, torch.Generator().manual_seed(0), folder=root)
    other = draw_candidates("folder", 5, 6, 3, torch.Generator().manual_seed(1), folder=root)
    assert torch.equal(x, again) and not torch.equal(x, other)
    every = draw_candidates("folder", 8, 6, 3, torch.Generator().manual_seed(0), folder=root)
    got = {tuple(round(float(v) * 255) for v in img[:, 0, 0]) for img in every}
    assert got == {tuple(c) for c in colours}  # all depths read, the text file skipped
    grey = draw_candidates("folder", 20, 4, 1, torch.Generator().manual_seed(0), folder=root)
    assert grey.shape == (20, 1, 4, 4)  # more than the folder holds: repeats


def test_folder_source_refuses_a_missing_or_empty_folder(tmp_path):
    g = torch.Generator()
    with pytest.raises(ConfigError, match="needs a folder"):
        draw_candidates("folder", 2, 8, 3, g)
    with pytest.raises(ConfigError, match="is not a folder"):
        draw_candidates("folder", 2, 8, 3, g, folder=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no"):
        draw_candidates("folder", 2, 8, 3, g, folder=str(tmp_path))
