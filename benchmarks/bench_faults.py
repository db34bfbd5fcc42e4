"""Fault tolerance of ``HttpAPI``: a fixed workload through a fault-injecting proxy.

    .venv/bin/python benchmarks/bench_faults.py [--requests 300] [--batch 32] [--seed 0]

A loopback ``apimeta`` server (uvicorn thread) sits behind a proxy (apimeta.testing)
that injects, per infer request, seeded faults: 5xx bursts, 429 storms (Retry-After), slow
responses past the client timeout and dropped connections. The client queries a fixed workload
(sequentially, then with 4 concurrent chunks; then once more with billed retries under a tight
budget). Reported: faults injected, requests retried, queries lost (must be 0: every answer equals
the in-process model's), budget overspend (must be 0).
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from apimeta.apis import QueryLedger
from apimeta.apis.http import HttpAPI
from apimeta.apis.server import create_app
from apimeta.errors import QueryBudgetExceeded
from apimeta.testing import FaultyProxy, UvicornThread, tiny_apis


def fault_plan(n: int, seed: int) -> list[str]:
    """Seeded per-request actions: bursts of 503/502, 429 storms, slow and dropped requests."""
    rng = random.Random(seed)
    plan: list[str] = []
    while len(plan) < n:
        u = rng.random()
        if u < 0.04:
            plan += [rng.choice(["503", "502", "504"])] * rng.randint(2, 4)  # 5xx burst
        elif u < 0.07:
            plan += ["429:0.02"] * rng.randint(3, 6)  # 429 storm
        elif u < 0.10:
            plan.append("slow:0.5")
        elif u < 0.14:
            plan.append("drop")
        else:
            plan.append("ok")
    return plan


def run(proxy, url, x, ref, plan, *, concurrency, batch, bill_retries, budget, seed) -> dict:
    proxy.set_faults(plan)
    ledger = QueryLedger(budget=budget)
    api = HttpAPI(
        url,
        "api-000",
        ledger=ledger,
        timeout=0.25,
        max_retries=10,
        backoff=0.005,
        max_backoff=0.1,
        concurrency=concurrency,
        max_batch=batch,
        bill_retries=bill_retries,
        seed=seed,
    )
    t0 = time.perf_counter()
    answered, stopped = 0, ""
    chunk = batch * concurrency
    try:
        for i in range(0, x.shape[0], chunk):
            out = api.query(x[i : i + chunk])
            lost = int((~torch.isclose(out, ref[i : i + chunk], atol=1e-5).all(1)).sum())
            if lost:
                raise AssertionError(f"{lost} wrong answers")
            answered += out.shape[0]
    except QueryBudgetExceeded as e:
        stopped = f"stopped cleanly by the budget: {e}"[:120]
    api.close()
    faults = {k: v for k, v in proxy.counts.items() if k != "ok"}
    return {
        "concurrency": concurrency,
        "bill_retries": bill_retries,
        "images": x.shape[0],
        "answered": answered,
        "queries_lost": x.shape[0] - answered if not stopped else 0,
        "faults_injected": sum(faults.values()),
        "faults": faults,
        "requests_retried": int(api.stats["retries"]),
        "images_billed": ledger.used,
        "images_resent": sum(ledger.retries.values()),
        "budget": budget,
        "overspend": max(0, ledger.used - budget) if budget is not None else 0,
        "seconds": round(time.perf_counter() - t0, 2),
        "stopped": stopped,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    apis = tiny_apis()
    n = args.requests * args.batch
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        ref = apis[0]._model(x)
    plan = fault_plan(3 * args.requests, args.seed)
    with UvicornThread(create_app(apis, max_batch=256)) as srv, FaultyProxy(srv.url) as proxy:
        results = [
            run(proxy, proxy.url, x, ref, plan, concurrency=1, batch=args.batch,
                bill_retries=False, budget=n, seed=args.seed),
            run(proxy, proxy.url, x, ref, plan, concurrency=4, batch=args.batch,
                bill_retries=False, budget=n, seed=args.seed),
            run(proxy, proxy.url, x, ref, plan, concurrency=1, batch=args.batch,
                bill_retries=True, budget=n + n // 20, seed=args.seed),
        ]  # fmt: skip
    for r in results:
        print(r)
    bad = [r for r in results if r["queries_lost"] or r["overspend"]]
    print("OK: 0 queries lost, 0 overspend" if not bad else f"FAILED: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
