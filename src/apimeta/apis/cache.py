"""An on-disk query cache, so a resumed run never pays twice for the same query.

Keys are sha256 of (model key, output mode, image shape, image bytes as contiguous float32); values
are the float32 score rows. The store is one SQLite file in WAL mode: safe across threads,
processes and crashes (each batch is committed in one transaction). Cache hits are reported to
:meth:`QueryLedger.record_cache_hit` and are not billed.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from apimeta.apis.base import APIInfo, validate_query
from apimeta.apis.ledger import QueryLedger


def model_key(info: APIInfo) -> str:
    """What identifies an API in cache keys: its name, dataset and class ids."""
    return f"{info.name}|{info.dataset}|{','.join(map(str, info.classes))}"


class QueryCache:
    """SQLite-backed map from query keys to (n_classes,) float32 score rows.

    ``path``: the database file (created with its folder). Usable from several threads and
    processes at once; ``close()`` when done (or use as a context manager).

    Resume accounting: a checkpoint stores :meth:`high_water`; a run resumed from it sets
    ``bill_after`` to that mark. Rows stored after the mark were answered (and paid) after the
    checkpoint, so they are missing from the restored ledger: :func:`cached_query` bills a hit on
    such a row once (:meth:`owed`) instead of reporting it as a free cache hit.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.bill_after: int | None = None
        self._settled: set[str] = set()
        self._db = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, scores BLOB NOT NULL)"
            )
            self._db.commit()

    @staticmethod
    def keys(model: str, output: str, x: Tensor) -> list[str]:
        """One key per image of ``x`` (B, C, H, W)."""
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        prefix = f"{model}\0{output}\0{tuple(arr.shape[1:])}\0".encode()
        out = []
        for row in arr:
            h = hashlib.sha256(prefix)
            h.update(row.tobytes())
            out.append(h.hexdigest())
        return out

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The cached rows among ``keys`` (missing keys are absent from the result)."""
        found: dict[str, np.ndarray] = {}
        uniq = list(dict.fromkeys(keys))
        with self._lock:
            for i in range(0, len(uniq), 500):
                part = uniq[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT key, scores FROM scores WHERE key IN ({marks})", part
                ).fetchall()
                for k, blob in rows:
                    found[k] = np.frombuffer(blob, dtype="<f4").copy()
        return found

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Store rows and commit (one transaction per call)."""
        rows = [(k, np.asarray(v, dtype="<f4").tobytes()) for k, v in items]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", rows)

    def high_water(self) -> int:
        """The newest row id (0 when empty): everything stored so far is at or below it."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM scores").fetchone()[0])

    def set_bill_after(self, mark: int | None) -> None:
        """Bill hits on rows stored after ``mark`` (None: never); forgets what was billed."""
        with self._lock:
            self.bill_after = None if mark is None else int(mark)
            self._settled.clear()

    def settle_after(self, mark: int) -> None:
        """Count rows stored after ``mark`` as billed (e.g. those of a rolled-back meta-update
        whose queries the ledger kept). No-op unless ``bill_after`` is set."""
        if self.bill_after is None:
            return
        with self._lock:
            rows = self._db.execute("SELECT key FROM scores WHERE rowid > ?", [int(mark)])
            self._settled.update(k for (k,) in rows.fetchall())

    def owed(self, keys: list[str]) -> int:
        """How many of ``keys`` (cache hits, repeats counted) hit rows stored after
        ``bill_after`` and not billed yet; they count as billed from now on."""
        if self.bill_after is None or not keys:
            return 0
        fresh: set[str] = set()
        uniq = [k for k in dict.fromkeys(keys) if k not in self._settled]
        with self._lock:
            for i in range(0, len(uniq), 500):
                part = uniq[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT key FROM scores WHERE rowid > ? AND key IN ({marks})",
                    [self.bill_after, *part],
                ).fetchall()
                fresh.update(k for (k,) in rows)
            self._settled |= fresh
        return sum(k in fresh for k in keys)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> QueryCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QueryCache({str(self.path)!r})"


def cached_query(
    cache: QueryCache,
    info: APIInfo,
    ledger: QueryLedger,
    x: Tensor,
    fetch: Callable[[Tensor], Tensor],
) -> Tensor:
    """Answer (B, C, H, W) ``x`` from ``cache`` where possible; ``fetch`` (which charges the
    ledger) computes the misses, which are then stored. Returns (B, n_classes) float32 on x's
    device. Hits go to ``ledger.record_cache_hit``, except hits that :meth:`QueryCache.owed`
    says were paid after the checkpoint a run resumed from: those are charged."""
    keys = QueryCache.keys(model_key(info), info.output, x)
    hits = cache.get_many(keys)
    miss = [i for i, k in enumerate(keys) if k not in hits]
    out = torch.empty(x.shape[0], info.n_classes, dtype=torch.float32)
    if len(miss) < len(keys):
        owed = cache.owed([k for k in keys if k in hits])
        if owed:
            ledger.charge(info.name, owed)
        if len(keys) - len(miss) - owed:
            ledger.record_cache_hit(info.name, len(keys) - len(miss) - owed)
        for i, k in enumerate(keys):
            if k in hits:
                out[i] = torch.from_numpy(hits[k])
    if miss:
        idx = torch.tensor(miss, device=x.device)
        scores = fetch(x.index_select(0, idx)).detach().to("cpu", torch.float32)
        out[torch.tensor(miss)] = scores
        cache.put_many([(keys[i], scores[j].numpy()) for j, i in enumerate(miss)])
    return out.to(x.device)


class CachedAPI:
    """Wraps any :class:`BlackBoxAPI` with a :class:`QueryCache` (same ``info`` and ``ledger``)."""

    def __init__(self, api: object, cache: QueryCache):
        self.api = api
        self.cache = cache
        self.info: APIInfo = api.info  # type: ignore[attr-defined]
        self.ledger: QueryLedger = api.ledger  # type: ignore[attr-defined]

    def query(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, n_classes); cached rows are not sent or billed."""
        validate_query(x, self.info)
        return cached_query(self.cache, self.info, self.ledger, x, self.api.query)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        """Other attributes (``white_box_model``, ``stats``, ``close`` ...) of the wrapped API."""
        if name in ("api", "cache"):
            raise AttributeError(name)
        return getattr(self.api, name)

    def __repr__(self) -> str:
        return f"CachedAPI({self.api!r}, {self.cache!r})"
