"""The query ledger: every image sent to any API is counted here, under a hard budget."""

from __future__ import annotations

import threading
from collections import defaultdict
from multiprocessing.managers import BaseManager
from typing import Any

from apimeta.errors import QueryBudgetExceeded


class QueryLedger:
    """Counts images sent per API; ``charge`` raises *before* a query that would exceed ``budget``.

    ``retries`` counts images re-sent after a failed request, per API; whether a retry is billed
    against the budget is the caller's choice (``charge(..., retry=True, billed=...)``).
    Thread-safe. ``state_dict``/``load_state_dict`` make it part of a checkpoint.
    """

    def __init__(self, budget: int | None = None):
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        self.budget = budget
        self.used = 0
        self.per_api: dict[str, int] = defaultdict(int)
        self.retries: dict[str, int] = defaultdict(int)
        self.cached: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.used

    def can_afford(self, n: int) -> bool:
        return self.budget is None or self.used + n <= self.budget

    def charge(self, api: str, n: int, *, retry: bool = False, billed: bool = True) -> None:
        """Record ``n`` images sent to ``api``; raise QueryBudgetExceeded (charging nothing) first
        if a billed charge would exceed the budget."""
        if n < 0:
            raise ValueError(f"cannot charge a negative number of queries: {n}")
        with self._lock:
            if billed and self.budget is not None and self.used + n > self.budget:
                raise QueryBudgetExceeded(n, self.used, self.budget, api)
            if billed:
                self.used += n
                self.per_api[api] += n
            if retry:
                self.retries[api] += n

    def record_cache_hit(self, api: str, n: int) -> None:
        """Images answered from a local cache: not sent, not billed, reported separately."""
        with self._lock:
            self.cached[api] += n

    def summary(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "budget": self.budget,
            "remaining": self.remaining,
            "per_api": dict(self.per_api),
            "retries": dict(self.retries),
            "cached": dict(self.cached),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "budget": -1 if self.budget is None else int(self.budget),
            "used": int(self.used),
            "per_api": dict(self.per_api),
            "retries": dict(self.retries),
            "cached": dict(self.cached),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with self._lock:
            b = int(state["budget"])
            self.budget = None if b < 0 else b
            self.used = int(state["used"])
            self.per_api = defaultdict(int, {k: int(v) for k, v in state["per_api"].items()})
            self.retries = defaultdict(int, {k: int(v) for k, v in state["retries"].items()})
            self.cached = defaultdict(int, {k: int(v) for k, v in state.get("cached", {}).items()})

    def __repr__(self) -> str:
        return f"QueryLedger(used={self.used}, budget={self.budget})"


class _LedgerStore:
    """The one :class:`QueryLedger` behind a :class:`SharedLedger`, living in a single process
    (a Ray actor or a multiprocessing manager) that serializes every charge."""

    def __init__(self, budget: int | None):
        self.ledger = QueryLedger(budget)

    def try_charge(self, api: str, n: int, retry: bool, billed: bool) -> tuple | None:
        """``None`` when charged; ``(requested, used, budget, api)`` when refused (nothing
        charged). Refusals travel as data: exceptions do not cross every backend intact."""
        try:
            self.ledger.charge(api, n, retry=retry, billed=billed)
        except QueryBudgetExceeded as e:
            return (e.requested, e.used, e.budget, e.api)
        return None

    def record_cache_hit(self, api: str, n: int) -> None:
        self.ledger.record_cache_hit(api, n)

    def state_dict(self) -> dict[str, Any]:
        return self.ledger.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state)


class _LedgerManager(BaseManager):
    """The manager process that holds a :class:`SharedLedger`'s store (``kind="process"``)."""


_LedgerManager.register("LedgerStore", _LedgerStore)


class SharedLedger(QueryLedger):
    """A query ledger that several worker processes (a local pool or Ray workers) spend
    together: every charge goes to one store process, which refuses a query that would exceed
    the budget before any of it is billed, so the workers together never overspend it.

    Use :meth:`start` (``kind``: ``"process"`` for a local manager process, ``"ray"`` for a Ray
    actor), pass the ledger to the workers (it pickles as a handle to the store), build each
    worker's APIs on it, and :meth:`close` it when done (or use it as a context manager). The
    counters read here (``used``, ``summary()``, ...) are fetched from the store.
    """

    def __init__(self, handle: Any, kind: str, manager: Any = None):
        self._handle, self._kind, self._manager = handle, kind, manager
        self._owner = True  # copies sent to workers do not stop the store

    @classmethod
    def start(cls, budget: int | None, kind: str = "process") -> SharedLedger:
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0 or None, got {budget}")
        if kind == "ray":
            from apimeta.parallel import Backend, ensure_ray

            ray = ensure_ray(Backend("ray"))
            return cls(ray.remote(num_cpus=0)(_LedgerStore).remote(budget), "ray")
        if kind != "process":
            raise ValueError(f"kind must be 'process' or 'ray', got {kind!r}")
        import multiprocessing

        manager = _LedgerManager(ctx=multiprocessing.get_context("spawn"))
        manager.start()
        return cls(manager.LedgerStore(budget), "process", manager)

    def _call(self, method: str, *args: Any) -> Any:
        if self._kind == "ray":
            import ray

            return ray.get(getattr(self._handle, method).remote(*args))
        return getattr(self._handle, method)(*args)

    def __getstate__(self) -> dict[str, Any]:
        return {"handle": self._handle, "kind": self._kind}  # the manager stays with its owner

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._handle, self._kind, self._manager = state["handle"], state["kind"], None
        self._owner = False

    def charge(self, api: str, n: int, *, retry: bool = False, billed: bool = True) -> None:
        if n < 0:
            raise ValueError(f"cannot charge a negative number of queries: {n}")
        refused = self._call("try_charge", api, int(n), bool(retry), bool(billed))
        if refused is not None:
            raise QueryBudgetExceeded(*refused)

    def record_cache_hit(self, api: str, n: int) -> None:
        self._call("record_cache_hit", api, int(n))

    def state_dict(self) -> dict[str, Any]:
        return self._call("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("load_state_dict", state)

    def _view(self) -> QueryLedger:
        view = QueryLedger()
        view.load_state_dict(self.state_dict())
        return view

    @property  # type: ignore[override]
    def budget(self) -> int | None:
        return self._view().budget

    @property  # type: ignore[override]
    def used(self) -> int:
        return self._view().used

    @property  # type: ignore[override]
    def per_api(self) -> dict[str, int]:
        return self._view().per_api

    @property  # type: ignore[override]
    def retries(self) -> dict[str, int]:
        return self._view().retries

    @property  # type: ignore[override]
    def cached(self) -> dict[str, int]:
        return self._view().cached

    @property
    def remaining(self) -> int | None:
        return self._view().remaining

    def can_afford(self, n: int) -> bool:
        return self._view().can_afford(n)

    def summary(self) -> dict[str, Any]:
        return self._view().summary()

    def close(self) -> None:
        """Stop the store (owner only); the ledger's final state should be read first."""
        if not self._owner:
            return
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None
        elif self._kind == "ray" and self._handle is not None:
            import ray

            ray.kill(self._handle)
        self._handle = None

    def __enter__(self) -> SharedLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SharedLedger({self._kind})"
