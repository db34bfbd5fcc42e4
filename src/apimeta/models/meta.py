"""The meta-model every method trains: its spec (stored in checkpoints), build and load.

A spec is the keyword arguments of :func:`~apimeta.models.build_backbone` plus ``name``; every
checkpoint stores it, so :func:`load_meta_model` rebuilds the model without the run's config.
:func:`load_init` gives the initialization to evaluate: ``"random"`` or a checkpoint path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apimeta.checkpoint import load_checkpoint
from apimeta.data.base import FewShotDataset, load_dataset
from apimeta.errors import CheckpointError, ConfigError
from apimeta.models import build_backbone
from apimeta.run_config import RunConfig, run_config_from_dict
from apimeta.seeding import derive_seed


def load_run_datasets(cfg: RunConfig, **options: Any) -> list[FewShotDataset]:
    """Load every dataset of ``cfg.dataset`` at ``cfg.image_size`` from ``cfg.data_root``, with
    the loader options ``cfg.data_options`` (then ``options``).

    The dataset's own (rendering) seed stays at its default: ``cfg.seed`` must not change the
    images, so every run and method sees the same meta-val/meta-test data.
    """
    import inspect

    from apimeta.data import DATASETS

    opts = {**cfg.data_options, **options}
    out = []
    for name in cfg.dataset_names:
        loader = DATASETS.get(name)
        takes = inspect.signature(loader).parameters
        free = any(p.kind is p.VAR_KEYWORD for p in takes.values())
        bad = sorted(
            k for k in opts if (k not in takes and not free) or k in ("root", "image_size", "seed")
        )
        if bad:
            usable = [k for k in takes if k not in ("root", "image_size", "seed", "progress")]
            raise ConfigError(
                f"dataset {name!r} does not take option(s) {', '.join(bad)} (data_options); "
                f"it takes {', '.join(usable) or 'none'}"
            )
        out.append(load_dataset(name, root=cfg.data_root, image_size=cfg.image_size, **opts))
    return out


def meta_model_spec(
    cfg: RunConfig,
    channels: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    adaptive_pool: bool | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``build_backbone`` for the meta-model (stored in checkpoints).

    Transductive BN, ``cfg.way`` outputs, ``cfg.backbone`` at ``cfg.width``; adaptive pooling by
    default when ``cfg.dataset`` names several datasets (API-MH: one net for every input size).
    """
    if adaptive_pool is None:
        adaptive_pool = len(cfg.dataset_names) > 1
    return {
        "name": cfg.backbone,
        "num_classes": cfg.way,
        "in_channels": int(channels),
        "image_size": int(image_size),
        "width": float(cfg.width),
        "bn": "transductive",
        "adaptive_pool": bool(adaptive_pool),
        "mean": [float(m) for m in mean] if mean is not None else None,
        "std": [float(s) for s in std] if std is not None else None,
    }


#: the largest meta-model a spec may ask for (a checkpoint's spec is checked before building)
MAX_PARAMS = 100_000_000


def build_from_spec(
    spec: dict[str, Any], seed: int | None = None, max_params: int = MAX_PARAMS
) -> nn.Module:
    """Build a model from a :func:`meta_model_spec` dict. ``seed``: initialize the weights from
    a private generator state (the global RNG is left untouched). A spec of more than
    ``max_params`` parameters (counted on the meta device, without allocating) is refused."""
    kwargs = dict(spec)
    name = kwargs.pop("name")
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_backbone(name, **kwargs).parameters())
    except TypeError as e:
        raise CheckpointError(f"model spec {spec} is not a valid backbone spec ({e})") from None
    if n > max_params:
        raise CheckpointError(
            f"the model spec asks for a {name} of {n:,} parameters (width {kwargs.get('width')}), "
            f"more than the {max_params:,} apimeta builds; the checkpoint is not a meta-model "
            "apimeta wrote"
        )
    if seed is None:
        return build_backbone(name, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "meta-model-init"))
        return build_backbone(name, **kwargs)


def build_meta_model(
    cfg: RunConfig,
    channels: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Module:
    """The meta-model of ``cfg`` for one input spec; weights seeded from ``cfg.seed``; on
    ``cfg.device``."""
    spec = meta_model_spec(cfg, channels, image_size, mean, std)
    return build_from_spec(spec, seed=cfg.seed).to(cfg.device)


def meta_model_for_datasets(
    cfg: RunConfig, datasets: Sequence[FewShotDataset]
) -> tuple[nn.Module, dict[str, Any]]:
    """(model, spec) for the given datasets: their channels (max) and normalization (the first
    dataset's for a single dataset; the default 0.5/0.25 for several)."""
    channels = max(d.channels for d in datasets)
    if len(datasets) == 1:
        mean, std = datasets[0].mean, datasets[0].std
    else:
        mean = std = None
    spec = meta_model_spec(cfg, channels, datasets[0].image_size, mean, std)
    if spec["mean"] is not None and len(spec["mean"]) != channels:
        spec["mean"] = spec["std"] = None
    return build_from_spec(spec, seed=cfg.seed).to(cfg.device), spec


def load_meta_model(
    path: str | Path, which: str = "model", device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the meta-model stored in a checkpoint: returns (model, config, checkpoint)."""
    ckpt = load_checkpoint(path, map_location=device)
    for key in ("model_spec", "config", which):
        if key not in ckpt:
            raise CheckpointError(
                f"checkpoint {path} has no {key!r}; it is not a method checkpoint"
            )
    cfg = run_config_from_dict(ckpt["config"], where=str(path), quiet=True)
    model = build_from_spec(ckpt["model_spec"])
    try:
        model.load_state_dict(ckpt[which])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the stored spec: {e}"
        ) from None
    return model.to(device), cfg, ckpt


def load_init(
    init: str | Path | None,
    cfg: RunConfig,
    datasets: Sequence[FewShotDataset] | None = None,
    *,
    which: str = "model",
) -> nn.Module:
    """The initialization to evaluate: ``None``/``"random"`` -> the seeded random meta-model of
    ``cfg`` for ``datasets`` (default: loaded from ``cfg``); else the checkpoint at ``init``."""
    if init is None or str(init) == "random":
        ds = list(datasets) if datasets is not None else load_run_datasets(cfg)
        return meta_model_for_datasets(cfg, ds)[0]
    return load_meta_model(init, which=which, device=cfg.device)[0]


__all__ = [
    "build_from_spec",
    "build_meta_model",
    "load_init",
    "load_meta_model",
    "load_run_datasets",
    "meta_model_for_datasets",
    "meta_model_spec",
]
