"""``folder``: the user's own images, ``root/<class>/*.png|jpg|jpeg``.

Classes are the sub-folders of ``root`` (sorted by name; images sorted by file name). The split
comes from ``root/split.json`` (``{"train": [...], "val": [...], "test": [...]}``, class folder
names, disjoint; ``train`` and ``val`` may be empty lists for a dataset that is only
meta-tested) if present, otherwise from a seeded shuffle of the classes, ~64/16/20 % with at
least one class per split. ``eval_only=True``: every class is a meta-test class (nothing to
train or validate on; for ``apimeta eval`` and the meta-test of a run trained elsewhere).
Images are resized to ``image_size`` x ``image_size`` (default 32) without cropping and converted
to ``channels`` (3 = RGB, 1 = grey). Normalization stats are the per-channel mean/std of the
train split (of all images when it is empty). Decoded arrays are cached like the other datasets.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from apimeta.data.base import DATASETS, SPLITS, FewShotDataset
from apimeta.data.real import IMAGE_EXTS, _cached, _need_root, build_dataset, decode_files
from apimeta.data.render import Progress, parallel_map
from apimeta.errors import ConfigError, DatasetNotFoundError
from apimeta.seeding import derive_seed

_HELP = "pass --data-root DIR with one sub-folder of images (*.png, *.jpg, *.jpeg) per class"


def seeded_split(classes: list[str], seed: int) -> dict[str, list[str]]:
    """Shuffle ``classes`` with ``seed`` and cut ~64/16/20 % (each split gets >= 1 class)."""
    n = len(classes)
    if n < 3:
        raise ConfigError(f"folder: need at least 3 class folders for train/val/test, found {n}")
    order = sorted(classes)
    random.Random(derive_seed(seed, "folder-split")).shuffle(order)
    n_val = max(1, round(0.16 * n))
    n_test = max(1, round(0.20 * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = 1, 1, n - 2
    return {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def read_split(path: Path, classes: list[str]) -> dict[str, list[str]]:
    """Validate ``root/split.json``: three disjoint, non-empty lists of existing class folders."""
    try:
        split = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"folder: cannot read split file {path}: {e}") from e
    if not isinstance(split, dict) or any(not isinstance(split.get(s), list) for s in SPLITS):
        raise ConfigError(
            f"folder: {path} must hold {{'train': [...], 'val': [...], 'test': [...]}}"
        )
    known, seen = set(classes), set()
    if not split["test"]:
        raise ConfigError(f"folder: split 'test' in {path} is empty")
    if bool(split["train"]) != bool(split["val"]):
        empty = "train" if not split["train"] else "val"
        raise ConfigError(
            f"folder: split {empty!r} in {path} is empty; give classes to both train and val, "
            "or leave both empty for a meta-test-only dataset"
        )
    for s in SPLITS:
        for c in split[s]:
            if c not in known:
                raise ConfigError(
                    f"folder: {path} lists class {c!r} ({s}) but {path.parent / str(c)} has no images"
                )
            if c in seen:
                raise ConfigError(f"folder: class {c!r} appears in more than one split in {path}")
            seen.add(c)
    return {s: [str(c) for c in split[s]] for s in SPLITS}


def _stats(images: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double() / 255.0
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


@DATASETS.register("folder")
def load_folder(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    channels: int = 3,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
    eval_only: bool = False,
) -> FewShotDataset:
    """Images from ``root/<class>/*``: (C=channels, s, s) uint8, s = ``image_size`` (default 32).
    ``eval_only``: every class in the test split (overrides ``split.json``)."""
    if channels not in (1, 3):
        raise ConfigError(f"folder: channels must be 1 or 3, got {channels}")
    root = _need_root(root, "folder", _HELP)
    files: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        fs = sorted(str(p) for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if fs:
            files[d.name] = fs
    if not files:
        raise DatasetNotFoundError(f"folder: no class folders with images in {root}; {_HELP}")
    split_file = root / "split.json"
    if eval_only:
        split = {"train": [], "val": [], "test": sorted(files)}
    elif split_file.is_file():
        split = read_split(split_file, list(files))
    else:
        split = seeded_split(list(files), seed)
    order = [c for s in SPLITS for c in split[s]]
    size = image_size or 32
    n = tuple(len(split[s]) for s in SPLITS)
    mode = "RGB" if channels == 3 else "L"

    def build() -> FewShotDataset:
        job = functools.partial(decode_files, size=size, mode=mode)
        arrays = parallel_map(job, [files[c] for c in order], workers, progress)
        ds = build_dataset("folder", arrays, order, n, (0.5,) * channels, (0.25,) * channels)
        train = ds.splits["train"].images
        ds.mean, ds.std = _stats(train if len(train) else ds.splits["test"].images)
        ds.meta = {"root": str(root), "split": split}
        return ds

    sources = [Path(f) for c in order for f in files[c]]
    if split_file.is_file() and not eval_only:
        sources.append(split_file)
    return _cached(
        "folder",
        root,
        sources,
        size,
        cache,
        build,
        [len(files[c]) for c in order],
        channels=channels,
        split=split,
    )
