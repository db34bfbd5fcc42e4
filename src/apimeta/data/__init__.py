"""Few-shot datasets: built-in (emoji, kanji), the paper's benchmarks from local files, folders."""

from apimeta.data.base import DATASETS, SPLITS, FewShotDataset, ImageSplit, load_dataset

# Loaders register themselves on import.
for _mod in ("emoji", "kanji", "real", "folder", "synthetic"):
    try:
        __import__(f"apimeta.data.{_mod}")
    except ModuleNotFoundError as _e:  # not written yet
        if _e.name != f"apimeta.data.{_mod}":
            raise

__all__ = ["DATASETS", "SPLITS", "FewShotDataset", "ImageSplit", "load_dataset"]
