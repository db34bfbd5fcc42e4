"""First-render and cached-load time of the built-in datasets (full ``emoji`` and ``kanji``).

    .venv/bin/python benchmarks/bench_datasets.py [--datasets emoji,kanji] [--workers N]
        [--per-class 20] [--home DIR]

By default renders into a fresh temporary APIMETA_HOME (so the first load really renders) and
then loads the cache three times (median; includes reading every byte once). Prints a markdown table plus the per-channel mean/std
of each train split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--datasets", default="emoji,kanji")
    ap.add_argument("--workers", type=int, default=None, help="render processes (default: auto)")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--home", default=None, help="APIMETA_HOME to use (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = None
    if args.home is None:
        tmp = tempfile.TemporaryDirectory(prefix="apimeta-bench-")
        args.home = tmp.name
    os.environ["APIMETA_HOME"] = args.home

    from apimeta.config import apimeta_home
    from apimeta.data import SPLITS, load_dataset

    rows, stats = [], []
    for name in args.datasets.split(","):
        t0 = time.perf_counter()
        ds = load_dataset(name, per_class=args.per_class, workers=args.workers)
        first = time.perf_counter() - t0
        loads = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = load_dataset(name, per_class=args.per_class, workers=args.workers)
            int(sum(int(again.splits[s].images.sum()) for s in SPLITS))  # touch every byte
            loads.append(time.perf_counter() - t0)
        assert torch.equal(again.splits["test"].images, ds.splits["test"].images)
        n_img = sum(len(ds.splits[s]) for s in SPLITS)
        size_mb = (
            sum(p.stat().st_size for p in (apimeta_home() / "datasets").glob(f"{name}-*")) / 2**20
        )
        cls = "/".join(str(len(ds.splits[s].classes)) for s in SPLITS)
        shape = f"{ds.channels}x{ds.image_size}x{ds.image_size}"
        rows.append(
            f"| {name} | {cls} | {n_img} | {shape} | {first:.1f} | "
            f"{1000 * first / n_img:.2f} | {statistics.median(loads):.3f} | {size_mb:.0f} |"
        )
        x = ds.splits["train"].images.double() / 255
        mean = [round(float(v), 4) for v in x.mean(dim=(0, 2, 3))]
        std = [round(float(v), 4) for v in x.std(dim=(0, 2, 3))]
        stats.append(f"{name}: train mean {mean} std {std}")
    print(f"workers={args.workers or 'auto'}, cpus={os.cpu_count()}, per_class={args.per_class}\n")
    print(
        "| dataset | classes train/val/test | images | shape | first render s | ms/image "
        "| cached load s | cache MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(stats))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
