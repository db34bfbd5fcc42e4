"""Plan a zoo's class coverage without training it: the classes every API of ``zoo build``
would draw (they depend only on the zoo seed and the API's index), for several API counts and
class pools, with the coverage ``zoo show`` prints. Build time: measured per API from a built
zoo's manifest (``train_time_s``), given as ZOO.

Usage: python benchmarks/zoo_coverage.py DATASET N_APIS[,N...] POOL[,POOL...] [ZOO] [WAY] [SEED]
e.g.   python benchmarks/zoo_coverage.py emoji 20,50,100,200 all,64 runs/zoos/emoji-conv4
"""

from __future__ import annotations

import sys

from apimeta.apis.manifest import read_manifest
from apimeta.apis.zoo import api_classes, class_pool_of, zoo_coverage
from apimeta.data import load_dataset


def main(dataset: str, counts: str, pools: str, zoo: str = "", way: int = 5, seed: int = 2022):
    train = load_dataset(dataset).split("train").classes
    per_api = None
    if zoo:
        apis = read_manifest(zoo)["apis"]
        per_api = sum(e["train_time_s"] for e in apis) / len(apis)
    print(f"{dataset}: {len(train)} meta-train classes; way {way}, zoo seed {seed}"
          + (f"; {per_api:.1f} s per API (one thread, {zoo})" if per_api else ""))  # fmt: skip
    print("| APIs | class pool | classes covered | APIs per class (min-max, mean) "
          "| held by 2+ | build (1 thread) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for p in pools.split(","):
        size = None if p == "all" else int(p)
        pool = class_pool_of(train, size, seed, dataset)
        for n in (int(v) for v in counts.split(",")):
            entries = [
                {"dataset": dataset, "classes": api_classes(pool, int(way), int(seed), i)}
                for i in range(n)
            ]
            c = zoo_coverage(entries)[dataset]
            build = f"{n * per_api / 60:.1f} min" if per_api else "-"
            print(f"| {n} | {p} ({pool.numel()}) | {c['classes']} | {c['min']}-{c['max']}, "
                  f"{c['mean']:.2f} | {100 * c['repeated']:.0f}% | {build} |")  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    main(*a[:4], *(int(v) for v in a[4:]))
