"""The API zoo: train a pool of black-box classifiers (method.md 3.3) and load it back as APIs.

A zoo directory holds one safetensors file per API (``api-000.safetensors`` ...) and ``zoo.json``::

    {"version": 1, "build_args": {...},
     "apis": [{"name", "file", "arch", "width", "dataset", "classes", "class_names", "channels",
               "image_size", "mean", "std", "holdout_acc", "seed", "train_time_s", "epochs_run",
               "n_params"}, ...]}

API ``i`` depends only on ``(seed, i)`` and the build arguments: its dataset is
``datasets[i % len(datasets)]``, its architecture ``archs[(i // len(datasets)) % len(archs)]`` (every
dataset sees every architecture), its classes a seeded draw of ``way`` meta-train classes. So a
zoo of 5 APIs is the first 5 APIs of a zoo of 20, and re-running a build resumes it.

Learners only ever see :class:`~apimeta.apis.base.APIInfo` and query results; the training data,
holdout images and weights stay behind :func:`load_zoo`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apimeta.apis.base import APIInfo, BlackBoxAPI, parse_output_mode
from apimeta.apis.cache import CachedAPI, QueryCache
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.local import LocalAPI
from apimeta.errors import CheckpointError, ConfigError, EpisodeError
from apimeta.io import atomic_write, atomic_write_json
from apimeta.seeding import derive_seed, make_generator
from apimeta.transforms import crop_flip

logger = logging.getLogger(__name__)

MANIFEST = "zoo.json"
VERSION = 1
HOLDOUT_FRACTION = 0.2
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


@dataclass
class ZooManifest:
    """The parsed ``zoo.json`` of directory ``dir``; ``apis`` are the manifest entries."""

    dir: Path
    build_args: dict[str, Any]
    apis: list[dict[str, Any]] = field(default_factory=list)
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "build_args": self.build_args, "apis": self.apis}

    def __len__(self) -> int:
        return len(self.apis)


def default_width(arch: str, conv4_width: int, resnet_width: float) -> float:
    """The width passed to :func:`build_backbone`: filters for conv4, multiplier for ResNets."""
    return float(conv4_width) if arch == "conv4" else float(resnet_width)


def api_plan(
    i: int, datasets: Sequence[str], archs: Sequence[str], seed: int
) -> tuple[str, str, int]:
    """(dataset, arch, api_seed) of API ``i``; depends only on ``(seed, i)`` and the lists."""
    dataset = datasets[i % len(datasets)]
    arch = archs[(i // len(datasets)) % len(archs)]
    return dataset, arch, derive_seed(seed, "zoo", i)


def split_holdout(
    images: Tensor, labels: Tensor, classes: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per class, first 80% (storage order) -> train, last 20% -> holdout; labels become local.

    ``images``: (M, C, H, W) uint8; returns train_x, train_y, hold_x, hold_y (x uint8, y int64 in
    [0, len(classes))).
    """
    tx, ty, hx, hy = [], [], [], []
    for local, c in enumerate(classes):
        imgs = images[labels == c]
        n = int(imgs.shape[0])
        n_hold = max(1, round(n * HOLDOUT_FRACTION))
        if n - n_hold < 1:
            raise EpisodeError(
                f"class {c} has only {n} images; a zoo API needs >= 2 per class "
                "(80% train / 20% holdout). Use a dataset with more images per class."
            )
        tx.append(imgs[: n - n_hold])
        hx.append(imgs[n - n_hold :])
        ty.append(torch.full((n - n_hold,), local, dtype=torch.long))
        hy.append(torch.full((n_hold,), local, dtype=torch.long))
    return torch.cat(tx), torch.cat(ty), torch.cat(hx), torch.cat(hy)


def _build_model(
    arch: str,
    n_classes: int,
    channels: int,
    image_size: int,
    width: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    from apimeta.models import build_backbone

    return build_backbone(
        arch,
        num_classes=n_classes,
        in_channels=channels,
        image_size=image_size,
        width=width,
        bn="standard",
        mean=list(mean),
        std=list(std),
    )


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean CE loss) of ``model`` in eval mode on uint8 images ``x`` (N, C, H, W)."""
    model.eval()
    correct, loss, n = 0, 0.0, int(x.shape[0])
    for xb, yb in zip(x.split(512), y.split(512), strict=True):
        logits = model(xb.to(device).float().div_(255.0))
        yb = yb.to(device)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / max(n, 1), loss / max(n, 1)


def train_api(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    holdout: tuple[Tensor, Tensor],
    *,
    arch: str,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.01,
    grad_clip: float = 50.0,
    patience: int | None = None,
    augment: bool = True,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[float, int]:
    """Train one API classifier in place; load the best-holdout weights back at the end.

    Paper recipe: cross-entropy, batch 128, lr 0.01, gradient-norm clip 50; Adam for conv4 (lr x0.2
    at epoch 70), SGD momentum 0.9 wd 5e-4 for ResNets (lr x0.2 at epochs 30, 50, 80). ``train`` /
    ``holdout``: (uint8 images (N, C, H, W), local labels (N,)). Stops after ``patience`` epochs
    without holdout improvement (None: never). Returns (best holdout accuracy, epochs run).
    """
    device = torch.device(device)
    model.to(device)
    if arch == "conv4":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        milestones = [70]
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        milestones = [30, 50, 80]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
    tx, ty = train
    hx, hy = holdout
    best: tuple[float, float] = (-1.0, float("inf"))
    best_state: dict[str, Tensor] = {}
    since_best, epochs_run = 0, 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(tx.shape[0], generator=generator)
        for idx in order.split(batch_size):
            if idx.numel() < 2 and tx.shape[0] >= 2:  # BN needs 2+ images; drop a last single one
                continue
            xb = tx[idx].to(device).float().div_(255.0)
            if augment:
                xb = crop_flip(xb, generator)
            loss = F.cross_entropy(model(xb), ty[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        sched.step()
        epochs_run = epoch + 1
        acc, hloss = _accuracy(model, hx, hy, device)
        if acc > best[0] or (acc == best[0] and hloss < best[1]):
            best = (acc, hloss)
            # a true copy (method.md section 9, item 9), not a reference to the live weights
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            since_best = 0
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(epochs_run, acc)
        if patience is not None and since_best >= patience:
            logger.debug("early stop after %d epochs (best holdout acc %.3f)", epochs_run, best[0])
            break
    if best_state:
        model.load_state_dict(best_state)
    model.eval()
    return max(best[0], 0.0), epochs_run


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check ``<path>/zoo.json`` (or the file itself); raises ConfigError if unusable."""
    p = Path(path)
    f = p if p.is_file() else p / MANIFEST
    if not f.is_file():
        raise ConfigError(
            f"{p} is not an API zoo (no {MANIFEST}); build one with "
            f"`apimeta zoo build --out {p}` or pass the right directory"
        )
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON ({e}); rebuild the zoo with --force") from None
    if not isinstance(data, dict) or not isinstance(data.get("apis"), list):
        raise ConfigError(f"{f} has no 'apis' list; rebuild the zoo with --force")
    if data.get("version") != VERSION:
        raise ConfigError(
            f"{f} has manifest version {data.get('version')!r}; this apimeta reads version "
            f"{VERSION}. Rebuild the zoo with this version (--force)."
        )
    return data


def load_api_model(path: str | Path, entry: dict[str, Any]) -> nn.Module:
    """Rebuild the classifier of one manifest ``entry`` of the zoo at ``path``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / entry["file"]
    if not f.is_file():
        raise CheckpointError(
            f"weights file {f} of API {entry.get('name')!r} is missing; re-run "
            "`apimeta zoo build` with the same arguments to rebuild it"
        )
    model = _build_model(
        entry["arch"],
        len(entry["classes"]),
        int(entry["channels"]),
        int(entry["image_size"]),
        float(entry["width"]),
        entry["mean"],
        entry["std"],
    )
    try:
        state = load_file(str(f))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(
            f"cannot load {f} into a {entry['arch']} (width {entry['width']}): {e}. "
            "The file is corrupt or does not match zoo.json; rebuild the zoo with --force."
        ) from None
    return model.eval()


def entry_info(entry: dict[str, Any], output: str = "logits") -> APIInfo:
    """The learner-visible :class:`APIInfo` of a manifest entry."""
    return APIInfo(
        name=entry["name"],
        dataset=entry["dataset"],
        classes=tuple(int(c) for c in entry["classes"]),
        class_names=tuple(entry["class_names"]),
        channels=int(entry["channels"]),
        image_size=int(entry["image_size"]),
        output=output,
        mean=tuple(float(m) for m in entry["mean"]),
        std=tuple(float(s) for s in entry["std"]),
        tags={"arch": entry["arch"], "holdout_acc": entry.get("holdout_acc")},
    )


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
    device: str = "cpu",
    threads: int | None = None,
    force: bool = False,
    progress: Callable[[ZooProgress], None] | None = None,
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
    with ``seed``.

    Resumable: finished APIs (entry in ``zoo.json`` and file on disk) are reused. A directory
    built with different arguments raises ConfigError; ``force`` rebuilds from scratch.
    ``zoo.json`` is rewritten atomically after every API and lists exactly the first ``n_apis``
    APIs (asking for fewer than a directory holds leaves the other weight files unlisted).
    ``progress`` gets :class:`ZooProgress`.
    """
    from apimeta.data import DATASETS, load_dataset
    from apimeta.models import BACKBONES

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
    loaded: dict[str, Any] = {}
    dev = torch.device(device)

    for i in range(n_apis):
        name = f"api-{i:03d}"
        dataset, arch, api_seed = api_plan(i, datasets, archs, seed)
        if name in done:
            manifest.apis.append(done[name])
            if progress is not None:
                progress(ZooProgress("reused", i, n_apis, name, arch, dataset, entry=done[name]))
            continue
        if dataset not in loaded:
            logger.info("loading dataset %s", dataset)
            try:
                # the dataset's own rendering seed stays at its default, as for every method
                # (methods.base.load_run_datasets): the zoo seed draws classes and trains APIs
                loaded[dataset] = load_dataset(
                    dataset,
                    root=data_root,
                    image_size=image_size,
                    **build_args["dataset_options"],
                )
            except TypeError as e:
                if "unexpected keyword" not in str(e):
                    raise
                raise ConfigError(
                    f"dataset {dataset!r} does not take option(s) {build_args['dataset_options']}"
                    f" ({e}); check --dataset-option"
                ) from None
        ds = loaded[dataset]
        split = ds.split("train")
        pool = torch.tensor(split.classes)
        if pool.numel() < way:
            raise ConfigError(
                f"{dataset} has {pool.numel()} meta-train classes; --way {way} needs at least {way}"
            )
        g = make_generator(seed, "zoo", i, "classes")
        classes = pool[torch.randperm(pool.numel(), generator=g)[:way]].tolist()
        train_x, train_y, hold_x, hold_y = split_holdout(split.images, split.labels, classes)
        width = default_width(arch, conv4_width, resnet_width)
        if progress is not None:
            progress(ZooProgress("start", i, n_apis, name, arch, dataset, epochs=epochs))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(api_seed)  # weight init only; restored on exit
            model = _build_model(arch, way, ds.channels, ds.image_size, width, ds.mean, ds.std)

        def on_epoch(ep: int, acc: float, i=i, name=name, arch=arch, dataset=dataset) -> None:
            if progress is not None:
                progress(ZooProgress("epoch", i, n_apis, name, arch, dataset, ep, epochs, acc))

        t0 = time.perf_counter()
        acc, epochs_run = train_api(
            model,
            (train_x, train_y),
            (hold_x, hold_y),
            arch=arch,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            grad_clip=grad_clip,
            patience=patience,
            augment=augment,
            generator=make_generator(seed, "zoo", i, "train"),
            device=dev,
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
        _save_weights(model, out / entry["file"], entry)
        manifest.apis.append(entry)
        atomic_write_json(out / MANIFEST, manifest.to_dict())
        logger.info("%s (%s, %s) holdout acc %.3f in %.1fs", name, arch, dataset, acc, train_time)
        if progress is not None:
            progress(
                ZooProgress("done", i, n_apis, name, arch, dataset, epochs_run, epochs, acc, entry)
            )
    atomic_write_json(out / MANIFEST, manifest.to_dict())
    return manifest


def _save_weights(model: nn.Module, path: Path, entry: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"arch": entry["arch"], "width": str(entry["width"]), "name": entry["name"]}
    atomic_write(path, lambda p: save_file(state, str(p), metadata=meta))


def load_zoo(
    source: str | Path,
    *,
    ledger: QueryLedger | None = None,
    output: str = "logits",
    device: str = "cpu",
    backend: str = "auto",
    max_batch: int = 4096,
    cache: QueryCache | str | Path | None = None,
    **client_options: Any,
) -> list[BlackBoxAPI]:
    """Open a zoo as black-box APIs sharing one :class:`QueryLedger` (created if None).

    ``source``: a zoo directory (``zoo.json``), or ``http(s)://host:port`` of an API server.
    ``backend``: ``"auto"`` (ONNX when the zoo has ONNX files, else torch), ``"torch"`` or
    ``"onnx"``. ``output``: the output restriction (logits | probs | topk:K | label).
    ``cache``: a :class:`~apimeta.apis.cache.QueryCache` (or the path of its SQLite file) that
    answers repeated queries without sending or billing them (HTTP: inside :class:`HttpAPI`;
    local/ONNX: each API wrapped in :class:`~apimeta.apis.cache.CachedAPI`).
    ``client_options``: :class:`~apimeta.apis.http.HttpAPI` keyword arguments (api_key, timeout,
    max_retries, backoff, max_backoff, concurrency, bill_retries, ...); HTTP sources only.
    """
    parse_output_mode(output)
    ledger = ledger if ledger is not None else QueryLedger()
    if cache is not None and not isinstance(cache, QueryCache):
        cache = QueryCache(cache)
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        from apimeta.apis.http import load_http_zoo

        return load_http_zoo(source, ledger=ledger, output=output, cache=cache, **client_options)
    if client_options:
        raise ConfigError(
            f"HTTP client options ({', '.join(sorted(client_options))}) only apply to a zoo "
            f"served over HTTP; {source} is a local zoo"
        )
    if backend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"backend must be auto, torch or onnx; got {backend!r}")
    path = Path(source)
    data = read_manifest(path)
    if path.is_file():
        path = path.parent
    has_onnx = any("onnx_file" in e for e in data["apis"]) or any(path.glob("*.onnx"))
    apis: list[BlackBoxAPI] = []
    if backend == "onnx" or (backend == "auto" and has_onnx):
        from apimeta.apis.onnx import load_onnx_zoo

        apis = list(load_onnx_zoo(path, ledger=ledger, output=output))
    else:
        if not data["apis"]:
            raise ConfigError(
                f"the zoo at {path} has no finished APIs yet; run `apimeta zoo build`"
            )
        for entry in data["apis"]:
            model = load_api_model(path, entry).to(device)
            apis.append(LocalAPI(model, entry_info(entry, output), ledger, max_batch=max_batch))
    if cache is not None:
        apis = [CachedAPI(api, cache) for api in apis]  # type: ignore[misc]
    return apis


__all__ = [
    "ZooManifest",
    "ZooProgress",
    "api_plan",
    "build_zoo",
    "entry_info",
    "load_api_model",
    "load_zoo",
    "read_manifest",
    "split_holdout",
    "train_api",
]
