"""Procedural candidate sources: shapes, range, seeding, channels, the registry's errors."""

from __future__ import annotations

import pytest
import torch

from apimeta.candidates import SOURCES, dead_leaves, draw_candidates
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


def test_unknown_source_lists_the_choices():
    with pytest.raises(ConfigError, match="dead-leaves"):
        draw_candidates("fractals", 2, 8, 3, torch.Generator())
