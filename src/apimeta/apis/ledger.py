"""The query ledger: every image sent to any API is counted here, under a hard budget."""

from __future__ import annotations

import threading
from collections import defaultdict
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
