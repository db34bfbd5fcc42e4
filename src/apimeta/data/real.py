"""The paper's benchmarks read from the user's local files: ``cifar-fs``, ``mini-imagenet``, ``cub``.

Nothing is downloaded. ``root`` (CLI ``--data-root``) points at the folder holding the files in
their standard formats; the class splits are the committed ``apimeta/splits/<name>.json``
(docs/design.md 3.1). Decoded and resized arrays are cached under ``apimeta_home()/datasets`` keyed by
the resolved root, the source files' sizes and times, and the image size.

* ``cifar-fs``: ``ROOT/cifar-100-python/{train,test,meta}`` (the CIFAR-100 python pickles; ROOT
  may also be that folder itself). Train and test images of a class are pooled (600 per class,
  train first). Native 32 px.
* ``mini-imagenet`` (Ravi & Larochelle split, WordNet ids), any of
  (a) ``ROOT/mini-imagenet-cache-{train,val,test}.pkl`` ({'image_data': uint8[N,84,84,3],
  'class_dict': {wnid: [indices]}});
  (b) ``ROOT/images/<wnid>*.jpg`` (optionally with ``ROOT/{train,val,test}.csv`` listing
  ``filename,label``);
  (c) class folders ``ROOT/<wnid>/*.jpg`` or ``ROOT/{train,val,test}/<wnid>/*.jpg``.
  Resized to 84 px by default.
* ``cub``: ``ROOT/CUB_200_2011/images/<NNN.Name>/*.jpg`` (or ``ROOT/images/...``, or ROOT itself
  holding the class folders). Classes sorted by folder name, i % 2 == 0 -> train, i % 4 == 1 ->
  val, i % 4 == 3 -> test. Resized to 84x84 without cropping by default.

``image_size`` overrides the resolution (e.g. 32 for CPU runs); resizing is Pillow bilinear with
antialiasing, the same as torchvision's ``Resize`` on PIL images. Pickles are read with a
restricted unpickler that only builds plain containers and numpy arrays.
"""

from __future__ import annotations

import functools
import logging
import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from apimeta.data.base import DATASETS, SPLITS, FewShotDataset, ImageSplit
from apimeta.data.cache import cache_path, load_cached, save_dataset
from apimeta.data.render import Progress, parallel_map, read_split_file
from apimeta.errors import DatasetNotFoundError

log = logging.getLogger(__name__)

LOADER_VERSION = "1"
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MINI_HELP = (
    "mini-ImageNet is not distributed by apimeta: get the Ravi & Larochelle split "
    "(images/ folder + train/val/test.csv, see https://github.com/twitter/meta-learning-lstm "
    "and https://github.com/yaoyao-liu/mini-imagenet-tools) or the pickled caches "
    "mini-imagenet-cache-{train,val,test}.pkl, and pass --data-root DIR containing them"
)
CUB_URL = "https://data.caltech.edu/records/65de6-vp158 (CUB_200_2011.tgz)"


# ----------------------------------------------------------------------------- helpers


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers/scalars and numpy arrays (no arbitrary code)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
            ("builtins", "bytearray"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def load_pickle(path: Path) -> Any:
    """Read a data pickle (CIFAR / mini-ImageNet format) with the restricted unpickler."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetNotFoundError(
            f"{path} is not a readable data pickle ({e}); re-download it"
        ) from e


def _need_root(root: Path | None, what: str, help_: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"{what} needs local files and no root was given: {help_}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{what}: data root {root} does not exist: {help_}")
    return root.resolve()


def _stamp(paths: list[Path]) -> list[list[Any]]:
    """(name, size, mtime_ns) of source files: part of the cache key."""
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as e:
            raise DatasetNotFoundError(f"cannot read {p} ({e}); check the data folder") from e
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def to_chw(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, size, size) uint8, Pillow-bilinear resized if needed."""
    from PIL import Image

    if images.shape[1] == size and images.shape[2] == size:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    out = np.empty((len(images), images.shape[3], size, size), dtype=np.uint8)
    for i, im in enumerate(images):
        pil = Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1)
    return out


def decode_files(files: list[str], size: int, mode: str = "RGB") -> np.ndarray:
    """Decode image files and resize to (size, size) without cropping: (N, C, s, s) uint8."""
    from PIL import Image

    c = 1 if mode == "L" else 3
    out = np.empty((len(files), c, size, size), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except OSError as e:
            raise DatasetNotFoundError(
                f"cannot decode image {f} ({e}); remove or replace it"
            ) from e
        a = np.asarray(im, dtype=np.uint8)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def build_dataset(
    name: str,
    per_class: list[np.ndarray],
    class_names: list[str],
    n_per_split: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    meta: dict[str, Any] | None = None,
) -> FewShotDataset:
    """Per-class (n_c, C, s, s) arrays in train, val, test class order -> :class:`FewShotDataset`."""
    splits, c = {}, 0
    for s, n in zip(SPLITS, n_per_split, strict=True):
        parts = per_class[c : c + n]
        if not parts:  # an empty split (an evaluation-only folder dataset)
            shape = (0, *per_class[0].shape[1:])
            splits[s] = ImageSplit(torch.zeros(shape, dtype=torch.uint8), torch.zeros(0))
            continue
        images = torch.from_numpy(np.concatenate(parts))
        labels = torch.cat(
            [torch.full((len(a),), c + i, dtype=torch.long) for i, a in enumerate(parts)]
        )
        splits[s] = ImageSplit(images, labels)
        c += n
    return FewShotDataset(name, class_names, splits, mean, std, meta=dict(meta or {}))


def _cached(
    name: str,
    root: Path,
    sources: list[Path],
    image_size: int,
    cache: bool,
    build: Any,
    n_files: list[int] | None = None,
    **extra: Any,
) -> FewShotDataset:
    """Load ``name`` from the cache (key: root, source stamps, size, ``extra``) or ``build()`` it."""
    path = cache_path(
        name,
        version=LOADER_VERSION,
        root=str(root),
        sources=_stamp(sources),
        n_files=n_files,
        image_size=image_size,
        **extra,
    )
    if cache:
        ds = load_cached(path)
        if ds is not None:
            return ds
    log.info("decoding %s from %s (first use; cached after)", name, root)
    ds = build()
    if cache:
        save_dataset(ds, path)
    return ds


# ----------------------------------------------------------------------------- CIFAR-FS


def _cifar_dir(root: Path | None) -> Path:
    help_ = (
        f"download the CIFAR-100 python version from {CIFAR_URL}, extract it and pass "
        "--data-root DIR containing cifar-100-python/"
    )
    root = _need_root(root, "cifar-fs", help_)
    for d in (root / "cifar-100-python", root):
        if (d / "meta").is_file() or (d / "train").is_file():
            for f in ("meta", "train", "test"):
                if not (d / f).is_file():
                    raise DatasetNotFoundError(f"cifar-fs: missing file {d / f}; {help_}")
            return d
    raise DatasetNotFoundError(f"cifar-fs: no {root / 'cifar-100-python' / 'meta'}; {help_}")


@DATASETS.register("cifar-fs")
def load_cifar_fs(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    cache: bool = True,
) -> FewShotDataset:
    """CIFAR-FS (Bertinetto et al. split of CIFAR-100): 64/16/20 classes x 600, 3x32x32."""
    del seed
    d = _cifar_dir(root)
    size = image_size or 32

    def build() -> FewShotDataset:
        meta = load_pickle(d / "meta")
        label_names = [n.decode() if isinstance(n, bytes) else n for n in meta[b"fine_label_names"]]
        parts = [load_pickle(d / f) for f in ("train", "test")]
        data = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts])
        labels = np.concatenate([np.asarray(p[b"fine_labels"], dtype=np.int64) for p in parts])
        data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        split = read_split_file("cifar-fs")
        names, arrays = [], []
        for s in SPLITS:
            for cname in split[s]:
                if cname not in label_names:
                    raise DatasetNotFoundError(f"cifar-fs: class {cname!r} not in {d / 'meta'}")
                arrays.append(to_chw(data[labels == label_names.index(cname)], size))
                names.append(cname)
        n = tuple(len(split[s]) for s in SPLITS)
        return build_dataset("cifar-fs", arrays, names, n, CIFAR100_MEAN, CIFAR100_STD)

    return _cached("cifar-fs", d, [d / f for f in ("meta", "train", "test")], size, cache, build)


# ----------------------------------------------------------------------------- mini-ImageNet


def _mini_sources(root: Path) -> tuple[str, Path, dict[str, list[str]] | None]:
    """Detect the mini-ImageNet format under ``root``: (kind, base, csv class->files or None)."""
    for base in (root, root / "mini-imagenet", root / "miniImageNet", root / "mini_imagenet"):
        if all((base / f"mini-imagenet-cache-{s}.pkl").is_file() for s in SPLITS):
            return "pickle", base, None
        if (base / "images").is_dir():
            # class -> files: from the split CSVs if present, else the file-name prefix
            csv: dict[str, list[str]] = {}
            if all((base / f"{s}.csv").is_file() for s in SPLITS):
                for s in SPLITS:
                    lines = (base / f"{s}.csv").read_text().splitlines()
                    for line in lines[1:]:  # header: filename,label
                        if line.strip():
                            fname, label = line.strip().split(",")[:2]
                            csv.setdefault(label, []).append(str(base / "images" / fname))
            else:
                for p in (base / "images").iterdir():
                    csv.setdefault(p.name[:9], []).append(str(p))
            return "images", base, csv
        if any((base / s).is_dir() for s in SPLITS) or any(base.glob("n[0-9]*/")):
            return "folders", base, None
    raise DatasetNotFoundError(
        f"mini-imagenet: found neither {root}/mini-imagenet-cache-train.pkl, {root}/images/ nor "
        f"{root}/<wnid>/ class folders; {MINI_HELP}"
    )


def _mini_class_files(
    kind: str, base: Path, csv: dict[str, list[str]] | None, wnid: str
) -> list[str]:
    if kind == "images":
        files = (csv or {}).get(wnid, [])
    else:
        dirs = [base / wnid] + [base / s / wnid for s in SPLITS]
        files = [str(p) for d in dirs if d.is_dir() for p in d.iterdir()]
    files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise DatasetNotFoundError(
            f"mini-imagenet: no images of class {wnid} under {base}; {MINI_HELP}"
        )
    return files


@DATASETS.register("mini-imagenet")
def load_mini_imagenet(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> FewShotDataset:
    """mini-ImageNet (Ravi & Larochelle): 64/16/20 classes x 600, 3x84x84 by default."""
    del seed
    root = _need_root(root, "mini-imagenet", MINI_HELP)
    kind, base, csv = _mini_sources(root)
    size = image_size or 84
    split = read_split_file("mini-imagenet")
    wnids = [w for s in SPLITS for w in split[s]]
    n = tuple(len(split[s]) for s in SPLITS)
    meta = {"format": kind}

    if kind == "pickle":
        sources = [base / f"mini-imagenet-cache-{s}.pkl" for s in SPLITS]

        def build() -> FewShotDataset:
            arrays: dict[str, np.ndarray] = {}
            for p in sources:
                blob = load_pickle(p)
                data = np.asarray(
                    blob[b"image_data"] if b"image_data" in blob else blob["image_data"]
                )
                cdict = blob.get(b"class_dict", blob.get("class_dict"))
                for w, idx in cdict.items():
                    w = w.decode() if isinstance(w, bytes) else w
                    arrays[w] = to_chw(data[np.asarray(idx, dtype=np.int64)], size)
            missing = [w for w in wnids if w not in arrays]
            if missing:
                raise DatasetNotFoundError(
                    f"mini-imagenet: classes {missing[:3]} missing from the pickles in {base}"
                )
            return build_dataset(
                "mini-imagenet",
                [arrays[w] for w in wnids],
                wnids,
                n,
                IMAGENET_MEAN,
                IMAGENET_STD,
                meta,
            )

    else:
        per_class_files = [_mini_class_files(kind, base, csv, w) for w in wnids]
        sources = [Path(f) for fs in per_class_files for f in (fs[0], fs[-1])]

        def build() -> FewShotDataset:
            job = functools.partial(decode_files, size=size)
            arrays = parallel_map(job, per_class_files, workers, progress)
            return build_dataset(
                "mini-imagenet", arrays, wnids, n, IMAGENET_MEAN, IMAGENET_STD, meta
            )

    counts = None if kind == "pickle" else [len(fs) for fs in per_class_files]
    csvs = [base / f"{s}.csv" for s in SPLITS if (base / f"{s}.csv").is_file()]
    return _cached("mini-imagenet", base, sources + csvs, size, cache, build, counts, kind=kind)


# ----------------------------------------------------------------------------- CUB


def _cub_images_dir(root: Path | None) -> Path:
    help_ = f"download CUB-200-2011 from {CUB_URL}, extract it and pass --data-root DIR containing CUB_200_2011/"
    root = _need_root(root, "cub", help_)
    for d in (root / "CUB_200_2011" / "images", root / "images", root):
        if d.is_dir() and any(p.is_dir() and p.name[:3].isdigit() for p in d.iterdir()):
            return d
    raise DatasetNotFoundError(
        f"cub: no {root / 'CUB_200_2011' / 'images'} with class folders; {help_}"
    )


def cub_split(folders: list[str]) -> dict[str, list[str]]:
    """The reference rule over sorted class folders: i%2==0 train, i%4==1 val, i%4==3 test."""
    folders = sorted(folders)
    return {
        "train": [f for i, f in enumerate(folders) if i % 2 == 0],
        "val": [f for i, f in enumerate(folders) if i % 4 == 1],
        "test": [f for i, f in enumerate(folders) if i % 4 == 3],
    }


@DATASETS.register("cub")
def load_cub(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> FewShotDataset:
    """CUB-200-2011: 100/50/50 classes (all images), resized to 3x84x84 without cropping."""
    del seed
    d = _cub_images_dir(root)
    folders = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name[:3].isdigit())
    if len(folders) < 4:
        raise DatasetNotFoundError(
            f"cub: need at least 4 class folders in {d}, found {len(folders)}"
        )
    if len(folders) != 200:
        log.warning("cub: expected 200 class folders in %s, found %d", d, len(folders))
    split = cub_split(folders)
    order = [f for s in SPLITS for f in split[s]]
    files = []
    for f in order:
        fs = sorted(str(p) for p in (d / f).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not fs:
            raise DatasetNotFoundError(f"cub: class folder {d / f} has no images")
        files.append(fs)
    size = image_size or 84
    names = [f.split(".", 1)[1] if "." in f else f for f in order]
    n = tuple(len(split[s]) for s in SPLITS)

    def build() -> FewShotDataset:
        arrays = parallel_map(functools.partial(decode_files, size=size), files, workers, progress)
        return build_dataset(
            "cub", arrays, names, n, IMAGENET_MEAN, IMAGENET_STD, {"folders": order}
        )

    sources = [Path(f) for fs in files for f in (fs[0], fs[-1])]
    return _cached("cub", d, sources, size, cache, build, [len(fs) for fs in files])
