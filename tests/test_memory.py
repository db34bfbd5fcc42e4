"""Task memory: FIFO capacity, interpolated tasks across APIs, determinism, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from apimeta.episodes import Episode
from apimeta.errors import EpisodeError
from apimeta.memory import TaskMemory


def _batch(value: float, n: int = 3, c: int = 3, s: int = 8) -> torch.Tensor:
    return torch.full((n, c, s, s), value)


def test_fifo_eviction_and_capacity():
    mem = TaskMemory(capacity_batches=3)
    for i in range(5):
        mem.add("a:0", _batch(i / 10))
    assert mem.n_batches("a:0") == 3 and mem.n_images("a:0") == 9
    kept = [float(b[0, 0, 0, 0]) for b in mem.batches("a:0")]
    assert kept == pytest.approx([0.2, 0.3, 0.4])  # oldest two dropped, order kept
    mem.add("a:0", _batch(0.9, n=5))
    assert [float(b[0, 0, 0, 0]) for b in mem.batches("a:0")] == pytest.approx([0.3, 0.4, 0.9])
    assert mem.n_images("a:0") == 11 and len(mem) == 11


def test_ids_keys_and_labelled_add():
    mem = TaskMemory()
    images = torch.rand(10, 3, 8, 8)
    labels = torch.arange(10) % 5
    keys = [("cifar", c) for c in (7, 3, 9, 1, 4)]
    mem.add_labelled(keys, images, labels)
    assert mem.classes() == keys
    assert [mem.id_of(k) for k in keys] == [0, 1, 2, 3, 4]
    assert mem.key_of(2) == ("cifar", 9)
    assert torch.equal(mem.batches(("cifar", 3))[0], images[labels == 1])
    with pytest.raises(KeyError):
        mem.key_of(99)
    with pytest.raises(TypeError):
        mem.add(("x", 1.5), _batch(0.1))


def test_sample_task_composes_classes_across_apis_and_matches_spec():
    mem = TaskMemory()
    # "API 1": 3-channel 8 px classes, "API 2": 1-channel 12 px classes
    for c in range(3):
        mem.add(f"rgb:{c}", torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(c)))
    for c in range(3):
        mem.add(f"gray:{c}", torch.full((6, 1, 12, 12), 0.1 * (c + 1)))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        ep = mem.sample_task(5, 2, 3, g, image_size=8, channels=3)
        assert isinstance(ep, Episode)
        assert ep.support_x.shape == (10, 3, 8, 8) and ep.query_x.shape == (15, 3, 8, 8)
        assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        keys = [mem.key_of(i) for i in ep.class_ids]
        assert len(set(keys)) == 5
        apis = {k.split(":")[0] for k in keys}
        assert apis == {"rgb", "gray"}  # 5 of 6 classes: always both sources
        for i, k in enumerate(keys):
            if k.startswith("gray"):  # constant gray images stay constant after conversion
                val = 0.1 * (int(k.split(":")[1]) + 1)
                assert torch.allclose(ep.support_x[2 * i : 2 * i + 2], torch.tensor(val), atol=1e-5)
        seen.update(keys)
    assert len(seen) == 6


def test_images_drawn_without_replacement_from_pooled_batches():
    mem = TaskMemory()
    mem.add("k:0", torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 2, 2) / 10)
    mem.add("k:0", torch.arange(4, 7).float().view(3, 1, 1, 1).expand(3, 1, 2, 2) / 10)
    ep = mem.sample_task(1, 3, 4, torch.Generator().manual_seed(1))
    vals = torch.cat([ep.support_x, ep.query_x])[:, 0, 0, 0]
    assert sorted((vals * 10).round().long().tolist()) == list(range(7))


def test_determinism_with_seeded_generator():
    mem = TaskMemory()
    for c in range(8):
        mem.add(c, torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(c)))
    a = mem.sample_task(5, 1, 2, torch.Generator().manual_seed(3))
    b = mem.sample_task(5, 1, 2, torch.Generator().manual_seed(3))
    c = mem.sample_task(5, 1, 2, torch.Generator().manual_seed(4))
    assert a.class_ids == b.class_ids and torch.equal(a.query_x, b.query_x)
    assert a.class_ids != c.class_ids or not torch.equal(a.query_x, c.query_x)


def test_not_enough_classes_or_images_raises():
    mem = TaskMemory()
    for c in range(4):
        mem.add(c, _batch(0.5, n=5))
    mem.add(4, _batch(0.5, n=2))
    with pytest.raises(EpisodeError, match="4 classes with >= 5 images"):
        mem.sample_task(5, 1, 4, torch.Generator())
    ep = mem.sample_task(5, 1, 1, torch.Generator())  # 2 images suffice now
    assert ep.way == 5
    with pytest.raises(EpisodeError):
        TaskMemory().sample_task(1, 1, 1, torch.Generator())


@pytest.mark.parametrize("quantize", [False, True])
def test_state_roundtrip_weights_only(quantize):
    mem = TaskMemory(capacity_batches=2, quantize_uint8=quantize)
    mem.add(("cifar", 3), torch.rand(4, 3, 8, 8))
    mem.add("mini:5", torch.rand(2, 3, 8, 8))
    mem.add(7, torch.rand(3, 1, 8, 8))
    buf = io.BytesIO()
    torch.save(mem.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = TaskMemory()
    other.load_state_dict(state)
    assert other.classes() == [("cifar", 3), "mini:5", 7]
    assert other.capacity_batches == 2 and other.quantize_uint8 == quantize
    for k in mem.classes():
        assert other.id_of(k) == mem.id_of(k)
        for x, y in zip(mem.batches(k), other.batches(k), strict=True):
            assert torch.equal(x, y)
    if quantize:
        assert mem.batches(7)[0].dtype == torch.uint8
        ep = other.sample_task(1, 1, 1, torch.Generator(), channels=3)
        assert ep.support_x.dtype == torch.float32 and float(ep.support_x.max()) <= 1.0


def test_within_class_diversity_is_zero_for_copies_and_one_for_orthogonal_images():
    from apimeta.memory import within_class_diversity

    labels = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one image: skipped
    copies = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 3.0, 0], [0, 0, 1.0]])
    assert within_class_diversity(copies, labels).item() == pytest.approx(0.0, abs=1e-6)
    ortho = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])
    assert within_class_diversity(ortho, labels).item() == pytest.approx(1.0)
    mixed = torch.cat([copies[:2], ortho[2:4], copies[4:]])  # class 0: 0, class 1: 1
    assert within_class_diversity(mixed, labels).item() == pytest.approx(0.5)
    assert within_class_diversity(copies[:1], labels[:1]).item() == 0.0
