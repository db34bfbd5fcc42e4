"""Shared machinery of the rendered built-in datasets (``emoji``, ``kanji``).

A built-in dataset is a list of classes (read from ``apimeta/splits/<name>.json``), each rendered
independently by a pure function ``render(class_key, seed, per_class, image_size) -> uint8 array
(per_class, C, s, s)``: class c's images depend only on (seed, c), never on which other classes
are rendered, so subsets and full renders agree byte for byte. Rendering fans out over worker
processes and reports progress; the result is cached (see :mod:`apimeta.data.cache`).
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib import resources
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

from apimeta.data.base import SPLITS, FewShotDataset, ImageSplit
from apimeta.data.cache import cache_path, load_cached, save_dataset
from apimeta.errors import ConfigError
from apimeta.parallel import stop_pool

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called as classes finish rendering."""

RenderFn = Callable[[str, int, int, int], np.ndarray]

# Below this many classes rendering stays in-process (worker start-up costs ~1-2 s).
_PARALLEL_MIN_CLASSES = 48


def read_split_file(name: str) -> dict[str, Any]:
    """The committed split JSON ``apimeta/splits/<name>.json``."""
    text = resources.files("apimeta").joinpath("splits", f"{name}.json").read_text("utf-8")
    return json.loads(text)


def select_classes(
    split: dict[str, Any], classes_per_split: Sequence[int | None] | None
) -> dict[str, list[str]]:
    """The first ``classes_per_split[i]`` class keys of each split (all when ``None``)."""
    if classes_per_split is None:
        classes_per_split = (None, None, None)
    if len(classes_per_split) != 3:
        raise ConfigError(
            f"classes_per_split must have 3 entries (train, val, test), got {classes_per_split!r}"
        )
    out = {}
    for s, n in zip(SPLITS, classes_per_split, strict=True):
        keys = list(split[s])
        if n is not None:
            if n < 1 or n > len(keys):
                raise ConfigError(
                    f"classes_per_split: {s} has {len(keys)} classes, asked for {n}; "
                    f"use 1..{len(keys)} or None for all"
                )
            keys = keys[:n]
        out[s] = keys
    return out


def _map_chunk(fn: Callable[[Any], np.ndarray], items: list) -> list[np.ndarray]:
    return [fn(x) for x in items]


def parallel_map(
    fn: Callable[[Any], np.ndarray],
    items: Sequence[Any],
    workers: int | None = None,
    progress: Progress | None = None,
    what: str = "classes",
) -> list[np.ndarray]:
    """``[fn(x) for x in items]`` over up to ``workers`` processes, in order.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    ``workers=None`` uses one process per torch thread (``torch.get_num_threads()``, so
    ``--threads 1`` means no worker processes; at most 8 and the CPU count) for large jobs and
    none for small ones; ``workers=0`` or ``1`` runs in this process. The result does not
    depend on it. ``progress(done, total)`` is called as items finish. On an interrupt
    (Ctrl-C, or SIGTERM mapped to ``KeyboardInterrupt``) the workers are stopped, not orphaned.
    """
    items = list(items)
    total = len(items)
    if workers is None:
        cap = min(8, os.cpu_count() or 1, torch.get_num_threads())
        workers = cap if total >= _PARALLEL_MIN_CLASSES else 1
    chunk = max(1, min(32, total // max(1, 8 * workers)))
    chunks = [items[i : i + chunk] for i in range(0, total, chunk)]
    out: list[np.ndarray] = []
    done = 0  # chunks finished
    t0 = time.perf_counter()
    if workers > 1 and multiprocessing.parent_process() is None:
        try:
            # spawn: never fork a process that may hold torch/OpenMP threads.
            ex = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            try:
                futures = [ex.submit(_map_chunk, fn, c) for c in chunks]
                for f in futures:
                    out.extend(f.result())
                    done += 1
                    if progress is not None:
                        progress(len(out), total)
            except BaseException:
                stop_pool(ex)
                raise
            ex.shutdown(wait=True)
        except BrokenProcessPool as e:  # e.g. a script without an `if __name__ == "__main__"`
            log.warning("worker processes failed (%s); continuing in this process", e)
    else:
        workers = 1
    for c in chunks[done:]:
        out.extend(_map_chunk(fn, c))
        if progress is not None:
            progress(len(out), total)
    log.info(
        "processed %d %s in %.1f s (%d workers)", total, what, time.perf_counter() - t0, workers
    )
    return out


def render_classes(
    fn: RenderFn,
    keys: list[str],
    seed: int,
    per_class: int,
    image_size: int,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[np.ndarray]:
    """``[fn(k, seed, per_class, image_size) for k in keys]`` via :func:`parallel_map`."""
    job = functools.partial(_call_render, fn, seed=seed, per_class=per_class, size=image_size)
    return parallel_map(job, keys, workers, progress)


def _call_render(fn: RenderFn, key: str, seed: int, per_class: int, size: int) -> np.ndarray:
    return fn(key, seed, per_class, size)


def assemble(
    name: str,
    split_keys: dict[str, list[str]],
    arrays: list[np.ndarray],
    class_names: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    meta: dict[str, Any] | None = None,
) -> FewShotDataset:
    """Build a :class:`FewShotDataset` from per-class arrays in train, val, test class order."""
    splits, c = {}, 0
    for s in SPLITS:
        n = len(split_keys[s])
        parts = arrays[c : c + n]
        images = torch.from_numpy(np.concatenate(parts)) if parts else None
        labels = torch.cat(
            [torch.full((len(a),), c + i, dtype=torch.long) for i, a in enumerate(parts)]
        )
        splits[s] = ImageSplit(images, labels)
        c += n
    return FewShotDataset(
        name=name,
        class_names=class_names,
        splits=splits,
        mean=mean,
        std=std,
        meta={"class_keys": [k for s in SPLITS for k in split_keys[s]], **(meta or {})},
    )


def load_rendered(
    name: str,
    fn: RenderFn,
    split_keys: dict[str, list[str]],
    class_names: list[str],
    seed: int,
    per_class: int,
    image_size: int,
    version: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
) -> FewShotDataset:
    """Load a rendered built-in from the cache, or render (and cache) it."""
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    if image_size < 8:
        raise ConfigError(f"image_size must be >= 8, got {image_size}")
    keys = [k for s in SPLITS for k in split_keys[s]]
    path = cache_path(
        name,
        version=version,
        seed=seed,
        per_class=per_class,
        image_size=image_size,
        classes=split_keys,
        mean=mean,
        std=std,
    )
    if cache:
        ds = load_cached(path)
        if ds is not None:
            log.debug("loaded %s from cache %s", name, path)
            return ds
    log.info(
        "rendering %s: %d classes x %d images (first use; cached after)", name, len(keys), per_class
    )
    arrays = render_classes(fn, keys, seed, per_class, image_size, workers, progress)
    ds = assemble(name, split_keys, arrays, class_names, mean, std, meta)
    if cache:
        save_dataset(ds, path)
    return ds
