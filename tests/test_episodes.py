"""Episode validation and TaskSampler shapes, determinism and errors."""

from __future__ import annotations

import pytest
import torch

from apimeta.data import load_dataset
from apimeta.episodes import Episode, TaskSampler
from apimeta.errors import EpisodeError


def pool(
    n_classes: int = 6, per_class: int = 8, size: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose first pixel encodes (class, index) so draws can be checked."""
    labels = torch.arange(n_classes).repeat_interleave(per_class) + 10  # global ids 10..
    images = torch.zeros(n_classes * per_class, 1, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(per_class).repeat(n_classes).to(torch.uint8)
    return images, labels


def ep(**kw) -> Episode:
    base = dict(
        support_x=torch.rand(4, 3, 8, 8),
        support_y=torch.tensor([0, 0, 1, 1]),
        query_x=torch.rand(2, 3, 8, 8),
        query_y=torch.tensor([0, 1]),
        class_ids=(5, 9),
    )
    return Episode(**{**base, **kw})


def test_episode_valid_and_to() -> None:
    e = ep(class_ids=[5, 9])
    assert e.way == 2 and e.class_ids == (5, 9)
    e2 = e.to("cpu")
    assert torch.equal(e2.support_x, e.support_x) and e2.class_ids == e.class_ids


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"class_ids": ()}, "at least one class"),
        ({"support_x": torch.rand(4, 8, 8)}, r"support_x must be \(B, C, H, W\)"),
        ({"query_y": torch.tensor([0, 1, 1])}, "query_y must be"),
        ({"support_y": torch.tensor([[0, 0, 1, 1]])}, "support_y must be"),
        ({"support_y": torch.tensor([0.0, 0, 1, 1])}, "int64"),
        ({"query_y": torch.tensor([0, 2])}, r"\[0, 2\)"),
        ({"support_y": torch.tensor([-1, 0, 1, 1])}, r"\[0, 2\)"),
        ({"query_x": torch.rand(2, 3, 6, 6)}, "differ in shape"),
    ],
)
def test_episode_validation_errors(kw: dict, match: str) -> None:
    with pytest.raises(EpisodeError, match=match):
        ep(**kw)


def test_sampler_shapes_and_labels() -> None:
    images, labels = pool()
    s = TaskSampler(
        images, labels, way=3, shot=2, query=4, generator=torch.Generator().manual_seed(0)
    )
    e = s.sample()
    assert e.support_x.shape == (6, 1, 4, 4) and e.query_x.shape == (12, 1, 4, 4)
    assert e.support_x.dtype == torch.float32 and 0 <= float(e.support_x.min()) <= 1
    assert e.support_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert e.query_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(e.class_ids)) == 3 and set(e.class_ids) <= set(range(10, 16))
    # local label i <-> class_ids[i]; support and query images are disjoint
    for x, y in ((e.support_x, e.support_y), (e.query_x, e.query_y)):
        got = (x[:, 0, 0, 0] * 255).round().long()
        assert got.tolist() == [e.class_ids[i] for i in y.tolist()]
    for c in range(3):
        s_idx = set((e.support_x[e.support_y == c][:, 0, 0, 1] * 255).round().long().tolist())
        q_idx = set((e.query_x[e.query_y == c][:, 0, 0, 1] * 255).round().long().tolist())
        assert len(s_idx) == 2 and len(q_idx) == 4 and not s_idx & q_idx


def test_sampler_is_deterministic_given_the_generator() -> None:
    images, labels = pool()

    def draws(seed: int) -> list[tuple]:
        s = TaskSampler(images, labels, 3, 1, 2, torch.Generator().manual_seed(seed))
        return [(e.class_ids, e.support_x.sum().item(), e.query_x.sum().item()) for e in
                (s.sample() for _ in range(5))]  # fmt: skip

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)
    it = iter(TaskSampler(images, labels, 3, 1, 2, torch.Generator().manual_seed(1)))
    assert [next(it).class_ids for _ in range(5)] == [d[0] for d in draws(1)]


def test_sampler_float_images_pass_through() -> None:
    images, labels = pool()
    f = images.float() / 255
    e = TaskSampler(f, labels, 2, 1, 1, torch.Generator().manual_seed(0)).sample()
    assert e.support_x.dtype == torch.float32


def test_sampler_skips_small_classes() -> None:
    images, labels = pool(n_classes=4, per_class=5)
    keep = ~((labels == 10) & (torch.arange(len(labels)) % 5 >= 2))  # class 10 keeps 2 images
    s = TaskSampler(images[keep], labels[keep], 3, 2, 2, torch.Generator().manual_seed(0))
    assert sorted(s.classes.tolist()) == [11, 12, 13]
    for _ in range(5):
        assert 10 not in s.sample().class_ids


@pytest.mark.parametrize(
    ("way", "shot", "query", "match"),
    [
        (7, 1, 1, "needs 7 classes"),  # N larger than the split
        (2, 5, 5, r">= 10 images"),  # too few images per class
        (0, 1, 1, "way >= 1"),
        (2, 0, 1, "shot >= 1"),
        (2, 1, -1, "query >= 0"),
    ],
)
def test_sampler_errors(way: int, shot: int, query: int, match: str) -> None:
    images, labels = pool(n_classes=6, per_class=8)
    with pytest.raises(EpisodeError, match=match):
        TaskSampler(images, labels, way, shot, query, torch.Generator().manual_seed(0))


def test_sampler_mismatched_lengths() -> None:
    images, labels = pool()
    with pytest.raises(EpisodeError, match="must match"):
        TaskSampler(images[:-1], labels, 2, 1, 1)


def test_dataset_sampler_uses_the_split() -> None:
    ds = load_dataset("synthetic", n_classes=(5, 3, 3), per_class=6)
    val = ds.sampler("val", 3, 1, 2, torch.Generator().manual_seed(0)).sample()
    assert set(val.class_ids) == {5, 6, 7}
    with pytest.raises(EpisodeError, match="needs 4 classes"):
        ds.sampler("test", 4, 1, 1, torch.Generator().manual_seed(0))
