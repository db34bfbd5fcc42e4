"""Write a folder of unlabelled "public" images for ``recovery.source: folder`` (BENCHMARKS §6).

    python benchmarks/public_folder.py DATASET OUT [ZOO]

Writes every meta-TRAIN image of DATASET as ``OUT/000000.png`` ... (no class folders, no labels).
With ZOO, the classes the zoo's APIs predict are left out: what remains is in-domain public
data the API owners did not train on (e.g. emoji outside the zoo). Without ZOO, every meta-train
class is written (e.g. kanji as out-of-domain images for emoji APIs). Meta-val and meta-test
classes are never written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from apimeta.apis.sources import zoo_classes
from apimeta.data import load_dataset


def main(dataset: str, out: str, zoo: str | None = None) -> None:
    ds = load_dataset(dataset)
    train = ds.split("train")
    keep = torch.ones(len(train.labels), dtype=torch.bool)
    if zoo:
        owned = zoo_classes(zoo).get(dataset, [])
        keep = ~torch.isin(train.labels, torch.tensor(owned, dtype=torch.long))
    held_out = set(ds.split("val").classes) | set(ds.split("test").classes)
    assert not held_out & set(train.labels[keep].tolist()), "a meta-val/test class leaked"
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    images = train.images[keep].numpy()
    for i, a in enumerate(images):
        arr = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
        Image.fromarray(arr).save(path / f"{i:06d}.png")
    classes = len(set(train.labels[keep].tolist()))
    print(f"{len(images)} images of {classes} meta-train classes of {dataset} -> {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
