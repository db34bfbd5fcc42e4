"""``synthetic``: a tiny procedurally generated dataset for tests and smoke runs (seconds).

Each class is a random coloured blob pattern; images are noisy jittered copies of it. It is
learnable (so smoke tests can check that training helps) and needs no data package.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from apimeta.data.base import DATASETS, FewShotDataset, ImageSplit
from apimeta.seeding import make_generator


@DATASETS.register("synthetic")
def load_synthetic(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    n_classes: tuple[int, int, int] | list[int] = (20, 8, 8),
    per_class: int = 20,
    channels: int = 3,
    progress: object = None,
) -> FewShotDataset:
    """``n_classes`` for (train, val, test); ``per_class`` images each; (C, s, s) uint8 images."""
    del root, progress  # generated in milliseconds: nothing to report
    s = image_size or 32
    g = make_generator(seed, "synthetic")
    total = sum(n_classes)
    protos = torch.rand(total, channels, 6, 6, generator=g)
    protos = F.interpolate(protos, size=(s, s), mode="bilinear", align_corners=False)
    splits, start = {}, 0
    for name, n in zip(("train", "val", "test"), n_classes, strict=True):
        imgs, labels = [], []
        for c in range(start, start + n):
            shift = torch.randint(-2, 3, (per_class, 2), generator=g)
            base = protos[c].expand(per_class, -1, -1, -1)
            rolled = torch.stack(
                [
                    torch.roll(b, (int(dx), int(dy)), (1, 2))
                    for b, (dx, dy) in zip(base, shift, strict=True)
                ]
            )
            x = rolled + 0.08 * torch.randn(rolled.shape, generator=g)
            imgs.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
            labels.append(torch.full((per_class,), c, dtype=torch.long))
        splits[name] = ImageSplit(torch.cat(imgs), torch.cat(labels))
        start += n
    return FewShotDataset(
        name="synthetic",
        class_names=[f"class{c:03d}" for c in range(total)],
        splits=splits,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
