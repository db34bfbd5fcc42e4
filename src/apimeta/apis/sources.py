"""Opening a zoo: ``load_zoo`` picks the registered API source (:data:`API_SOURCES`) that fits.

Sources shipped: ``http`` (a v2 server URL), ``onnx`` (a zoo directory with ONNX files) and
``torch`` (a zoo directory of safetensors weights); each registers itself in its own module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apimeta.apis import http, local, onnx  # noqa: F401  (register their sources)
from apimeta.apis.base import API_SOURCES, APISource, BlackBoxAPI, parse_output_mode
from apimeta.apis.cache import CachedAPI, QueryCache
from apimeta.apis.http import is_http
from apimeta.apis.ledger import QueryLedger
from apimeta.errors import ConfigError


def find_source(source: str | Path, backend: str = "auto") -> type[APISource]:
    """The source ``backend`` names, or (``"auto"``) the first one that matches ``source``."""
    if backend != "auto":
        if backend not in API_SOURCES:
            raise ConfigError(
                f"backend must be auto or one of {', '.join(API_SOURCES.names())}; got {backend!r}"
            )
        return API_SOURCES.get(backend)
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


__all__ = ["API_SOURCES", "find_source", "is_http", "load_zoo"]
