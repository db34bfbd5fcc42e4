"""Parallel stages, 1 vs 2 workers, as wall-time ratios measured in one run (issue: speed/scale).

    .venv/bin/python benchmarks/bench_parallel.py [--part zoo,eval] [--ray] [--apis 4] [--tasks 200]

* ``zoo``: ``build_zoo`` of ``--apis`` Conv4 APIs on emoji (20 epochs max, as ``zoo build``
  defaults), in this process (1 thread) vs 2 worker processes (1 thread each) [vs local Ray, 2
  CPUs]. Every build starts from an empty directory; the manifests must match. The dataset is
  rendered into its cache before the clocks start (each worker still reads it from disk).
* ``eval``: ``evaluate`` of the random Conv4 meta-model on ``--tasks`` emoji meta-test tasks per
  shot (1 and 5), 10 steps: in-process vs 2 workers [vs Ray]. The accuracies must match task by
  task.

Worker start-up (spawning, importing torch, Ray's start) is inside the timings: that is what a
user waits for. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from apimeta.apis import build_zoo, read_manifest
from apimeta.data import load_dataset
from apimeta.evaluate import evaluate
from apimeta.models import build_backbone
from apimeta.parallel import Backend, ensure_ray


def backends(ray: bool) -> dict[str, Backend]:
    out = {"1 process": Backend(), "2 workers": Backend("process", 2)}
    if ray:
        out["Ray, 2 CPUs"] = Backend("ray", 2)
    return out


def bench_zoo(n_apis: int, ray: bool) -> list[tuple[str, float]]:
    load_dataset("emoji")  # rendered and cached before any clock starts
    rows, ref = [], None
    for name, b in backends(ray).items():
        d = Path(tempfile.mkdtemp(prefix="bench-zoo-"))
        if b.kind == "ray":
            ensure_ray(b)  # started before the clock, like a cluster one joins
        t0 = time.perf_counter()
        build_zoo(["emoji"], n_apis, ["conv4"], 5, d, seed=2022, backend=b)
        rows.append((name, time.perf_counter() - t0))
        entries = [
            {k: v for k, v in e.items() if k != "train_time_s"} for e in read_manifest(d)["apis"]
        ]
        assert ref is None or entries == ref, "parallel build differs from sequential"
        ref = entries
        shutil.rmtree(d)
    return rows


def bench_eval(tasks: int, ray: bool) -> list[tuple[str, float]]:
    ds = load_dataset("emoji")
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, image_size=32, width=32)
    rows, ref = [], None
    for name, b in backends(ray).items():
        if b.kind == "ray":
            ensure_ray(b)
        t0 = time.perf_counter()
        res = evaluate(model, ds, shots=(1, 5), tasks=tasks, keep_accs=True, backend=b)
        rows.append((name, time.perf_counter() - t0))
        accs = {k: r["accs"] for k, r in res.items()}
        assert ref is None or accs == ref, "sharded evaluation differs from in-process"
        ref = accs
    return rows


def table(title: str, rows: list[tuple[str, float]]) -> str:
    base = rows[0][1]
    lines = [f"**{title}**", "", "| backend | wall s | speed-up |", "|---|---:|---:|"]
    lines += [f"| {n} | {t:.1f} | {base / t:.2f}x |" for n, t in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="zoo,eval")
    ap.add_argument("--ray", action="store_true", help="also time a local Ray with 2 CPUs")
    ap.add_argument("--apis", type=int, default=4)
    ap.add_argument("--tasks", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = args.part.split(",")
    out = {}
    if "zoo" in parts:
        out["zoo"] = bench_zoo(args.apis, args.ray)
        print(table(f"zoo build, {args.apis} Conv4 APIs on emoji", out["zoo"]), flush=True)
    if "eval" in parts:
        out["eval"] = bench_eval(args.tasks, args.ray)
        print(table(f"evaluation, {args.tasks} tasks x (1, 5)-shot", out["eval"]), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
