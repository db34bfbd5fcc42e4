"""QueryLedger: the budget is never exceeded, refused charges cost nothing, state round-trips."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apimeta.apis import QueryLedger
from apimeta.errors import QueryBudgetExceeded

charges = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 60), st.booleans(), st.booleans()),
    max_size=40,
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(budget=st.one_of(st.none(), st.integers(0, 300)), seq=charges)
def test_budget_never_exceeded(budget: int | None, seq: list[tuple[str, int, bool, bool]]) -> None:
    ledger = QueryLedger(budget)
    expect_used = 0
    expect_per: dict[str, int] = {}
    for api, n, retry, billed in seq:
        affordable = ledger.can_afford(n)
        would_exceed = budget is not None and billed and expect_used + n > budget
        assert affordable == (budget is None or expect_used + n <= budget)
        before = ledger.state_dict()
        if would_exceed:
            with pytest.raises(QueryBudgetExceeded) as e:
                ledger.charge(api, n, retry=retry, billed=billed)
            assert ledger.state_dict() == before  # raised before charging anything
            assert (e.value.requested, e.value.used, e.value.budget) == (n, expect_used, budget)
        else:
            ledger.charge(api, n, retry=retry, billed=billed)
            if billed:
                expect_used += n
                expect_per[api] = expect_per.get(api, 0) + n
        assert ledger.used == expect_used
        assert budget is None or ledger.used <= budget
        assert ledger.remaining == (None if budget is None else budget - expect_used)
        assert {k: v for k, v in ledger.per_api.items() if v} == {
            k: v for k, v in expect_per.items() if v
        }
    assert sum(ledger.per_api.values()) == ledger.used

    clone = QueryLedger()
    clone.load_state_dict(ledger.state_dict())
    assert clone.state_dict() == ledger.state_dict()
    assert clone.summary() == ledger.summary()


def test_exact_budget_and_refusal_message() -> None:
    ledger = QueryLedger(10)
    ledger.charge("api-0", 10)
    assert ledger.remaining == 0 and not ledger.can_afford(1) and ledger.can_afford(0)
    ledger.charge("api-0", 0)
    with pytest.raises(QueryBudgetExceeded, match=r"api-0.*10 of 10 already used.*--query-budget"):
        ledger.charge("api-0", 1)
    assert ledger.used == 10


def test_retries_cache_hits_and_unbilled() -> None:
    ledger = QueryLedger(5)
    ledger.charge("x", 3, retry=True, billed=False)  # a free retry: counted, not billed
    ledger.record_cache_hit("x", 7)
    assert ledger.used == 0 and ledger.retries["x"] == 3 and ledger.cached["x"] == 7
    ledger.charge("x", 5, retry=True)
    assert ledger.used == 5 and ledger.retries["x"] == 8
    s = ledger.summary()
    assert s == {
        "used": 5,
        "budget": 5,
        "remaining": 0,
        "per_api": {"x": 5},
        "retries": {"x": 8},
        "cached": {"x": 7},
    }


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="budget"):
        QueryLedger(-1)
    with pytest.raises(ValueError, match="negative"):
        QueryLedger().charge("a", -1)


def test_unlimited_budget_state_roundtrip() -> None:
    ledger = QueryLedger(None)
    ledger.charge("a", 10**9)
    state = ledger.state_dict()
    assert state["budget"] == -1
    other = QueryLedger(3)
    other.load_state_dict(state)
    assert other.budget is None and other.used == 10**9 and other.can_afford(10**12)


def test_thread_safe_under_contention() -> None:
    ledger = QueryLedger(1000)
    refused = [0]
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(200):
            try:
                ledger.charge("t", 3)
            except QueryBudgetExceeded:
                with lock:
                    refused[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.used == 999  # 333 charges of 3 fit; the rest were refused
    assert refused[0] == 800 - 333
