"""Paired comparison of bench rows that ran in different ``apimeta bench --out`` directories.

    python benchmarks/paired_rows.py NAME=DIR [NAME=DIR ...]

Each DIR is a row's directory of a bench run (the one holding ``seed-N/tuned.json``, e.g.
``runs/contrastive/SS/bbkd-contrastive-leaves``). Every row must have been tuned on the same
meta-test tasks: bench draws them from its fixed evaluation seed, so the same ``--tasks`` and
shot give the same tasks (counts, way and query size are checked; another dataset is not
caught). Rows are compared on the shots they all hold (a row retuned at 5-shot only by
``benchmarks/retune.py`` pairs with a bench row's 5-shot tasks). Prints, per dataset and shot,
each row's meta-val score of the chosen setting and meta-test mean per seed, then the paired
bootstrap (tasks and seeds, :func:`apimeta.stats.paired_bootstrap`) of every row against the
first; for rows over several datasets (API-MH) also the pooled comparison, each seed's tasks of
every dataset side by side, as the bench's cell.
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
            if t["tasks"] != ref["tasks"] or not all(same):
                raise SystemExit(f"{name} seed {seed}: other tasks than the first row")
    shots = [
        s for s in ref["shots"] if all(s in t["shots"] for r in rows.values() for t in r.values())
    ]
    if not shots:
        raise SystemExit("the rows share no shot count")
    datasets = list(ref["results"])
    for shot in (f"{s}-shot" for s in shots):
        pooled: dict[str, list[np.ndarray]] = {}
        for ds in datasets:
            print(f"\n## {ds} {shot}")
            accs = {}
            for name, seeds in rows.items():
                per = []
                for seed, t in sorted(seeds.items()):
                    cell = t["results"][ds][shot]
                    val = cell["val"][setting_label(cell["setting"])]
                    per.append(f"{seed}: val {val:.2f} test {cell['mean']:.2f}")
                accs[name] = np.array([t["results"][ds][shot]["accs"] for t in seeds.values()])
                pooled.setdefault(name, []).append(accs[name])
                print(f"{name}: mean {accs[name].mean():.2f}  ({'; '.join(per)})")
            compare(accs)
        if len(datasets) > 1:
            print(f"\n## {'+'.join(datasets)} {shot} (pooled)")
            both = {name: np.concatenate(a, axis=1) for name, a in pooled.items()}
            for name, a in both.items():
                print(f"{name}: mean {a.mean():.2f}")
            compare(both)


def compare(accs: dict[str, np.ndarray]) -> None:
    """Print every row's paired bootstrap against the first row (arrays: seeds x tasks)."""
    base = next(iter(accs))
    for name in list(accs)[1:]:
        print(f"{name} - {base}: {paired_bootstrap(accs[name], accs[base])}")


if __name__ == "__main__":
    main(sys.argv[1:])
