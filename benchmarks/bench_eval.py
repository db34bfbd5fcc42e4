"""Random init vs maml-real: few-shot accuracy, evaluation throughput and MAML meta-step time.

    .venv/bin/python benchmarks/bench_eval.py --dataset synthetic --tasks 50 --episodes 40

Trains ``maml-real`` for ``--episodes`` episodes (5-way ``--train-shot``-shot), then evaluates the
seeded random init and the selected maml-real checkpoint on the same fixed meta-test tasks
(5-way, ``--shots``, 15 queries, 10 steps at lr 0.01, transductive BN) and prints a markdown
table. Timings are wall-clock on this machine (see platform.md: shared CPUs are noisy).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from apimeta.data import DATASETS
from apimeta.evaluate import evaluate
from apimeta.methods import METHODS
from apimeta.models.meta import load_meta_model, load_run_datasets, meta_model_for_datasets
from apimeta.run_config import EvalConfig, RunConfig
from apimeta.runs import RunDir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="synthetic", choices=DATASETS.names())
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--tasks", type=int, default=100, help="meta-test tasks per shot")
    ap.add_argument("--shots", default="1,5")
    ap.add_argument("--query", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=40, help="maml-real training episodes")
    ap.add_argument("--train-shot", type=int, default=1)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2022)
    ap.add_argument("--out", default=None, help="run directory (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shots = tuple(int(s) for s in args.shots.split(","))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_eval-")) / "run"

    cfg = RunConfig(
        method="maml-real",
        dataset=args.dataset,
        data_root=args.data_root,
        image_size=args.image_size,
        shot=args.train_shot,
        query=args.query,
        episodes=args.episodes,
        first_order=args.first_order,
        eval=EvalConfig(every=max(args.episodes // 4, 4), tasks=20, test_tasks=2),
        seed=args.seed,
        out=str(out),
    )
    rows = []

    def run_eval(name: str, model: torch.nn.Module) -> None:
        for ds in datasets:
            t0 = time.perf_counter()
            res = evaluate(model, ds, shots=shots, query=args.query, tasks=args.tasks)
            dt = time.perf_counter() - t0
            rate = args.tasks * len(shots) / dt
            cells = [f"{r['mean']:.2f} ± {r['ci95']:.2f}" for r in res.values()]
            rows.append((name, ds.name, *cells, f"{rate:.1f}"))

    datasets = load_run_datasets(cfg)
    random_model, _ = meta_model_for_datasets(cfg, datasets)
    run_eval("random init", random_model)

    t0 = time.perf_counter()
    result = METHODS.get("maml-real")().train(cfg, RunDir.create(cfg))
    train_s = time.perf_counter() - t0
    steps = [r["step_time"] for r in RunDir(out).read_metrics() if r.get("phase") == "train"]
    steps_sorted = sorted(steps)
    median = steps_sorted[len(steps_sorted) // 2] if steps else float("nan")
    model, _, _ = load_meta_model(result.best_checkpoint or result.final_checkpoint)
    run_eval(f"maml-real ({args.episodes} ep, best@{result.metrics['best_step']})", model)

    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"`{cmd}`  (threads={args.threads}, torch {torch.__version__})\n")
    head = ["init", "dataset", *[f"{s}-shot acc %" for s in shots], "eval tasks/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    order = "first" if args.first_order else "second"
    print(
        f"\nmaml-real: {len(steps)} meta-updates ({cfg.meta_batch} tasks, {cfg.way}-way "
        f"{cfg.shot}-shot, {cfg.query} queries, {cfg.inner_steps} inner steps, {order} order): "
        f"median {median:.3f} s/meta-update; whole train() incl. evals {train_s:.1f} s; "
        f"{args.tasks} test tasks per shot; run dir {out}"
    )


if __name__ == "__main__":
    main()
