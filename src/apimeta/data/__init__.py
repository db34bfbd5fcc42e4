"""Few-shot datasets: built-in (emoji, kanji), the paper's benchmarks from local files, folders.

A loader module registers itself with ``@DATASETS.register(name)``; add its import below.
"""

from apimeta.data import emoji, folder, kanji, real, synthetic  # noqa: F401  (register)
from apimeta.data.base import DATASETS, SPLITS, FewShotDataset, ImageSplit, load_dataset

__all__ = ["DATASETS", "SPLITS", "FewShotDataset", "ImageSplit", "load_dataset"]
