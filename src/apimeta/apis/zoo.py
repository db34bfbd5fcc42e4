"""Building an API zoo (docs/design.md 3.3): train a pool of classifiers and write the zoo.

API ``i`` depends only on ``(seed, i)`` and the build arguments: its dataset is
``datasets[i % len(datasets)]``, its architecture ``archs[(i // len(datasets)) % len(archs)]`` (every
dataset sees every architecture), its classes a seeded draw of ``way`` meta-train classes. So a
zoo of 5 APIs is the first 5 APIs of a zoo of 20, and re-running a build resumes it.

The format of ``zoo.json`` is in :mod:`apimeta.apis.manifest`, the training recipe in
:mod:`apimeta.apis.recipe`; opening a zoo as APIs is :func:`apimeta.apis.sources.load_zoo`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apimeta.apis.manifest import MANIFEST, ZooManifest, read_manifest
from apimeta.apis.recipe import (
    HOLDOUT_FRACTION,
    build_api_model,
    default_width,
    split_holdout,
    train_api,
)
from apimeta.data import DATASETS, load_dataset
from apimeta.errors import ConfigError
from apimeta.io import atomic_write, atomic_write_json
from apimeta.models import BACKBONES
from apimeta.parallel import Backend, run_jobs
from apimeta.seeding import derive_seed, make_generator

logger = logging.getLogger(__name__)

# Build arguments that may change between runs into the same directory without invalidating APIs.
_FREE_ARGS = ("n_apis", "data_root", "threads", "device")


@dataclass
class ZooProgress:
    """One progress event of :func:`build_zoo`.

    ``stage``: ``"reused"`` (finished API found on disk), ``"start"``, ``"epoch"`` (after each
    epoch; ``epoch``/``holdout_acc`` set) or ``"done"`` (``entry`` set).
    """

    stage: str
    index: int
    n_apis: int
    name: str
    arch: str
    dataset: str
    epoch: int = 0
    epochs: int = 0
    holdout_acc: float | None = None
    entry: dict[str, Any] | None = None


def api_plan(
    i: int, datasets: Sequence[str], archs: Sequence[str], seed: int
) -> tuple[str, str, int]:
    """(dataset, arch, api_seed) of API ``i``; depends only on ``(seed, i)`` and the lists."""
    dataset = datasets[i % len(datasets)]
    arch = archs[(i // len(datasets)) % len(archs)]
    return dataset, arch, derive_seed(seed, "zoo", i)


def _finished(out: Path, entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in entries if (out / e["file"]).is_file()}


def build_zoo(
    dataset_names: Sequence[str],
    n_apis: int,
    archs: Sequence[str],
    way: int,
    out: str | Path,
    *,
    seed: int = 2022,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 0.01,
    grad_clip: float = 50.0,
    patience: int | None = 10,
    augment: bool = True,
    conv4_width: int = 32,
    resnet_width: float = 0.25,
    data_root: str | Path | None = None,
    image_size: int | None = None,
    dataset_options: dict[str, Any] | None = None,
    class_pool: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    force: bool = False,
    progress: Callable[[ZooProgress], None] | None = None,
    backend: Backend | None = None,
) -> ZooManifest:
    """Train ``n_apis`` classifiers, each on a seeded ``way``-class task from meta-train classes.

    ``dataset_names``: one name (API-SS/SH) or several (API-MH; APIs alternate datasets).
    ``archs``: backbones, assigned round-robin (see module docstring). ``conv4_width``: conv4
    filters (32 = paper); ``resnet_width``: ResNet width multiplier (1.0 = paper 64-128-256-512;
    default 0.25 keeps CPU builds fast). ``epochs``: upper bound (paper: 60), with early stopping
    after ``patience`` epochs without holdout improvement; the best-holdout weights are kept.
    ``augment``: crop+flip during training (the paper used none). ``batch_size``: 128 = paper;
    with 20 images per class a 5-way API has 80 training images (one step per epoch at 128), so
    small datasets want a smaller batch or more epochs. ``dataset_options``: extra keyword
    arguments for :func:`apimeta.data.load_dataset` (same for every dataset); datasets are loaded
    with ``seed``. ``class_pool``: APIs draw their classes from a seeded subset of this many
    meta-train classes per dataset (None: all of them), so many APIs cover each class several
    times, like the paper's 100 APIs over CIFAR-FS's 64 classes (see :func:`zoo_coverage`).

    Resumable: finished APIs (entry in ``zoo.json`` and file on disk) are reused. A directory
    built with different arguments raises ConfigError; ``force`` rebuilds from scratch.
    ``zoo.json`` is rewritten atomically after every API and lists exactly the first ``n_apis``
    APIs (asking for fewer than a directory holds leaves the other weight files unlisted).
    ``progress`` gets :class:`ZooProgress`. ``backend``: where the APIs train (one job per
    API, :mod:`apimeta.parallel`; default in this process); workers return weights and entries
    and this process writes them, so the result is the same on every backend.
    """
    datasets = [d.strip() for d in dataset_names if d.strip()]
    archs = [a.strip() for a in archs if a.strip()]
    if not datasets:
        raise ConfigError("give at least one dataset (--dataset emoji or --dataset emoji,kanji)")
    if not archs:
        raise ConfigError("give at least one architecture (--archs conv4)")
    for d in datasets:
        if d not in DATASETS.names():
            raise ConfigError(f"unknown dataset {d!r}; choose from {', '.join(DATASETS.names())}")
    for a in archs:
        if a not in BACKBONES.names():
            raise ConfigError(
                f"unknown architecture {a!r}; choose from {', '.join(BACKBONES.names())}"
            )
    if class_pool is not None and class_pool < way:
        raise ConfigError(f"--class-pool must be at least --way ({way}); got {class_pool}")
    if n_apis < 1 or way < 2 or epochs < 1 or batch_size < 2:
        raise ConfigError(
            f"need n_apis >= 1, way >= 2, epochs >= 1, batch_size >= 2; "
            f"got {n_apis}, {way}, {epochs}, {batch_size}"
        )
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    build_args: dict[str, Any] = {
        "datasets": datasets,
        "archs": archs,
        "way": int(way),
        "seed": int(seed),
        "epochs": int(epochs),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "grad_clip": float(grad_clip),
        "patience": patience,
        "augment": bool(augment),
        "conv4_width": int(conv4_width),
        "resnet_width": float(resnet_width),
        "image_size": image_size,
        "dataset_options": dict(dataset_options or {}),
        "holdout_fraction": HOLDOUT_FRACTION,
        "n_apis": int(n_apis),
        "data_root": str(data_root) if data_root is not None else None,
    }
    if class_pool is not None:  # absent when unused: zoos built before it still match
        build_args["class_pool"] = int(class_pool)
    build_args = json.loads(json.dumps(build_args))  # tuples -> lists, as read back from disk

    done: dict[str, dict[str, Any]] = {}
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        old_args = {k: v for k, v in old.get("build_args", {}).items() if k not in _FREE_ARGS}
        new_args = {k: v for k, v in build_args.items() if k not in _FREE_ARGS}
        if old_args != new_args and not force:
            diff = sorted(
                k for k in set(old_args) | set(new_args) if old_args.get(k) != new_args.get(k)
            )
            raise ConfigError(
                f"{out} holds a zoo built with different arguments ({', '.join(diff)}: "
                + "; ".join(f"{k} was {old_args.get(k)!r}, now {new_args.get(k)!r}" for k in diff)
                + "). Use a new --out directory, or --force to rebuild it from scratch."
            )
        if force:
            for e in old["apis"]:
                (out / e["file"]).unlink(missing_ok=True)
            (out / MANIFEST).unlink()
        else:
            done = _finished(out, old["apis"])
    out.mkdir(parents=True, exist_ok=True)

    manifest = ZooManifest(dir=out, build_args=build_args)
    backend = backend or Backend()
    entries: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    for i in range(n_apis):
        name = f"api-{i:03d}"
        if name in done:
            entries[i] = done[name]
            if progress is not None:
                _, arch, _ = api_plan(i, datasets, archs, seed)
                e = done[name]
                progress(ZooProgress("reused", i, n_apis, name, arch, e["dataset"], entry=e))
        else:
            todo.append(i)

    def write_manifest() -> None:  # the finished APIs, in index order (a resumable prefix set)
        manifest.apis = [entries[i] for i in sorted(entries)]
        atomic_write_json(out / MANIFEST, manifest.to_dict())

    on_epoch = progress if not backend.parallel else None  # epochs are seen only in-process
    jobs = [(i, n_apis, on_epoch) for i in todo]
    if backend.parallel and progress is not None:
        for i in todo:
            dataset, arch, _ = api_plan(i, datasets, archs, seed)
            name = f"api-{i:03d}"
            progress(ZooProgress("start", i, n_apis, name, arch, dataset, epochs=epochs))
    shared = {"args": build_args, "device": device}
    try:
        for k, (entry, weights) in run_jobs(_train_one, jobs, backend, shared=shared):
            i = todo[k]
            _write_weights(weights, out / entry["file"])
            entries[i] = entry
            write_manifest()  # after every API: a killed build keeps what it finished
            logger.info(
                "%s (%s, %s) holdout acc %.3f in %.1fs",
                entry["name"], entry["arch"], entry["dataset"], entry["holdout_acc"],
                entry["train_time_s"],
            )  # fmt: skip
            if progress is not None:
                progress(
                    ZooProgress(
                        "done", i, n_apis, entry["name"], entry["arch"], entry["dataset"],
                        entry["epochs_run"], epochs, entry["holdout_acc"], entry,
                    )
                )  # fmt: skip
    finally:
        _DATASETS.clear()  # datasets loaded in this process are not kept past the build
    write_manifest()
    return manifest


_DATASETS: dict[tuple, Any] = {}  # per process: datasets loaded by earlier jobs


def _load(dataset: str, args: dict[str, Any]) -> Any:
    key = (dataset, args["data_root"], args["image_size"], json.dumps(args["dataset_options"]))
    if key not in _DATASETS:
        logger.info("loading dataset %s", dataset)
        try:
            # the dataset's own rendering seed stays at its default, as for every method
            # (models.meta.load_run_datasets): the zoo seed draws classes and trains APIs
            _DATASETS[key] = load_dataset(
                dataset,
                root=args["data_root"],
                image_size=args["image_size"],
                **args["dataset_options"],
            )
        except TypeError as e:
            if "unexpected keyword" not in str(e):
                raise
            raise ConfigError(
                f"dataset {dataset!r} does not take option(s) {args['dataset_options']}"
                f" ({e}); check --dataset-option"
            ) from None
    return _DATASETS[key]


def _train_one(
    shared: dict[str, Any],
    i: int,
    n_apis: int,
    progress: Callable[[ZooProgress], None] | None = None,
) -> tuple[dict[str, Any], bytes]:
    """One job of :func:`build_zoo`: train API ``i``; its manifest entry and safetensors bytes
    (the caller writes the file, so workers need no shared disk)."""
    a = shared["args"]
    seed, way, epochs = a["seed"], a["way"], a["epochs"]
    name = f"api-{i:03d}"
    dataset, arch, api_seed = api_plan(i, a["datasets"], a["archs"], seed)
    ds = _load(dataset, a)
    split = ds.split("train")
    pool = class_pool_of(split.classes, a.get("class_pool"), seed, dataset)
    if pool.numel() < way:
        raise ConfigError(
            f"{dataset} has {pool.numel()} meta-train classes; --way {way} needs at least {way}"
        )
    classes = api_classes(pool, way, seed, i)
    train_x, train_y, hold_x, hold_y = split_holdout(split.images, split.labels, classes)
    width = default_width(arch, a["conv4_width"], a["resnet_width"])
    if progress is not None:
        progress(ZooProgress("start", i, n_apis, name, arch, dataset, epochs=epochs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(api_seed)  # weight init only; restored on exit
        model = build_api_model(arch, way, ds.channels, ds.image_size, width, ds.mean, ds.std)

    def on_epoch(ep: int, acc: float) -> None:
        if progress is not None:
            progress(ZooProgress("epoch", i, n_apis, name, arch, dataset, ep, epochs, acc))

    t0 = time.perf_counter()
    acc, epochs_run = train_api(
        model,
        (train_x, train_y),
        (hold_x, hold_y),
        arch=arch,
        epochs=epochs,
        batch_size=a["batch_size"],
        lr=a["lr"],
        grad_clip=a["grad_clip"],
        patience=a["patience"],
        augment=a["augment"],
        generator=make_generator(seed, "zoo", i, "train"),
        device=torch.device(shared["device"]),
        on_epoch=on_epoch,
    )
    train_time = time.perf_counter() - t0
    entry = {
        "name": name,
        "file": f"{name}.safetensors",
        "arch": arch,
        "width": width,
        "dataset": dataset,
        "classes": [int(c) for c in classes],
        "class_names": [ds.class_names[c] for c in classes],
        "channels": ds.channels,
        "image_size": ds.image_size,
        "mean": [float(m) for m in ds.mean],
        "std": [float(s) for s in ds.std],
        "holdout_acc": round(acc, 6),
        "seed": api_seed,
        "train_time_s": round(train_time, 3),
        "epochs_run": epochs_run,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    return entry, _weights_bytes(model, entry)


def class_pool_of(
    classes: Sequence[int], size: int | None, seed: int, dataset: str
) -> torch.Tensor:
    """The meta-train classes a zoo's APIs draw from: all of ``classes`` (``size`` None), else
    a seeded subset of ``size`` of them (the same for every API of one zoo seed and dataset)."""
    pool = torch.tensor(list(classes))
    if size is None or size >= pool.numel():
        return pool
    g = make_generator(seed, "zoo", "class-pool", dataset)
    return pool[torch.randperm(pool.numel(), generator=g)[:size]].sort().values


def api_classes(pool: torch.Tensor, way: int, seed: int, i: int) -> list[int]:
    """The ``way`` classes API ``i`` of a zoo with ``seed`` draws from ``pool`` (seeded by
    ``(seed, i)`` only, so coverage can be planned without training: see
    ``benchmarks/zoo_coverage.py``)."""
    g = make_generator(seed, "zoo", i, "classes")
    return pool[torch.randperm(pool.numel(), generator=g)[:way]].tolist()


def zoo_coverage(entries: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How often the APIs of a zoo cover each class, per dataset: ``{"emoji": {"apis", "classes"
    (distinct classes covered), "draws" (API classes in all), "min", "mean", "max" (APIs per
    covered class), "repeated" (share of covered classes held by two or more APIs)}}``."""
    out: dict[str, dict[str, Any]] = {}
    for ds in sorted({e["dataset"] for e in entries}):
        mine = [e for e in entries if e["dataset"] == ds]
        counts = Counter(int(c) for e in mine for c in e["classes"])
        times = list(counts.values())
        out[ds] = {
            "apis": len(mine),
            "classes": len(counts),
            "draws": sum(times),
            "min": min(times),
            "mean": sum(times) / len(times),
            "max": max(times),
            "repeated": sum(t >= 2 for t in times) / len(times),
        }
    return out


def _weights_bytes(model: nn.Module, entry: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"arch": entry["arch"], "width": str(entry["width"]), "name": entry["name"]}
    return save(state, metadata=meta)


def _write_weights(data: bytes, path: Path) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


__all__ = [
    "ZooProgress",
    "api_classes",
    "api_plan",
    "build_zoo",
    "class_pool_of",
    "zoo_coverage",
]
