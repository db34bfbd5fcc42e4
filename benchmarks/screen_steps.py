"""Meta-val screen of more fine-tuning steps at meta-test (``eval.test_steps``) for tuned bench runs.

    python benchmarks/screen_steps.py STEPS NAME=SEED_DIR [NAME=SEED_DIR ...]

Each SEED_DIR is one tuned bench run (``<out>/<scenario>/<row>/seed-N``, holding ``eval.json``
and ``tuned.json``; random init: ``<out>/random-<dataset>/seed-N``). STEPS: comma-separated step
counts besides the runs' own (10), e.g. ``25,50``. Every setting of the run's tuned grid is
scored again on the same meta-val tasks with each new step count; the run's own meta-val scores
(from ``tuned.json``) stand for its step count. Prints, per shot and step grid, each row's best
meta-val score, and when rows named ``random`` and ``zoo`` are given, each other row's meta-val
gap share (row − random) / (zoo − random). Meta-test is never read or run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from apimeta.bench import row_init
from apimeta.evaluate import (
    evaluate_with_config,
    grid_settings,
    setting_label,
    with_protocol,
)
from apimeta.models.meta import load_init, load_run_datasets


def screen(path: Path, steps: list[int]) -> dict[str, dict[int, float]]:
    """``{"1-shot": {steps: best meta-val over the grid at that step count}}`` (mean over the
    run's datasets)."""
    row = json.loads((path / "eval.json").read_text())
    tuned = json.loads((path / "tuned.json").read_text())
    cfg, ckpt = row_init(row)
    datasets = load_run_datasets(cfg)
    model = load_init(ckpt, cfg, datasets)
    out: dict[str, dict[int, float]] = {}
    for shot in tuned["shots"]:
        key = f"{shot}-shot"
        per_steps: dict[int, list[float]] = {cfg.eval.test_steps: []}
        for ds in datasets:
            per_steps[cfg.eval.test_steps].append(
                max(tuned["results"][ds.name][key]["val"].values())
            )
        for n in steps:
            best = []
            for ds in datasets:
                scores = {}
                for s in grid_settings(tuned["grid"]):
                    c = with_protocol(cfg, {**s, "steps": n})
                    res = evaluate_with_config(
                        model, ds, c, split="val", shots=(shot,), tasks=tuned["val_tasks"]
                    )
                    scores[setting_label({**s, "steps": n})] = res[key]["mean"]
                print(f"{path} {ds.name} {key}: {scores}", flush=True)
                best.append(max(scores.values()))
            per_steps[n] = best
        out[key] = {n: sum(v) / len(v) for n, v in per_steps.items()}
    return out


def main(args: list[str]) -> None:
    torch.set_num_threads(1)
    steps = [int(v) for v in args[0].split(",")]
    rows = {name: screen(Path(d), steps) for name, d in (a.split("=", 1) for a in args[1:])}
    shots = list(next(iter(rows.values())))
    counts = sorted({n for r in rows.values() for v in r.values() for n in v})
    for key in shots:
        print(f"\n{key}: best meta-val over the grid with steps in the grid")
        print("| row | " + " | ".join(f"steps <= {n}" for n in counts) + " |")
        print("|---|" + "---|" * len(counts))
        # with steps as a grid key: the best over every count up to n
        best = {
            name: [max(v for m, v in r[key].items() if m <= n) for n in counts]
            for name, r in rows.items()
        }
        for name, vals in best.items():
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
        if "random" in best and "zoo" in best:
            for name, vals in best.items():
                if name in ("random", "zoo"):
                    continue
                shares = [
                    (v - r) / (z - r) * 100
                    for v, r, z in zip(vals, best["random"], best["zoo"], strict=True)
                ]
                print(f"| gap share {name} | " + " | ".join(f"{s:.0f}%" for s in shares) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
