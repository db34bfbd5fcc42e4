"""The black-box API contract shared by every backend (in process, ONNX, HTTP).

An API takes float images in [0, 1] of shape (B, C, H, W) and returns (B, n_classes) scores in
its output mode. Normalization happens *inside* the API; no gradient or parameter ever leaves it;
every image sent is charged to a :class:`~apimeta.apis.ledger.QueryLedger` first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from apimeta.apis.ledger import QueryLedger
from apimeta.errors import InvalidQueryError
from apimeta.registry import Registry

OUTPUT_MODES = ("logits", "probs", "topk:K", "label")
#: how far outside [0, 1] a query value may lie (float rounding of images computed in [0, 1])
RANGE_TOL = 1e-4


def parse_output_mode(mode: str) -> tuple[str, int | None]:
    """``"logits"`` -> ("logits", None); ``"topk:2"`` -> ("topk", 2). Raises on anything else."""
    if mode in ("logits", "probs", "label"):
        return mode, None
    if mode.startswith("topk:"):
        try:
            k = int(mode.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise InvalidQueryError(f"output mode must be one of {', '.join(OUTPUT_MODES)}; got {mode!r}")


def restrict_output(logits: Tensor, mode: str) -> Tensor:
    """Apply an API's output restriction to raw logits (B, C) -> (B, C).

    ``logits``: unchanged. ``probs``: softmax. ``topk:K``: softmax probabilities of the K best
    classes, zeros elsewhere. ``label``: one-hot of the argmax.
    """
    kind, k = parse_output_mode(mode)
    if kind == "logits":
        return logits
    if kind == "probs":
        return torch.softmax(logits, dim=1)
    if kind == "label":
        return torch.nn.functional.one_hot(logits.argmax(1), logits.shape[1]).to(logits.dtype)
    probs = torch.softmax(logits, dim=1)
    k = min(int(k or 1), logits.shape[1])
    top = probs.topk(k, dim=1)
    return torch.zeros_like(probs).scatter_(1, top.indices, top.values)


@dataclass(frozen=True)
class APIInfo:
    """What a learner may know about an API (nothing about its weights or data).

    ``classes``: global class ids (within ``dataset``) in local-label order; ``class_names``
    match them. ``channels``/``image_size``: the input spec. ``mean``/``std``: the normalization
    the API applies internally (informational). ``tags``: free metadata, e.g. ``{"arch": ...}``.
    """

    name: str
    dataset: str
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    channels: int
    image_size: int
    output: str = "logits"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["class_names"] = list(self.class_names)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIInfo:
        return cls(
            name=d["name"],
            dataset=d["dataset"],
            classes=tuple(int(c) for c in d["classes"]),
            class_names=tuple(d.get("class_names") or [str(c) for c in d["classes"]]),
            channels=int(d["channels"]),
            image_size=int(d["image_size"]),
            output=d.get("output", "logits"),
            mean=tuple(d.get("mean") or ()),
            std=tuple(d.get("std") or ()),
            tags=dict(d.get("tags") or {}),
        )


@runtime_checkable
class BlackBoxAPI(Protocol):
    """A queryable classifier. ``query`` charges ``ledger`` before computing anything."""

    info: APIInfo
    ledger: QueryLedger

    def query(self, x: Tensor) -> Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, n_classes) scores (detached, on x's device)."""
        ...


class APISource(Protocol):
    """A kind of zoo ``load_zoo`` can open: a zoo directory, an ONNX folder, a server ...

    Register one with ``@API_SOURCES.register(name)``; ``load_zoo(source, backend="auto")`` uses
    the first registered source (lowest ``priority``) whose :meth:`matches` accepts ``source``.
    ``handles_cache``: the source applies a query cache itself (else ``load_zoo`` wraps each API
    in a :class:`~apimeta.apis.cache.CachedAPI`).
    """

    priority: int
    handles_cache: bool

    @staticmethod
    def matches(source: str) -> bool:
        """Whether this source can open ``source`` (a path or URL)."""
        ...

    @staticmethod
    def load(
        source: str, *, ledger: QueryLedger, output: str, device: str, **options: Any
    ) -> list[BlackBoxAPI]:
        """The APIs of ``source`` sharing ``ledger``; ``options``: source-specific settings."""
        ...


#: API sources by name (``load_zoo(..., backend=NAME)``); see :class:`APISource`
API_SOURCES: Registry[type[APISource]] = Registry("API source")


def validate_query(x: Tensor, info: APIInfo, check_range: bool = True) -> None:
    """Raise :class:`InvalidQueryError` unless x is a float (B, C, H, W) batch matching ``info``."""
    if not isinstance(x, Tensor):
        raise InvalidQueryError(f"queries must be torch tensors, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidQueryError(f"queries must be float images in [0, 1], got dtype {x.dtype}")
    want = (info.channels, info.image_size, info.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != want:
        raise InvalidQueryError(
            f"API {info.name!r} expects images of shape (B, {want[0]}, {want[1]}, {want[2]}), "
            f"got {tuple(x.shape)}; resize or convert channels before querying"
        )
    if check_range and x.numel():
        check_image_range(x, f"query to {info.name!r}")


def check_image_range(x: Tensor, what: str) -> None:
    """Raise :class:`InvalidQueryError` unless every value of ``x`` is finite and lies in
    [0, 1] up to :data:`RANGE_TOL` (the one range check of clients and the server)."""
    # one pass: aminmax propagates NaN, and inf shows up as an extreme (cheaper than isfinite)
    lo_t, hi_t = torch.aminmax(x.detach())
    lo, hi = torch.stack([lo_t, hi_t]).tolist()  # one host sync for both
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidQueryError(f"{what} contains NaN or inf values")
    if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
        raise InvalidQueryError(
            f"{what} must lie in [0, 1], got [{lo:.4f}, {hi:.4f}]; clamp images before querying"
        )
