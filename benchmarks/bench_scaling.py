"""How the cost of recovery and evaluation grows (issue: speed/scale, scaling figures).

    .venv/bin/python benchmarks/bench_scaling.py [--iters 10] [--reps 3] [--part recovery,eval]

* ``recovery``: CPU seconds per recovery iteration (lowres ZO, forward differences, the ``cpu``
  preset's generator nz=256 ngf=32) from an untrained API, varying one factor at a time around
  q = 10, B = 50, 32 px, Conv4 (width 32): q in 5..40, B in 25..200, 32 vs 84 px, and the API's
  architecture (conv4, resnet10, resnet18 at the zoo's default width 0.25). Each row also
  gives the cost per image sent ((1 + q) * B images per iteration), which is flat where the
  cost is linear in the queries.
* ``eval``: CPU seconds of ``evaluate`` (5-way 1-shot, 15 queries, 10 steps, Conv4 width 32 on
  emoji) vs the number of tasks, and the cost per task.

Medians over ``--reps`` runs, one thread, CPU time of this process. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.apis.recipe import build_api_model
from apimeta.data import load_dataset
from apimeta.evaluate import evaluate
from apimeta.models import build_backbone
from apimeta.recovery import ZOGradient, recover
from apimeta.run_config import RecoveryConfig, ZOConfig
from apimeta.zo import build_estimator

WIDTH = {"conv4": 32.0, "resnet10": 0.25, "resnet18": 0.25}


def cpu_median(fn, reps: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return statistics.median(out)


def recovery_row(arch: str, size: int, q: int, b: int, iters: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = build_api_model(arch, 5, 3, size, WIDTH[arch], [0.5] * 3, [0.25] * 3).eval()
    info = APIInfo("bench", "synthetic", (0, 1, 2, 3, 4), tuple("abcde"), 3, size)
    api = LocalAPI(model, info, QueryLedger())
    cfg = RecoveryConfig(per_class=b // 5, iters=iters, nz=256, ngf=32, early_stop_prob=None)
    est = build_estimator(ZOConfig(estimator="lowres", lowres=8, q=q, mu=0.005))

    def run() -> None:
        recover(api, cfg, rng=torch.Generator().manual_seed(1), gradient=ZOGradient(est))

    per_iter = cpu_median(run, reps) / iters
    images = (1 + q) * b
    return {"arch": arch, "px": size, "q": q, "B": b, "s_iter": per_iter, "images": images}


def part_recovery(iters: int, reps: int) -> None:
    rows = []
    for q in (5, 10, 20, 40):
        rows.append(("q", recovery_row("conv4", 32, q, 50, iters, reps)))
    for b in (25, 100, 200):
        rows.append(("B", recovery_row("conv4", 32, 10, b, iters, reps)))
    rows.append(("image size", recovery_row("conv4", 84, 10, 50, iters, reps)))
    for arch in ("resnet10", "resnet18"):
        rows.append(("API architecture", recovery_row(arch, 32, 10, 50, iters, reps)))
    print(
        "\n**One recovery iteration** (lowres ZO, forward differences; CPU s, 1 thread)\n\n"
        "| varied | API | px | q | B | images sent / iter | CPU ms / iter | CPU us / image |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for what, r in rows:
        print(
            f"| {what} | {r['arch']} | {r['px']} | {r['q']} | {r['B']} | {r['images']} | "
            f"{1000 * r['s_iter']:.0f} | {1e6 * r['s_iter'] / r['images']:.0f} |",
            flush=True,
        )


def part_eval(reps: int) -> None:
    ds = load_dataset("emoji")
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, image_size=32, width=32)
    print(
        "\n**Evaluation vs tasks** (5-way 1-shot, 15 queries, 10 steps; CPU s, 1 thread)\n\n"
        "| tasks | CPU s | CPU ms / task |\n|---:|---:|---:|"
    )
    for tasks in (25, 50, 100, 200):
        t = cpu_median(lambda tasks=tasks: evaluate(model, ds, shots=(1,), tasks=tasks), reps)
        print(f"| {tasks} | {t:.1f} | {1000 * t / tasks:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--part", default="recovery,eval")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    if "recovery" in args.part:
        part_recovery(args.iters, args.reps)
    if "eval" in args.part:
        part_eval(args.reps)


if __name__ == "__main__":
    main()
