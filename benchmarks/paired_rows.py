"""Paired comparison of bench rows that ran in different ``apimeta bench --out`` directories.

    python benchmarks/paired_rows.py NAME=DIR [NAME=DIR ...]

Each DIR is a row's directory of a bench run (the one holding ``seed-N/tuned.json``, e.g.
``runs/contrastive/SS/bbkd-contrastive-leaves``). Every row must have been tuned on the same
meta-test tasks: bench draws them from its fixed evaluation seed, so the same ``--tasks`` and
shots give the same tasks (counts, shots, way and query size are checked; another dataset is
not caught). Prints, per shot, each row's
meta-val score of the chosen setting and meta-test mean per seed, then the paired bootstrap
(tasks and seeds, :func:`apimeta.stats.paired_bootstrap`) of every row against the first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from apimeta.evaluate import setting_label
from apimeta.stats import paired_bootstrap

KEYS = ("way", "query")  # protocol fields that must agree for the tasks to be the same


def load_row(path: Path) -> dict[int, dict]:
    """seed -> tuned.json of that seed's run."""
    rows = {}
    for f in sorted(path.glob("seed-*/tuned.json")):
        rows[int(f.parent.name.split("-")[1])] = json.loads(f.read_text())
    if not rows:
        raise SystemExit(f"{path}: no seed-*/tuned.json (run apimeta bench with --tune first)")
    return rows


def main(argv: list[str]) -> None:
    if not argv or any("=" not in a for a in argv):
        raise SystemExit(__doc__)
    rows = {name: load_row(Path(d)) for name, d in (a.split("=", 1) for a in argv)}
    first = next(iter(rows.values()))
    ref = next(iter(first.values()))
    for name, seeds in rows.items():
        for seed, t in seeds.items():
            same = [t.get("protocol", {}).get(k) == ref.get("protocol", {}).get(k) for k in KEYS]
            if t["tasks"] != ref["tasks"] or t["shots"] != ref["shots"] or not all(same):
                raise SystemExit(f"{name} seed {seed}: other tasks or shots than the first row")
    for ds in ref["results"]:
        for shot in ref["results"][ds]:
            print(f"\n## {ds} {shot}")
            accs = {}
            for name, seeds in rows.items():
                per = []
                for seed, t in sorted(seeds.items()):
                    cell = t["results"][ds][shot]
                    val = cell["val"][setting_label(cell["setting"])]
                    per.append(f"{seed}: val {val:.2f} test {cell['mean']:.2f}")
                accs[name] = np.array([t["results"][ds][shot]["accs"] for t in seeds.values()])
                print(f"{name}: mean {accs[name].mean():.2f}  ({'; '.join(per)})")
            base = next(iter(accs))
            for name in list(accs)[1:]:
                print(f"{name} - {base}: {paired_bootstrap(accs[name], accs[base])}")


if __name__ == "__main__":
    main(sys.argv[1:])
