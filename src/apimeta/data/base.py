"""Dataset containers and the dataset registry.

A :class:`FewShotDataset` holds every image of a benchmark in memory as uint8 tensors, split into
class-disjoint ``train`` / ``val`` / ``test`` (meta-train / meta-val / meta-test) pools. Class ids
are global within a dataset (0 .. n_classes-1) and index ``class_names``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apimeta.episodes import TaskSampler
from apimeta.errors import ConfigError
from apimeta.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass
class ImageSplit:
    """``images``: (M, C, H, W) uint8; ``labels``: (M,) int64 global class ids."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or self.images.dtype != torch.uint8:
            raise ValueError(
                f"images must be (M, C, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be (M,) and match images")
        self.labels = self.labels.long()

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.labels.tolist()))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def of_class(self, class_id: int) -> Tensor:
        """All images of one class, (n, C, H, W) uint8, in storage (file) order."""
        return self.images[self.labels == class_id]


@dataclass
class FewShotDataset:
    """A benchmark: class-disjoint splits, class names, input spec and normalization stats."""

    name: str
    class_names: list[str]
    splits: dict[str, ImageSplit]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(next(iter(self.splits.values())).images.shape[1])

    @property
    def image_size(self) -> int:
        return int(next(iter(self.splits.values())).images.shape[-1])

    def split(self, name: str) -> ImageSplit:
        if name not in self.splits:
            raise ConfigError(
                f"dataset {self.name!r} has no split {name!r}; it has {', '.join(self.splits)}"
            )
        return self.splits[name]

    def sampler(
        self, split: str, way: int, shot: int, query: int, generator: torch.Generator
    ) -> TaskSampler:
        s = self.split(split)
        return TaskSampler(s.images, s.labels, way, shot, query, generator)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.channels,
            "image_size": self.image_size,
            **{f"{k}_classes": len(v.classes) for k, v in self.splits.items()},
            **{f"{k}_images": len(v) for k, v in self.splits.items()},
        }


# loader(root: Path | None, image_size: int | None, seed: int, **options) -> FewShotDataset
DatasetLoader = Callable[..., FewShotDataset]
DATASETS: Registry[DatasetLoader] = Registry("dataset")


def load_dataset(
    name: str,
    root: str | Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    **options: Any,
) -> FewShotDataset:
    """Load a registered dataset by name (``apimeta.data.DATASETS.names()`` lists them)."""
    loader = DATASETS.get(name)
    return loader(
        root=Path(root) if root is not None else None, image_size=image_size, seed=seed, **options
    )
