"""Meta-val screen of bench runs: per variant, the meta-val curve (mean over seeds), the best
meta-val score and its update per seed; and, for runs tuned by ``bench --tune``, the best
meta-val score per shot over the protocol grid (from tuned.json). Meta-test is not read.

Usage: python benchmarks/screen_val.py BENCH_DIR [SCENARIO] [VARIANT ...]
(variant directories as bench writes them, e.g. bidf-mkd, bidf-mkd-augmented-memory).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def curve(metrics: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["step"]: r["score"] for r in rows if r.get("phase") == "val"}


def main(root: Path, scenario: str = "SS", variants: list[str] | None = None) -> None:
    base = root / scenario
    names = variants or sorted(p.name for p in base.iterdir() if p.is_dir())
    print(
        "| variant | seeds | meta-val at each eval (mean over seeds) | best per seed | mean best |"
    )
    print("|---|---|---|---|---|")
    for name in names:
        runs = sorted((base / name).glob("seed-*/metrics.jsonl")) or [base / name / "metrics.jsonl"]
        curves = [curve(m) for m in runs if m.exists()]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean_curve = " ".join(f"{s}:{statistics.mean(c[s] for c in curves):.1f}" for s in steps)
        bests = [max(c.items(), key=lambda kv: kv[1]) for c in curves]
        per_seed = ", ".join(f"{v:.1f}@{s}" for s, v in bests)
        mean_best = statistics.mean(v for _, v in bests)
        sd = statistics.stdev(v for _, v in bests) if len(bests) > 1 else 0.0
        print(
            f"| {name} | {len(curves)} | {mean_curve} | {per_seed} | {mean_best:.2f} ± {sd:.2f} |"
        )


def tuned(root: Path, scenario: str = "SS", variants: list[str] | None = None) -> None:
    """Best meta-val % per shot over the tuning grid of each run (tuned.json; its meta-test
    fields are not read), mean ± sd over seeds."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name != scenario)
    dirs += sorted(p for p in (root / scenario).iterdir() if p.is_dir())
    rows = []
    for d in dirs:
        if variants and d.name not in variants:
            continue
        files = sorted(d.glob("seed-*/tuned.json")) or sorted(d.glob("tuned.json"))
        per_shot: dict[str, list[float]] = {}
        for f in files:
            for res in json.loads(f.read_text())["results"].values():
                for shot, r in res.items():
                    per_shot.setdefault(shot, []).append(max(r["val"].values()))
        if per_shot:
            rows.append((d.name, len(files), per_shot))
    if not rows:
        return
    shots = sorted({k for _, _, ps in rows for k in ps}, key=lambda k: int(k.split("-")[0]))
    print("\n| variant | seeds | " + " | ".join(f"tuned meta-val {k}" for k in shots) + " |")
    print("|---|---|" + "---|" * len(shots))
    for name, n, ps in rows:
        cells = []
        for k in shots:
            v = ps.get(k, [])
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f}" if v else "—")
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(sys.argv[2:3] or ["SS"]), sys.argv[3:] or None)
    tuned(Path(sys.argv[1]), *(sys.argv[2:3] or ["SS"]), sys.argv[3:] or None)
