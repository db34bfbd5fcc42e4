"""The zoo manifest ``zoo.json``: its format, reading and validation.

A zoo directory holds one weights file per API (``api-000.safetensors`` ...; ONNX zoos also
``api-000.onnx``) and ``zoo.json``::

    {"version": 1, "build_args": {...},
     "apis": [{"name", "file", "arch", "width", "dataset", "classes", "class_names", "channels",
               "image_size", "mean", "std", "holdout_acc", "seed", "train_time_s", "epochs_run",
               "n_params", "onnx_file"?}, ...]}

An entry *without* ``file`` is a foreign ONNX model (not built by apimeta) and needs only
``name``, ``onnx_file``, ``dataset``, ``classes`` (integer ids, in output order) and ``output``
(what the model returns: logits | probs | topk:K | label); it may give the other keys of an API
description (``channels``, ``image_size``, ``layout``, ``mean``/``std`` or ``input_range``,
``input_name``, ``output_name``, ``class_names``; see :mod:`apimeta.apis.describe`). Its tensor
names, datatype and shapes are read from the graph and checked when the zoo loads::

    {"version": 1, "apis": [{"name": "mlp", "onnx_file": "mlp.onnx", "dataset": "emoji",
                             "classes": [3, 8, 21], "output": "probs", "layout": "flat",
                             "channels": 3}]}

Learners only ever see the :class:`~apimeta.apis.base.APIInfo` of an entry (:func:`entry_info`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apimeta.apis.base import APIInfo
from apimeta.errors import ConfigError

MANIFEST = "zoo.json"
VERSION = 1


@dataclass
class ZooManifest:
    """The parsed ``zoo.json`` of directory ``dir``; ``apis`` are the manifest entries."""

    dir: Path
    build_args: dict[str, Any]
    apis: list[dict[str, Any]] = field(default_factory=list)
    version: int = VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "build_args": self.build_args, "apis": self.apis}

    def __len__(self) -> int:
        return len(self.apis)


def zoo_dir(path: str | Path) -> Path:
    """The zoo directory of ``path`` (the directory itself, or the folder of its ``zoo.json``)."""
    p = Path(path)
    return p.parent if p.is_file() else p


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and check ``<path>/zoo.json`` (or the file itself); raises ConfigError if unusable."""
    p = Path(path)
    f = p if p.is_file() else p / MANIFEST
    if not f.is_file():
        raise ConfigError(
            f"{p} is not an API zoo (no {MANIFEST}); build one with "
            f"`apimeta zoo build --out {p}` or pass the right directory"
        )
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f} is not valid JSON ({e}); rebuild the zoo with --force") from None
    if not isinstance(data, dict) or not isinstance(data.get("apis"), list):
        raise ConfigError(f"{f} has no 'apis' list; rebuild the zoo with --force")
    if data.get("version") != VERSION:
        raise ConfigError(
            f"{f} has manifest version {data.get('version')!r}; this apimeta reads version "
            f"{VERSION}. Rebuild the zoo with this version (--force)."
        )
    for i, entry in enumerate(data["apis"]):
        check_entry(entry, f.parent, f"{f}, API {i}")
    return data


#: keys every manifest entry of an apimeta-built API needs (``class_names`` defaults to the ids)
REQUIRED = ("name", "file", "arch", "width", "dataset", "classes", "channels", "image_size",
            "mean", "std")  # fmt: skip
#: keys of an entry without ``file``: a foreign ONNX model
FOREIGN_REQUIRED = ("name", "onnx_file", "dataset", "classes", "output")


def check_entry(entry: Any, root: Path, where: str) -> None:
    """One :class:`ConfigError` listing what a manifest entry lacks; weight files must lie inside
    the zoo directory ``root``."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each entry of 'apis' must be an object")
    need = REQUIRED if "file" in entry or "onnx_file" not in entry else FOREIGN_REQUIRED
    missing = [k for k in need if k not in entry]
    if missing:
        name = entry.get("name", "?")
        kind = "an apimeta-built API" if need is REQUIRED else "a foreign ONNX model (no file)"
        raise ConfigError(
            f"{where} ({name!r}) lacks key(s) {', '.join(missing)}; {kind} needs "
            f"{', '.join(need)} (see apimeta.apis.manifest)"
        )
    for key in ("file", "onnx_file"):
        if key in entry and not inside(root, entry[key]):
            raise ConfigError(
                f"{where} ({entry['name']!r}): {key} {entry[key]!r} lies outside the zoo "
                f"directory {root}; weight files must be inside it"
            )


def inside(root: Path, rel: Any) -> bool:
    """Whether ``root / rel`` stays inside ``root`` (no absolute paths, no ``..`` escapes)."""
    if not isinstance(rel, str) or not rel:
        return False
    base = root.resolve()
    return (base / rel).resolve().is_relative_to(base)


def zoo_datasets(path: str | Path) -> list[str]:
    """The datasets the APIs of the zoo at ``path`` were trained on, in order of appearance."""
    return list(dict.fromkeys(str(e["dataset"]) for e in read_manifest(path)["apis"]))


def entry_info(entry: dict[str, Any], output: str = "logits") -> APIInfo:
    """The learner-visible :class:`APIInfo` of a manifest entry."""
    return APIInfo(
        name=entry["name"],
        dataset=entry["dataset"],
        classes=tuple(int(c) for c in entry["classes"]),
        class_names=tuple(entry.get("class_names") or map(str, entry["classes"])),
        channels=int(entry["channels"]),
        image_size=int(entry["image_size"]),
        output=output,
        mean=tuple(float(m) for m in entry["mean"]),
        std=tuple(float(s) for s in entry["std"]),
        tags={"arch": entry["arch"], "holdout_acc": entry.get("holdout_acc")},
    )


__all__ = [
    "FOREIGN_REQUIRED",
    "MANIFEST",
    "REQUIRED",
    "VERSION",
    "ZooManifest",
    "check_entry",
    "entry_info",
    "inside",
    "read_manifest",
    "zoo_datasets",
    "zoo_dir",
]
