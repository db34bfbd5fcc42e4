"""On-disk cache of decoded/rendered datasets under ``apimeta_home() / "datasets"``.

One dataset = one safetensors file holding ``images`` (N, C, H, W) uint8 and ``labels`` (N,)
int64 plus a JSON string (class names, split class ids, stats, a sha256 of the tensors' bytes) in
the file's metadata. Files are written atomically and named by a hash of every parameter that
changes their bytes, so a stale or foreign cache file is never read; the checksum is verified on
every load, so a file damaged inside its image data is rebuilt (with a warning), never used.
Loading is a memory map + copy + hash: about a second for the built-in datasets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from apimeta.config import apimeta_home
from apimeta.data.base import SPLITS, FewShotDataset, ImageSplit
from apimeta.io import atomic_write

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: with the content checksum


def cache_dir() -> Path:
    """``apimeta_home() / "datasets"`` (created on demand)."""
    return apimeta_home() / "datasets"


def cache_key(**params: Any) -> str:
    """A short stable hash of ``params`` (JSON-serialisable values; order-independent)."""
    blob = json.dumps({"format": CACHE_FORMAT, **params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(name: str, **params: Any) -> Path:
    """Cache file of dataset ``name`` for these parameters."""
    return cache_dir() / f"{name}-{cache_key(name=name, **params)}.safetensors"


def checksum(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the contiguous bytes of ``images`` and ``labels``."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(t.contiguous().numpy().data)
    return h.hexdigest()


def save_dataset(ds: FewShotDataset, path: Path) -> None:
    """Write ``ds`` to ``path`` atomically (one safetensors file)."""
    images = torch.cat([ds.splits[s].images for s in SPLITS]).contiguous()
    labels = torch.cat([ds.splits[s].labels for s in SPLITS]).contiguous()
    sizes = [len(ds.splits[s]) for s in SPLITS]
    meta = {
        "name": ds.name,
        "class_names": ds.class_names,
        "sizes": sizes,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "meta": ds.meta,
        "sha256": checksum(images, labels),
    }
    tensors = {"images": images, "labels": labels}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"apimeta": json.dumps(meta)}))


def load_cached(path: Path) -> FewShotDataset | None:
    """The dataset stored at ``path``, or ``None`` if it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["apimeta"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        log.warning("ignoring unreadable dataset cache %s (%s); rebuilding it", path, e)
        return None
    images, labels = tensors["images"], tensors["labels"]
    if meta.get("sha256") != checksum(images, labels):
        log.warning("dataset cache %s is damaged (checksum mismatch); rebuilding it", path)
        return None
    splits, start = {}, 0
    for s, n in zip(SPLITS, meta["sizes"], strict=True):
        splits[s] = ImageSplit(images[start : start + n], labels[start : start + n])
        start += n
    return FewShotDataset(
        name=meta["name"],
        class_names=list(meta["class_names"]),
        splits=splits,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        meta=dict(meta.get("meta") or {}),
    )
