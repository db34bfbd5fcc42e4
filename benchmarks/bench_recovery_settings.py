"""Recovery cost vs settings on a real zoo: generator width, estimator, early stop.

    .venv/bin/python benchmarks/bench_recovery_settings.py --zoo runs/zoos/emoji-conv4 --apis 3

For each setting, recovers 10 images per class from APIs 0..N-1 (50 iterations, q = 10) and prints
mean fidelity (min-max), queries, iterations run and wall time per recovery as a Markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from apimeta.apis import load_zoo
from apimeta.recovery import ZOGradient, recover
from apimeta.run_config import RecoveryConfig
from apimeta.zo import ESTIMATORS

SETTINGS = [  # (ngf, estimator, early_stop_prob)
    (64, "forward", None),
    (32, "forward", None),
    (32, "lowres", None),
    (32, "lowres", 0.8),
    (16, "lowres", None),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="runs/zoos/emoji-conv4")
    ap.add_argument("--apis", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--q", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    apis = load_zoo(args.zoo)[: args.apis]
    print("| ngf | estimator | early stop | fidelity (min-max) | queries | iterations | wall |")
    print("|---|---|---|---|---|---|---|")
    for ngf, est, early in SETTINGS:
        fid, qs, its, ts = [], [], [], []
        for i, api in enumerate(apis):
            used = api.ledger.used
            t0 = time.perf_counter()
            r = recover(
                api,
                RecoveryConfig(per_class=10, iters=args.iters, ngf=ngf, early_stop_prob=early),
                rng=torch.Generator().manual_seed(i),
                gradient=ZOGradient(ESTIMATORS.get(est)(q=args.q)),
                final_query=False,
            )
            ts.append(time.perf_counter() - t0)
            fid.append(r.fidelity)
            qs.append(api.ledger.used - used)
            its.append(r.iters)
        n = len(apis)
        print(
            f"| {ngf} | {est} | {early or '—'} | {sum(fid) / n:.3f} ({min(fid):.2f}–{max(fid):.2f}) "
            f"| {sum(qs) / n:,.0f} | {sum(its) / n:.0f} | {sum(ts) / n:.1f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
