"""Opening a zoo: ``load_zoo`` picks the registered API source (:data:`API_SOURCES`) that fits.

Sources shipped: ``described`` (an API description file, :mod:`apimeta.apis.describe`: other
people's models on a v2 server or in ONNX files), ``http`` (a v2 server URL), ``onnx`` (a zoo
directory with ONNX files) and ``torch`` (a zoo directory of safetensors weights); each but the
first registers itself in its own module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apimeta.apis import http, local, onnx  # noqa: F401  (register their sources)
from apimeta.apis.base import API_SOURCES, APISource, BlackBoxAPI, parse_output_mode
from apimeta.apis.cache import CachedAPI, QueryCache
from apimeta.apis.describe import description_datasets, is_description, read_description
from apimeta.apis.http import is_http, load_http_zoo
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.local import reject_options
from apimeta.apis.manifest import zoo_datasets
from apimeta.apis.onnx import OnnxAPI
from apimeta.errors import ConfigError


@API_SOURCES.register("described")
class DescribedZoo:
    """An API description file (YAML/JSON): described models on a v2 server or in ONNX files."""

    priority = -10
    handles_cache = True  # HttpAPI applies it itself (one range check per query); ONNX: wrapped

    @staticmethod
    def matches(source: str) -> bool:
        return is_description(source)

    @staticmethod
    def load(
        source: str, *, ledger: QueryLedger, output: str, device: str = "cpu", **options: Any
    ) -> list[BlackBoxAPI]:
        desc = read_description(source)
        max_batch = options.pop("max_batch", 4096)
        cache = options.pop("cache", None)
        if desc.is_http:
            options["cache"] = cache
            return list(
                load_http_zoo(
                    desc.source, ledger=ledger, output=output, specs=list(desc.models), **options
                )
            )
        reject_options(options, source)
        root = Path(desc.source)
        no_file = [m.name for m in desc.models if not m.onnx_file]
        if no_file:
            raise ConfigError(
                f"{source}: models {', '.join(no_file)} have no onnx_file, and the source "
                f"{root} is a folder; give each its onnx_file or make source a server URL"
            )
        apis: list[BlackBoxAPI] = [
            OnnxAPI.from_spec(
                root / str(m.onnx_file), m, ledger, output, max_batch=max_batch, device=device
            )
            for m in desc.models
        ]
        return [CachedAPI(a, cache) for a in apis] if cache is not None else apis  # type: ignore[misc]


def served_over_http(source: str | Path | None) -> bool:
    """Whether the zoo ``source`` is a server: a URL, or a description whose source is one."""
    if source is None:
        return False
    if is_http(str(source)):
        return True
    if is_description(source):
        try:
            return read_description(source, resolve=False).is_http
        except ConfigError:
            return False
    return False


def zoo_classes(source: str | Path, **client_options: Any) -> dict[str, list[int]]:
    """The classes the APIs of a zoo predict, per dataset (sorted ids), read from its manifest,
    description or model metadata; nothing is queried (the APIs get a zero budget)."""
    apis = load_zoo(source, ledger=QueryLedger(budget=0), **client_options)
    out: dict[str, set[int]] = {}
    for a in apis:
        out.setdefault(a.info.dataset, set()).update(int(c) for c in a.info.classes)
        close = getattr(a, "close", None)
        if close is not None:
            close()
    return {d: sorted(c) for d, c in out.items()}


def declared_datasets(source: str | Path) -> list[str]:
    """The datasets a zoo says its APIs were trained on, read without loading anything (a zoo
    directory's manifest, a description file; [] for a server)."""
    if is_http(str(source)):
        return []
    if is_description(source):
        return description_datasets(source)
    return zoo_datasets(source)


def find_source(source: str | Path, backend: str = "auto") -> type[APISource]:
    """The source ``backend`` names, or (``"auto"``) the first one that matches ``source``."""
    if backend != "auto":
        if backend not in API_SOURCES:
            raise ConfigError(
                f"backend must be auto or one of {', '.join(API_SOURCES.names())}; got {backend!r}"
            )
        return API_SOURCES.get(backend)
    p = Path(str(source))
    if p.suffix.lower() in (".yaml", ".yml", ".json") and p.name != "zoo.json" and not p.exists():
        raise ConfigError(f"API description file {p} does not exist; check the path")
    ordered = sorted(API_SOURCES.names(), key=lambda n: API_SOURCES.get(n).priority)
    for name in ordered:
        if API_SOURCES.get(name).matches(str(source)):
            return API_SOURCES.get(name)
    raise ConfigError(
        f"{source} is not an API zoo (no zoo.json there and not an http(s) URL); build one "
        f"with `apimeta zoo build --out {source}` or pass the right directory or URL"
    )


def load_zoo(
    source: str | Path,
    *,
    ledger: QueryLedger | None = None,
    output: str = "logits",
    device: str = "cpu",
    backend: str = "auto",
    max_batch: int = 4096,
    cache: QueryCache | str | Path | None = None,
    **client_options: Any,
) -> list[BlackBoxAPI]:
    """Open a zoo as black-box APIs sharing one :class:`QueryLedger` (created if None).

    ``source``: a zoo directory (``zoo.json``), or ``http(s)://host:port`` of an API server, or
    an API description file (other people's models; :mod:`apimeta.apis.describe`), or
    anything another registered source accepts. ``backend``: ``"auto"`` (the first matching
    source: http, then onnx when the zoo has ONNX files, then torch) or a source name.
    ``output``: the output restriction (logits | probs | topk:K | label). ``cache``: a
    :class:`~apimeta.apis.cache.QueryCache` (or its SQLite path) answering repeated queries
    without sending or billing them. ``client_options``: :class:`~apimeta.apis.http.HttpAPI`
    keyword arguments (api_key, timeout, max_retries, ...); HTTP sources only.
    """
    parse_output_mode(output)
    ledger = ledger if ledger is not None else QueryLedger()
    if cache is not None and not isinstance(cache, QueryCache):
        cache = QueryCache(cache)
    kind = find_source(source, backend)
    options = dict(client_options)
    if cache is not None and kind.handles_cache:
        options["cache"] = cache
    apis = kind.load(
        str(source), ledger=ledger, output=output, device=device, max_batch=max_batch, **options
    )
    if cache is not None and not kind.handles_cache:
        apis = [CachedAPI(api, cache) for api in apis]  # type: ignore[misc]
    return apis


__all__ = [
    "API_SOURCES",
    "DescribedZoo",
    "declared_datasets",
    "find_source",
    "is_http",
    "load_zoo",
    "served_over_http",
    "zoo_classes",
]
