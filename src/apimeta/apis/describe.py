"""API descriptions: what a user tells apimeta about models that do not carry its metadata.

Other people's models (a third-party Open Inference Protocol v2 server, an ONNX file exported by
someone else) do not say which classes they predict, what they return or how they want their
input. A *description file* (YAML or JSON) says it; pass it wherever a zoo goes
(``--zoo apis.yaml``, ``load_zoo("apis.yaml")``, bench scenarios, ``apimeta zoo show``)::

    version: 1
    source: http://127.0.0.1:8000   # a v2 server; omit it for ONNX files next to this file
    dataset: emoji                  # top-level keys are defaults for every model ...
    output: probs                   # what the models return: logits | probs | topk:K | label
    layout: flat                    # nchw (default) | nhwc | flat ([B, C*H*W])
    channels: 3
    image_size: 32
    models:                         # ... and each model may override them
      smiley-net:
        classes: [grinning face, red heart, thumbs up]   # names of the dataset's classes, or ids
        input_name: pixel_values    # tensor names (default: the model's metadata / ONNX graph)
        output_name: logits
      other-net:
        onnx_file: other.onnx       # an ONNX model (relative to this file) instead of a server
        classes: [4, 17, 23]

Keys of a model (each may also be given at the top level as a default):

* ``classes`` (required): the classes in the order of the model's outputs, as class ids or
  class names of ``dataset``. For a registered apimeta dataset names are matched to its class
  names (loading it once); for any other ``dataset`` (your own label set) each distinct name
  gets an id in order of first appearance, so models that share a class name share the class.
* ``dataset`` (required), ``output`` (required: what the model returns, never assumed).
* ``channels``, ``image_size``: the input the model wants, in apimeta's (C, S, S) terms; each
  may be left out where the model's metadata or graph shows it (not for ``flat`` channels).
* ``layout``: ``nchw``, ``nhwc`` or ``flat``; images are rearranged before they are sent.
* ``mean`` and ``std`` (per channel, in [0, 1] units) or ``input_range: [lo, hi]``: the input
  scaling the model expects (applied before sending; default: images in [0, 1] as they are).
* ``input_name``, ``output_name``; ``onnx_file``; ``class_names`` (display names for ids).

Top level only: ``version`` (1), ``source`` (a server URL or a folder, relative to the file;
default: the file's folder) and ``dataset_root`` (where to find ``dataset`` for name lookup).
Input and output datatypes (FP32, FP16, FP64) come from the model itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from apimeta.apis.base import APIInfo, parse_output_mode
from apimeta.apis.v2 import WIRE_TYPES
from apimeta.errors import ConfigError, InvalidQueryError

VERSION = 1
LAYOUTS = ("nchw", "nhwc", "flat")
#: v2 / ONNX float datatypes an API may take or return -> numpy dtype (the wire codec's table)
FLOAT_TYPES = {name: np.dtype(code) for name, code in WIRE_TYPES.items()}
ONNX_TYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(double)": "FP64"}
SUFFIXES = (".yaml", ".yml", ".json")

MODEL_KEYS = (
    "classes", "class_names", "dataset", "output", "channels", "image_size", "layout", "mean",
    "std", "input_range", "input_name", "output_name", "onnx_file",
)  # fmt: skip
TOP_KEYS = ("version", "source", "dataset_root", "models")
#: a model without these (itself or as a top-level default) is an error
REQUIRED = ("classes", "dataset", "output")


@dataclass(frozen=True)
class InputAdapter:
    """How images (B, C, H, W) in [0, 1] become a model's input: scaling, layout, datatype.

    ``mean``/``std``: per-channel normalization ((x - mean) / std); ``input_range``: an affine
    map of [0, 1] onto [lo, hi] (exclusive with mean/std); ``layout``: ``nchw`` | ``nhwc`` |
    ``flat``; ``dtype``: the model's input datatype (FP32, FP16, FP64).
    """

    layout: str = "nchw"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    input_range: tuple[float, float] | None = None
    dtype: str = "FP32"

    def shape(self, channels: int, image_size: int) -> list[int]:
        """The per-image input shape in this layout."""
        c, s = channels, image_size
        return {"nchw": [c, s, s], "nhwc": [s, s, c], "flat": [c * s * s]}[self.layout]

    def __call__(self, x: Tensor) -> np.ndarray:
        """(B, C, H, W) in [0, 1] -> the model's input as a contiguous numpy array."""
        x = x.detach().to("cpu", torch.float32)
        if self.mean:
            m = torch.tensor(self.mean).view(1, -1, 1, 1)
            s = torch.tensor(self.std).view(1, -1, 1, 1)
            x = (x - m) / s
        elif self.input_range is not None:
            lo, hi = self.input_range
            x = x * (hi - lo) + lo
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        elif self.layout == "flat":
            x = x.reshape(x.shape[0], -1)
        return np.ascontiguousarray(x.numpy(), dtype=FLOAT_TYPES[self.dtype])


@dataclass(frozen=True)
class ModelSpec:
    """One described model: what the learner may know (``info`` once completed) and how to call
    it. ``channels``/``image_size`` may be None until the model's own input shape fills them."""

    name: str
    dataset: str
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    output: str
    channels: int | None = None
    image_size: int | None = None
    adapter: InputAdapter = field(default_factory=InputAdapter)
    input_name: str | None = None
    output_name: str | None = None
    onnx_file: str | None = None

    def complete(
        self,
        input_shape: Sequence[Any] | None,
        output_shape: Sequence[Any] | None,
        where: str,
        tags: dict[str, Any] | None = None,
    ) -> APIInfo:
        """The :class:`APIInfo`, checked against the model's declared input and output shapes
        (batch axis included; unknown dims as -1, None or a name). Raises :class:`ConfigError`."""
        layout = self.adapter.layout
        dims: list[int | None] | None = None
        if input_shape is not None:
            dims = [d if isinstance(d, int) and d > 0 else None for d in list(input_shape)[1:]]
            if len(dims) != len(self.adapter.shape(1, 1)):
                raise ConfigError(
                    f"{where}: the model takes input of shape {list(input_shape)}, which is not "
                    f"a {layout} image batch; set layout (nchw | nhwc | flat) in its description"
                )
        c, s = self.channels, self.image_size
        if dims is not None and layout != "flat":
            hw = dims[1:] if layout == "nchw" else dims[:2]
            dc = dims[0] if layout == "nchw" else dims[2]
            if hw[0] is not None and hw[1] is not None and hw[0] != hw[1]:
                raise ConfigError(f"{where}: the model takes {hw[0]}x{hw[1]} images; apimeta "
                                  "needs square images")  # fmt: skip
            c = c if c is not None else dc
            s = s if s is not None else (hw[0] or hw[1])
        if layout == "flat" and c is not None and s is None and dims and dims[0]:
            side = math.isqrt(dims[0] // c) if dims[0] % c == 0 else 0
            s = side if side * side * c == dims[0] else None
        if c is None or s is None:
            missing = " and ".join(k for k, v in (("channels", c), ("image_size", s)) if v is None)
            raise ConfigError(
                f"{where}: the model does not show its {missing}; give {missing} in its description"
            )
        if dims is not None:
            want = self.adapter.shape(c, s)
            if any(d is not None and d != w for d, w in zip(dims, want, strict=True)):
                raise ConfigError(
                    f"{where}: the model takes input {list(input_shape or [])}, but its "
                    f"description means [B, {', '.join(map(str, want))}] ({layout}, {c} "
                    f"channels, {s}x{s}); fix channels, image_size or layout"
                )
        if output_shape is not None:
            out = list(output_shape)
            width = out[-1] if out and isinstance(out[-1], int) and out[-1] > 0 else None
            if len(out) != 2 or (width is not None and width != len(self.classes)):
                raise ConfigError(
                    f"{where}: the model returns shape {out}, but {len(self.classes)} classes "
                    f"are described; list one class per output, in output order"
                )
        if self.adapter.mean and len(self.adapter.mean) != c:
            raise ConfigError(f"{where}: mean/std need {c} values (one per channel)")
        return APIInfo(
            name=self.name,
            dataset=self.dataset,
            classes=self.classes,
            class_names=self.class_names,
            channels=int(c),
            image_size=int(s),
            output=self.output,
            mean=self.adapter.mean,
            std=self.adapter.std,
            tags=dict(tags or {}),
        )


@dataclass(frozen=True)
class Description:
    """A parsed description file: where the models are (``source``) and their specs."""

    path: Path
    source: str
    models: tuple[ModelSpec, ...]

    @property
    def is_http(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    def datasets(self) -> list[str]:
        return list(dict.fromkeys(m.dataset for m in self.models))


def is_description(source: object) -> bool:
    """Whether ``source`` names a description file (a YAML/JSON file that is not zoo.json)."""
    if not isinstance(source, str | Path) or str(source).startswith(("http://", "https://")):
        return False
    p = Path(source)
    return p.suffix.lower() in SUFFIXES and p.name != "zoo.json" and p.is_file()


def description_datasets(path: str | Path) -> list[str]:
    """The datasets a description names (in order), without looking up any class name."""
    return read_description(path, resolve=False).datasets()


def read_description(
    path: str | Path,
    class_names_of: Callable[[str, str | None, int | None], list[str]] | None = None,
    *,
    resolve: bool = True,
) -> Description:
    """Parse and check a description file; one :class:`ConfigError` for what is wrong.

    ``class_names_of(dataset, root, image_size)``: the class names of a registered dataset (for
    classes given by name; default: load the dataset). ``resolve=False``: leave class names
    unresolved (placeholder ids 0..n-1), for reading where the models are and their datasets."""
    from apimeta.config import read_yaml

    p = Path(path)
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p} is not valid JSON ({e}); fix the file") from None
        except OSError as e:
            raise ConfigError(f"cannot read API description {p}: {e.strerror}") from None
    else:
        data = read_yaml(p)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"]:
        raise ConfigError(
            f"{p}: an API description needs a 'models' mapping (model name -> its classes, "
            "...); see `apimeta.apis.describe` or the README, 'Bring your own API'"
        )
    if data.get("version", VERSION) != VERSION:
        raise ConfigError(f"{p}: description version {data.get('version')!r}; this apimeta "
                          f"reads version {VERSION}")  # fmt: skip
    unknown = sorted(set(data) - set(TOP_KEYS) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(
            f"{p}: unknown key(s) {', '.join(unknown)}; a description has {', '.join(TOP_KEYS)} "
            f"and the model keys {', '.join(MODEL_KEYS)}"
        )
    defaults = {k: v for k, v in data.items() if k in MODEL_KEYS}
    root = data.get("dataset_root")
    raw: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for name, entry in data["models"].items():
        entry = {} if entry is None else entry
        if not isinstance(entry, dict):
            problems.append(f"model {name!r}: expected a mapping of its keys")
            continue
        bad = sorted(set(entry) - set(MODEL_KEYS))
        if bad:
            problems.append(f"model {name!r}: unknown key(s) {', '.join(bad)}")
        merged = {**defaults, **entry}
        missing = [k for k in REQUIRED if merged.get(k) in (None, "", [])]
        if missing:
            problems.append(f"model {name!r} lacks {', '.join(missing)}")
        raw.append((str(name), merged))
    if problems:
        raise ConfigError(
            f"{p}: {'; '.join(problems)} (every model needs {', '.join(REQUIRED)}: say which "
            "classes it predicts, in output order, and what it returns)"
        )
    ids = (
        _class_ids(raw, root, class_names_of, p)
        if resolve
        else {name: tuple(range(len(e["classes"]) if isinstance(e["classes"], list) else 1))
              for name, e in raw}
    )  # fmt: skip
    models = tuple(_spec(name, e, ids[name], f"{p}, model {name!r}") for name, e in raw)
    source = data.get("source")
    if source is None:
        if not all(m.onnx_file for m in models):
            no_file = [m.name for m in models if not m.onnx_file]
            raise ConfigError(
                f"{p}: no 'source' (a server URL) and no onnx_file for {', '.join(no_file)}; "
                "say where the models are"
            )
        source = str(p.parent)
    elif not isinstance(source, str):
        raise ConfigError(f"{p}: source must be a server URL or a folder, got {source!r}")
    elif not source.startswith(("http://", "https://")):
        source = str((p.parent / source).resolve())
    return Description(p, source, models)


def spec_from_entry(entry: dict[str, Any], where: str) -> ModelSpec:
    """The spec of a ``zoo.json`` entry without ``file``: a foreign ONNX model in a zoo, with
    the keys of a described model plus ``name``, classes given as ids. (Its ``mean``/``std``
    are applied before sending; in an apimeta-built entry they only inform.)"""
    e = {k: v for k, v in entry.items() if k in MODEL_KEYS}
    missing = [k for k in REQUIRED if e.get(k) in (None, "", [])]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")
    try:
        classes = tuple(int(c) for c in e["classes"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: classes in zoo.json must be integer ids") from None
    return _spec(str(entry["name"]), e, classes, where)


def _class_ids(
    raw: list[tuple[str, dict[str, Any]]],
    root: str | None,
    class_names_of: Callable[[str, str | None, int | None], list[str]] | None,
    where: Path,
) -> dict[str, tuple[int, ...]]:
    """Class ids per model: ids as given; names looked up in a registered dataset, or numbered
    by first appearance within an own label set."""
    from apimeta.data import DATASETS

    own: dict[tuple[str, str], int] = {}
    looked: dict[str, dict[str, int]] = {}
    out: dict[str, tuple[int, ...]] = {}
    for name, e in raw:
        classes, dataset = e["classes"], str(e["dataset"])
        if not isinstance(classes, list) or not classes:
            raise ConfigError(f"{where}, model {name!r}: classes must be a non-empty list")
        kinds = {type(c) for c in classes}
        if kinds <= {int} and bool not in kinds:
            out[name] = tuple(classes)
        elif kinds == {str}:
            if dataset in DATASETS:
                if dataset not in looked:
                    names = (class_names_of or _dataset_class_names)(
                        dataset, root, e.get("image_size")
                    )
                    looked[dataset] = {n: i for i, n in enumerate(names)}
                table = looked[dataset]
                unknown = [c for c in classes if c not in table]
                if unknown:
                    raise ConfigError(
                        f"{where}, model {name!r}: {', '.join(map(repr, unknown[:5]))} are not "
                        f"class names of dataset {dataset!r}; use its names or class ids"
                    )
                out[name] = tuple(table[c] for c in classes)
            else:
                out[name] = tuple(
                    own.setdefault((dataset, c), sum(k[0] == dataset for k in own)) for c in classes
                )
        else:
            raise ConfigError(
                f"{where}, model {name!r}: classes must be all integer ids or all names"
            )
        if len(set(out[name])) != len(out[name]):
            raise ConfigError(f"{where}, model {name!r}: a class is listed twice")
        if any(c < 0 for c in out[name]):
            raise ConfigError(f"{where}, model {name!r}: class ids must be >= 0")
    return out


def _dataset_class_names(dataset: str, root: str | None, image_size: int | None) -> list[str]:
    from apimeta.data import load_dataset

    return list(load_dataset(dataset, root=root, image_size=image_size).class_names)


def _spec(name: str, e: dict[str, Any], classes: tuple[int, ...], where: str) -> ModelSpec:
    try:
        parse_output_mode(str(e["output"]))
    except InvalidQueryError as err:
        raise ConfigError(f"{where}: {err}") from None
    layout = str(e.get("layout", "nchw")).lower()
    if layout not in LAYOUTS:
        raise ConfigError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")

    def positive(key: str) -> int | None:
        v = e.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
        return v

    def floats(key: str) -> tuple[float, ...]:
        v = e.get(key)
        if v is None:
            return ()
        try:
            out = tuple(float(x) for x in (v if isinstance(v, list) else [v]))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} must be a list of numbers, got {v!r}") from None
        if not all(math.isfinite(x) for x in out):
            raise ConfigError(f"{where}: {key} must be finite numbers")
        return out

    mean, std, rng = floats("mean"), floats("std"), floats("input_range")
    if bool(mean) != bool(std) or len(mean) != len(std):
        raise ConfigError(f"{where}: give mean and std together, one value per channel each")
    if any(s <= 0 for s in std):
        raise ConfigError(f"{where}: std values must be > 0")
    if rng and (len(rng) != 2 or rng[0] >= rng[1]):
        raise ConfigError(f"{where}: input_range must be [lo, hi] with lo < hi")
    if rng and mean:
        raise ConfigError(f"{where}: give either mean/std or input_range, not both")
    names = e.get("class_names")
    if names is None:
        given = e["classes"]
        names = [str(c) for c in given]
    if not isinstance(names, list) or len(names) != len(classes):
        raise ConfigError(f"{where}: class_names must list one name per class")
    for key in ("input_name", "output_name", "onnx_file"):
        if e.get(key) is not None and not isinstance(e[key], str):
            raise ConfigError(f"{where}: {key} must be a string")
    return ModelSpec(
        name=name,
        dataset=str(e["dataset"]),
        classes=classes,
        class_names=tuple(str(n) for n in names),
        output=str(e["output"]),
        channels=positive("channels"),
        image_size=positive("image_size"),
        adapter=InputAdapter(layout, mean, std, (rng[0], rng[1]) if rng else None),
        input_name=e.get("input_name"),
        output_name=e.get("output_name"),
        onnx_file=e.get("onnx_file"),
    )


__all__ = [
    "FLOAT_TYPES",
    "LAYOUTS",
    "ONNX_TYPES",
    "Description",
    "InputAdapter",
    "ModelSpec",
    "is_description",
    "read_description",
    "spec_from_entry",
]
