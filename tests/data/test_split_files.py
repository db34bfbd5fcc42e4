"""The committed split JSONs (apimeta/splits/*.json): disjoint, complete, reproducible."""

from __future__ import annotations

import pytest
from fontTools.ttLib import TTFont

from apimeta.data import SPLITS
from apimeta.data import emoji as emoji_mod
from apimeta.data import kanji as kanji_mod
from apimeta.data.render import read_split_file


@pytest.mark.parametrize(
    "name,sizes",
    [("cifar-fs", (64, 16, 20)), ("mini-imagenet", (64, 16, 20)), ("emoji", None), ("kanji", None)],
)
def test_split_files_are_disjoint(name, sizes):
    split = read_split_file(name)
    lists = [split[s] for s in SPLITS]
    assert all(len(x) == len(set(x)) for x in lists)
    assert not (set(lists[0]) & set(lists[1]) or set(lists[0]) & set(lists[2]))
    assert not set(lists[1]) & set(lists[2])
    if sizes is not None:
        assert tuple(map(len, lists)) == sizes


def test_emoji_split_classes_exist_in_both_art_sets():
    split = read_split_file("emoji")
    keys = [k for s in SPLITS for k in split[s]]
    assert len(keys) > 1000
    n = len(keys)
    assert abs(len(split["train"]) / n - 0.64) < 0.01 and abs(len(split["test"]) / n - 0.2) < 0.01
    tw = emoji_mod.twemoji_dir()
    cmap = TTFont(str(emoji_mod.openmoji_font()), lazy=True).getBestCmap()
    assert all((tw / f"{k}.png").is_file() for k in keys)
    assert all(int(k, 16) in cmap for k in keys)
    assert set(split["names"]) == set(keys)
    assert len(set(split["names"].values())) == n


def test_kanji_split_classes_exist():
    split = read_split_file("kanji")
    keys = [k for s in SPLITS for k in split[s]]
    assert 1200 <= len(keys) <= 1600
    d = kanji_mod.kanji_dir()
    assert all((d / f"{k}.svg").is_file() and "-" not in k for k in keys)
    kana = [k for k in keys if 0x3040 <= int(k, 16) <= 0x30FF]
    assert len(kana) > 140


@pytest.mark.parametrize("mod", [emoji_mod, kanji_mod])
def test_committed_split_matches_its_rule(mod):
    assert mod.make_split() == read_split_file(mod.__name__.rsplit(".", 1)[1])
