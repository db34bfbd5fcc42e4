"""The APIs of a training run: the zoo of ``cfg.zoo`` behind one ledger, with the run's HTTP
client settings and query cache, and the cache's billing across a resume.

Why resuming does not pay twice or lose count (HTTP zoos): a failed or killed meta-update is
redone from ``last.pt`` with the RNG states from its start, so it recovers the same images and
sends the same queries.

* Failed update (server down past the retry policy): rolled back in memory with the ledger as
  it is, so images sent during it stay counted; with a query cache the redo takes the answers it
  already got from the cache (not billed again). Re-sent: only the request that failed.
* SIGKILL: the ledger comes from the last checkpoint, so images sent after it were paid to the
  server but are missing from it. With a query cache (``http.query_cache``, on by default for a
  zoo served over HTTP) every answer received
  before the kill was stored (one SQLite transaction per batch), so the redo takes it from the
  cache without sending it; and since the checkpoint holds the cache's newest row id
  (:func:`cache_mark`), those hits on rows stored after the checkpoint are charged to the ledger
  once (:meth:`QueryCache.owed`): the ledger again counts every image the server was paid for,
  except requests in flight at the kill (at most ``http.concurrency``), whose answers never
  arrived: those are paid twice and counted once. Without a cache, everything sent after the
  checkpoint is paid twice (counted once).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from apimeta.apis.base import BlackBoxAPI
from apimeta.apis.cache import QueryCache
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.sources import load_zoo, served_over_http
from apimeta.errors import ConfigError
from apimeta.run_config import RunConfig
from apimeta.seeding import derive_seed

log = logging.getLogger(__name__)


def http_client_options(cfg: RunConfig) -> dict[str, Any]:
    """``HttpAPI`` keyword arguments from ``cfg.http`` (the API key read from ``api_key_file``;
    without one, ``HttpAPI`` reads ``$APIMETA_API_KEY``)."""
    h = cfg.http
    opts: dict[str, Any] = {
        "timeout": h.timeout,
        "max_retries": h.max_retries,
        "backoff": h.backoff,
        "max_backoff": h.max_backoff,
        "concurrency": h.concurrency,
        "bill_retries": h.bill_retries,
        "seed": derive_seed(cfg.seed, "http-jitter"),
    }
    if h.api_key_file:
        path = Path(h.api_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"cannot read http.api_key_file {path}: {e.strerror}; give a file holding the "
                "server's API key (or set $APIMETA_API_KEY)"
            ) from None
        if not key:
            raise ConfigError(f"http.api_key_file {path} is empty; put the API key in it")
        opts["api_key"] = key
    return opts


def query_cache_path(cfg: RunConfig, run_dir: str | Path | None) -> Path | None:
    """Where ``cfg.http.query_cache`` puts the query cache: ``"auto"`` in the run directory;
    ``"http"`` (the default) there too when the zoo is served over HTTP, else none."""
    where = cfg.http.query_cache
    if where == "http":
        where = "auto" if served_over_http(cfg.zoo) else None
    if not where or where in ("off", "none"):
        return None
    if where == "auto":
        if run_dir is None:
            raise ConfigError("http.query_cache=auto needs the run directory; give a path instead")
        return Path(run_dir) / "query-cache.sqlite"
    return Path(where).expanduser()


def load_run_apis(
    cfg: RunConfig, ledger: QueryLedger, run_dir: str | Path | None = None
) -> list[BlackBoxAPI]:
    """The zoo of ``cfg.zoo`` (any registered API source) behind one ledger.

    HTTP zoos use the client settings of ``cfg.http``; ``cfg.http.query_cache`` (any zoo) adds
    an on-disk query cache (``"auto"``: ``<run_dir>/query-cache.sqlite``). Raises
    :class:`ConfigError` when the zoo covers none of the run's datasets.
    """
    if not cfg.zoo:
        raise ConfigError(
            "this method learns from APIs: pass --zoo DIR (build one with `apimeta zoo build`) "
            "or --zoo http://host:port (a server started with `apimeta serve`)"
        )
    options = http_client_options(cfg) if served_over_http(cfg.zoo) else {}
    cache_path = query_cache_path(cfg, run_dir)
    apis = load_zoo(
        cfg.zoo,
        ledger=ledger,
        output=cfg.api_output,
        device=cfg.device,
        cache=QueryCache(cache_path) if cache_path is not None else None,
        **options,
    )
    from apimeta.data import DATASETS

    wanted = set(cfg.dataset_names)
    have = {a.info.dataset for a in apis}
    own = {d for d in have if d not in DATASETS}
    if own and not have & wanted:  # described APIs with their own label sets
        log.warning(
            "the APIs label classes of %s (not an apimeta dataset); meta-testing on %s, whose "
            "classes they may have seen",
            sorted(own),
            sorted(wanted),
        )
    elif not have & wanted:
        raise ConfigError(
            f"the zoo's APIs cover datasets {sorted(have)}, but the run evaluates on "
            f"{sorted(wanted)}; pass --dataset {','.join(sorted(have))}"
        )
    if have - wanted:
        log.warning("zoo datasets %s are not evaluated (run datasets: %s)", have - wanted, wanted)
    return apis


def run_query_cache(apis: list[BlackBoxAPI]) -> QueryCache | None:
    """The :class:`QueryCache` behind ``apis`` (None without one)."""
    return next((a.cache for a in apis if getattr(a, "cache", None) is not None), None)  # type: ignore[attr-defined]


def cache_mark(cache: QueryCache | None) -> int:
    """What a checkpoint stores about the query cache: its newest row id (-1: no cache)."""
    return cache.high_water() if cache is not None else -1


def resume_cache_billing(cache: QueryCache | None, mark: int | None) -> None:
    """On resume from a checkpoint holding ``mark``: bill cache hits on rows stored after it
    (answered after the checkpoint, so paid but missing from the restored ledger)."""
    if cache is not None and mark is not None:
        cache.set_bill_after(int(mark) if int(mark) >= 0 else None)


__all__ = [
    "cache_mark",
    "http_client_options",
    "load_run_apis",
    "query_cache_path",
    "resume_cache_billing",
    "run_query_cache",
]
