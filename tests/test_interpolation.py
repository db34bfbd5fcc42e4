"""Task interpolation (MLTI): the drawn mixes, the paired task and the stage hook."""

from __future__ import annotations

import pytest
import torch

from apimeta.episodes import Episode
from apimeta.errors import EpisodeError
from apimeta.interpolation import INPUT, Mix, draw_mix, mixing, pair_tasks
from apimeta.maml import functional_forward, named_params
from apimeta.models import build_backbone
from apimeta.models.stages import feature_stages

WAY, SHOT, QUERY = 3, 2, 1


def _task(seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(WAY)
    return Episode(
        support_x=torch.rand(WAY * SHOT, 3, 16, 16, generator=g),
        support_y=y.repeat_interleave(SHOT),
        query_x=torch.rand(WAY * QUERY, 3, 16, 16, generator=g),
        query_y=y.repeat_interleave(QUERY),
        class_ids=(seed, seed + 1, seed + 2),
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("conv4", num_classes=WAY, image_size=16, width=8)


def test_draw_mix_is_seeded_covers_every_depth_and_is_beta_distributed():
    draws = [draw_mix(4, 2.0, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert draw_mix(4, 2.0, torch.Generator().manual_seed(7)) == draws[7]
    assert {d.stage for d in draws} == {-1, 0, 1, 2}  # the images and stages 0-2, never 3
    lams = torch.tensor([d.lam for d in draws])
    assert bool(((lams > 0) & (lams < 1)).all())
    # Beta(2, 2): mean 1/2, variance 1/20 (standard error of the mean ~0.005)
    assert lams.mean().item() == pytest.approx(0.5, abs=0.03)
    assert lams.var().item() == pytest.approx(0.05, abs=0.01)
    small = torch.tensor(
        [draw_mix(4, 0.2, torch.Generator().manual_seed(s)).lam for s in range(500)]
    )
    assert small.var().item() > 0.15  # Beta(0.2, 0.2) piles up near 0 and 1
    with pytest.raises(ValueError, match="alpha > 0"):
        draw_mix(4, 0.0, torch.Generator())


def test_pair_tasks_mixes_images_at_the_input_and_stacks_them_otherwise():
    a, b = _task(1), _task(2)
    mixed = pair_tasks(a, b, Mix(INPUT, 0.3))
    torch.testing.assert_close(mixed.support_x, 0.3 * a.support_x + 0.7 * b.support_x)
    torch.testing.assert_close(mixed.query_x, 0.3 * a.query_x + 0.7 * b.query_x)
    assert torch.equal(mixed.support_y, a.support_y) and mixed.class_ids == a.class_ids
    stacked = pair_tasks(a, b, Mix(1, 0.3))
    assert torch.equal(stacked.support_x, torch.cat([a.support_x, b.support_x]))
    assert torch.equal(stacked.query_y, a.query_y.repeat(2))
    other = _task(3)
    other.query_x = other.query_x[:1]
    other.query_y = other.query_y[:1]
    with pytest.raises(EpisodeError, match="same query shape"):
        pair_tasks(a, other, Mix(0, 0.5))


@pytest.mark.parametrize("stage", [0, 2])
def test_mixing_hook_equals_running_the_mix_alone_through_the_later_layers(stage):
    """Every row of a hooked forward pass of cat([a, b]) is the logits of m = lam h_a + (1 -
    lam) h_b run alone (B rows) through the later stages: duplicating m changes neither the
    batch-norm statistics nor the mean loss."""
    model = _model()
    a, b = _task(1).support_x, _task(2).support_x
    stages = feature_stages(model)
    with torch.no_grad():
        h = (torch.cat([a, b]) - model.mean) / model.std  # the wrapper's normalization
        for s in stages[: stage + 1]:
            h = s(h)
        h_a, h_b = h.chunk(2)
        m = 0.3 * h_a + 0.7 * h_b
        for s in stages[stage + 1 :]:
            m = s(m)
        want = model.net.classifier(torch.flatten(model.net.pool(m), 1))
        with mixing(model, Mix(stage, 0.3)):
            got = functional_forward(model, named_params(model), torch.cat([a, b]))
        torch.testing.assert_close(got, torch.cat([want, want]))
        # the hook is gone on leaving, also after an error inside
        plain = model(torch.cat([a, b]))
        with pytest.raises(RuntimeError, match="boom"), mixing(model, Mix(stage, 0.3)):
            raise RuntimeError("boom")
        torch.testing.assert_close(model(torch.cat([a, b])), plain)
        assert not torch.allclose(plain, got)


def test_input_mix_needs_no_hook():
    model = _model()
    x = _task(1).support_x
    with torch.no_grad(), mixing(model, Mix(INPUT, 0.3)):
        torch.testing.assert_close(model(x), model(x))
    assert all(not m._forward_hooks for m in model.modules())
