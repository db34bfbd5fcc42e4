"""Zoo build cost and API quality per architecture.

    .venv/bin/python benchmarks/bench_zoo.py [--datasets synthetic,emoji] [--n-apis 3]
        [--epochs 20] [--resnet-width 0.25] [--threads 1]

For each (dataset, arch) it builds ``--n-apis`` 5-way APIs with :func:`apimeta.apis.build_zoo`
(the CPU defaults of ``apimeta zoo build``) into a temporary directory and prints a markdown table:
mean train time per API (s), mean / min / max holdout accuracy, mean epochs run (early stopping),
parameters. Datasets not registered in ``apimeta.data.DATASETS`` are skipped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from apimeta.apis import build_zoo
from apimeta.data import DATASETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,emoji")
    p.add_argument("--archs", default="conv4,resnet10,resnet18")
    p.add_argument("--n-apis", type=int, default=3)
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--per-class", type=int, default=None, help="images per class (dataset option)")
    p.add_argument("--conv4-width", type=int, default=32)
    p.add_argument("--resnet-width", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--out", type=Path, default=None, help="keep the zoos here (default: temp)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"{args.n_apis} APIs per row, {args.way}-way, <= {args.epochs} epochs (patience "
        f"{args.patience}), batch {args.batch_size}, per_class {args.per_class or 'default'}, "
        f"conv4 width {args.conv4_width}, resnet width {args.resnet_width}, "
        f"{args.threads} thread(s)\n"
    )
    print(
        "| dataset | arch | train s/API | holdout acc mean | min | max | epochs run "
        "| params | data load s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for ds in args.datasets.split(","):
            if ds not in DATASETS.names():
                print(f"| {ds} | (not registered; skipped) | | | | | | | |")
                continue
            for arch in args.archs.split(","):
                t0 = time.perf_counter()
                m = build_zoo(
                    [ds],
                    args.n_apis,
                    [arch],
                    args.way,
                    root / f"{ds}-{arch}",
                    seed=args.seed,
                    epochs=args.epochs,
                    patience=args.patience or None,
                    batch_size=args.batch_size,
                    dataset_options={"per_class": args.per_class} if args.per_class else None,
                    conv4_width=args.conv4_width,
                    resnet_width=args.resnet_width,
                )
                wall = time.perf_counter() - t0
                times = [e["train_time_s"] for e in m.apis]
                accs = [e["holdout_acc"] for e in m.apis]
                eps = [e["epochs_run"] for e in m.apis]
                load = wall - sum(times)  # dataset loading / rendering and saving
                print(
                    f"| {ds} | {arch} | {statistics.mean(times):.2f} "
                    f"| {100 * statistics.mean(accs):.1f}% | {100 * min(accs):.1f}% "
                    f"| {100 * max(accs):.1f}% | {statistics.mean(eps):.1f} "
                    f"| {m.apis[0]['n_params']:,} | {load:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
