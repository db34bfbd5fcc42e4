"""Tune finished bench runs again on another protocol grid, without retraining or touching them.

    python benchmarks/retune.py OUT --shots 5 --tune steps=10,25,50 --tune head=learned,random \
        [--workers 2] NAME=ROW_DIR [NAME=ROW_DIR ...]

Each ROW_DIR is a row of an ``apimeta bench --out`` directory holding ``seed-N/eval.json`` (e.g.
``runs/ctl/SS/bbkd-colour-leaves-ink``; random init: ``runs/ctl/random-emoji``). Every seed's
init is tuned with :func:`apimeta.bench.tune_init` (the grid chosen per shot on meta-val, then
the winner meta-tested on the run's shared task list) and the answer cached in
``OUT/NAME/seed-N/tuned.json``, the layout ``benchmarks/paired_rows.py`` reads:

    python benchmarks/paired_rows.py default=OUT/default random=OUT/random zoo=OUT/zoo

A finished answer is reused, so a killed retune resumes. One torch thread per worker.

``--around``: a coordinate step instead of a whole grid. Per dataset and shot, the grid is the
setting the run's own tune chose on meta-val (its ``tuned.json``) crossed with the ``--tune``
keys, e.g. ``--around --tune steps=10,25,50``: the steps chosen on meta-val with lr, head and
``reinit`` kept as they were chosen (a quarter of the full grid's meta-val cost).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from apimeta.bench import row_init, tune_init
from apimeta.evaluate import parse_grid, tune_protocol
from apimeta.io import atomic_write_json
from apimeta.models.meta import load_init, load_run_datasets


def retune(run: str, cache: str, grid: dict[str, list[Any]], shots: list[int]) -> str:
    """Tune one seed's run (``run``: its directory) into ``cache``; returns ``cache``."""
    torch.set_num_threads(1)
    row = json.loads((Path(run) / "eval.json").read_text())
    cfg, ckpt = row_init(row)
    tune_init(cfg, ckpt, grid, shots, row["tasks"], cache=Path(cache))
    return cache


def retune_around(run: str, cache: str, grid: dict[str, list[Any]], shots: list[int]) -> str:
    """Tune one seed's run around its own chosen settings (``--around``); returns ``cache``."""
    torch.set_num_threads(1)
    out = Path(cache)
    key = {"grid": grid, "around": run, "shots": shots}
    if out.exists():
        stored = json.loads(out.read_text())
        if {k: stored.get(k) for k in key} == key:
            return cache
    row = json.loads((Path(run) / "eval.json").read_text())
    tuned = json.loads((Path(run) / "tuned.json").read_text())
    cfg, ckpt = row_init(row)
    datasets = load_run_datasets(cfg)
    model = load_init(ckpt, cfg, datasets)
    results: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        results[ds.name] = {}
        for shot in shots:
            chosen = tuned["results"][ds.name][f"{shot}-shot"]["setting"]
            around = {**{k: [v] for k, v in chosen.items()}, **grid}
            res = tune_protocol(model, ds, cfg, around, shots=(shot,), tasks=row["tasks"])
            results[ds.name].update(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ("tasks", "val_tasks", "protocol", "checkpoint")
    atomic_write_json(out, {**key, **{k: tuned[k] for k in fields}, "results": results})
    return cache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("rows", nargs="+", help="NAME=ROW_DIR")
    p.add_argument("--shots", default="1,5")
    p.add_argument("--tune", action="append", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--around", action="store_true", help="around each run's chosen setting")
    a = p.parse_args()
    grid = parse_grid(a.tune)
    shots = [int(s) for s in a.shots.split(",")]
    jobs = []
    for spec in a.rows:
        name, _, d = spec.partition("=")
        seeds = sorted(Path(d).glob("seed-*/eval.json"))
        if not name or not seeds:
            raise SystemExit(f"{spec}: expected NAME=ROW_DIR with seed-*/eval.json")
        for f in seeds:
            jobs.append((str(f.parent), str(a.out / name / f.parent.name / "tuned.json")))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(a.workers, mp_context=ctx) as pool:
        fn = retune_around if a.around else retune
        futures = [pool.submit(fn, run, cache, grid, shots) for run, cache in jobs]
        for fut in futures:
            print("done", fut.result(), flush=True)


if __name__ == "__main__":
    main()
