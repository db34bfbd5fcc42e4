"""Method comparisons: train each (method, scenario) once, evaluate on shared meta-test tasks.

``apimeta bench`` and ``apimeta demo`` both use this module. A comparison is a list of
:class:`Scenario` (a zoo plus the datasets it is evaluated on) and a list of method variants
(``bidf-mkd``, ``bidf-mkd:no-boundary``, ``bbkd``, ``maml-real``, ``random`` ...). Every run lives
in ``<out>/<scenario>/<variant>/``; a finished run (its ``eval.json`` exists) is reused, so an
interrupted comparison continues where it stopped and several processes can fill one table.
Every initialization is evaluated on the *same* seeded meta-test episodes (``evaluate`` derives
the task list from the seed, split, way, shot and query only).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from apimeta.config import from_dict, merge, parse_overrides, to_dict
from apimeta.errors import ConfigError
from apimeta.io import atomic_write_json
from apimeta.methods import METHODS
from apimeta.methods.base import (
    evaluate_with_config,
    load_meta_model,
    load_run_datasets,
    meta_model_for_datasets,
)
from apimeta.report import fmt_acc, markdown_table
from apimeta.run_config import RunConfig
from apimeta.runs import RunDir

log = logging.getLogger(__name__)

#: config changes of the bidf-mkd ablations and extensions (``apimeta train --no-boundary`` etc.
#: and the ``bidf-mkd:<name>`` rows of ``apimeta bench`` use the same ones)
ABLATIONS: dict[str, dict[str, Any]] = {
    "no-boundary": {"adv": 0.0},
    "no-memory": {"memory": {"enabled": False}},
    # NOT black-box: true gradients through the API's model. The early stop exists to save
    # queries, which cost nothing here, so recovery runs its full recover_iters (an upper bound).
    "white-box": {"zo": {"enabled": False}, "early_stop_prob": None},
    # default-off extensions (not the paper's method): API events until memory holds 10 classes,
    # and only query images the API itself assigns to their target class enter memory
    "diverse-memory": {"memory": {"min_classes": 10, "filter_query": True}},
    # extension: an API event every api_patience updates, bbkd's schedule, instead of on a plateau
    "scheduled": {"event_trigger": "every"},
}
#: method variants (rows of the table): name -> (registered method, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "random": ("random", {}),
    "maml-real": ("maml-real", {}),
    "bbkd": ("bbkd", {}),
    "bidf-mkd": ("bidf-mkd", {}),
    **{f"bidf-mkd:{k}": ("bidf-mkd", v) for k, v in ABLATIONS.items()},
}
#: variants that never query an API (their result does not depend on the zoo)
ZOO_FREE = ("random", "maml-real")


@dataclass(frozen=True)
class Scenario:
    """``name`` (e.g. SS), the ``zoo`` it draws APIs from and the ``dataset``(s) it evaluates."""

    name: str
    zoo: str
    dataset: str

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """``"SS=runs/zoos/emoji-conv4:emoji"`` -> Scenario("SS", "runs/zoos/emoji-conv4", "emoji")."""
        if "=" not in text or ":" not in text.split("=", 1)[1]:
            raise ConfigError(
                f"scenario {text!r} must look like NAME=ZOO:DATASET[,DATASET] "
                "(e.g. SS=runs/zoos/emoji-conv4:emoji)"
            )
        name, rest = text.split("=", 1)
        zoo, dataset = rest.rsplit(":", 1)
        return cls(name.strip(), zoo.strip(), dataset.strip())


def variant(name: str) -> tuple[str, dict[str, Any]]:
    if name not in VARIANTS:
        raise ConfigError(f"unknown method variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


def run_dir_for(out: Path, scenario: Scenario, name: str) -> Path:
    """Zoo-free variants are shared by scenarios that evaluate the same datasets."""
    if name in ZOO_FREE:
        return out / f"{name}-{scenario.dataset.replace(',', '+')}"
    return out / scenario.name / name.replace(":", "-")


def evaluate_init(
    cfg: RunConfig,
    checkpoint: Path | None,
    shots: Sequence[int],
    tasks: int,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Meta-test ``checkpoint`` (None: the seeded random init of ``cfg``) on every dataset of
    ``cfg`` at each shot count: ``{dataset: {"1-shot": {...}, ...}}`` (accuracies in %).
    ``known``: results of this checkpoint on the same ``tasks`` (e.g. the training run's own
    meta-test), reused instead of evaluated again; task lists are seeded per shot, so they match."""
    datasets = load_run_datasets(cfg)
    if checkpoint is None:
        model, _ = meta_model_for_datasets(cfg, datasets)
    else:
        model, _, _ = load_meta_model(checkpoint, device=cfg.device)
    out: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        have = (known or {}).get(ds.name, {})
        todo = tuple(k for k in shots if f"{k}-shot" not in have)
        new = (
            evaluate_with_config(
                model, ds, cfg, split="test", shots=todo, tasks=tasks, progress=progress
            )
            if todo
            else {}
        )
        out[ds.name] = {f"{k}-shot": have.get(f"{k}-shot") or new[f"{k}-shot"] for k in shots}
    return out


def run_one(
    base: dict[str, Any],
    scenario: Scenario,
    name: str,
    out: Path,
    *,
    shots: Sequence[int],
    tasks: int,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (unless reusable) and evaluate one variant in one scenario; returns the eval row."""
    method, overrides = variant(name)
    path = run_dir_for(out, scenario, name)
    done = path / "eval.json"
    data = merge(base, {"method": method, "zoo": scenario.zoo, "dataset": scenario.dataset})
    data = merge(data, overrides)
    data["out"] = str(path)
    cfg = from_dict(RunConfig, data)
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("tasks") == tasks and row.get("shots") == list(shots):
            row["scenario"] = scenario.name  # zoo-free rows are shared by scenarios
            ignore = ("zoo", "scenario") if name in ZOO_FREE else ()
            trained = with_defaults(row.get("config", {}))
            row["config_diff"] = config_diff(trained, to_dict(cfg), ignore=ignore)
            if row["config_diff"]:
                log.warning(
                    "reusing %s, trained with a different config: %s", done, row["config_diff"]
                )
            return row
    t0 = time.perf_counter()
    queries = 0
    ckpt: Path | None = None
    train_metrics: dict[str, Any] = {}
    if method != "random":
        resume = (path / "last.pt").exists()
        if not resume and path.exists():
            # stopped before its first checkpoint: nothing to resume, so start it over
            log.warning("discarding %s: it stopped before its first checkpoint", path)
            shutil.rmtree(path)
        run = RunDir.create(cfg, resume=resume)
        result = METHODS.get(method)().train(cfg, run, progress, resume=resume)
        ckpt = result.best_checkpoint or result.final_checkpoint
        train_metrics = result.metrics
        queries = _queries_used(run)
    # the training run already meta-tested its selected checkpoint at cfg.shot: reuse that
    known = (
        (train_metrics.get("test") or {}).get("best")
        if train_metrics.get("test_tasks") == tasks
        else None
    )
    results = evaluate_init(cfg, ckpt, shots, tasks, progress, known=known)
    row = {
        "scenario": scenario.name,
        "variant": name,
        "method": method,
        "dataset": scenario.dataset,
        "zoo": scenario.zoo if name not in ZOO_FREE else None,
        "checkpoint": str(ckpt) if ckpt else None,
        "best_step": train_metrics.get("best_step"),
        "steps": train_metrics.get("steps", 0),
        "queries": queries,
        "api_events": _api_events(path),
        "train_seconds": train_metrics.get("train_seconds", 0.0),
        "wall_seconds": time.perf_counter() - t0,
        "tasks": tasks,
        "shots": list(shots),
        "results": results,
        "config": to_dict(cfg),
    }
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(done, row)
    return row


def with_defaults(trained: dict[str, Any]) -> dict[str, Any]:
    """A stored run config with the keys it lacks (keys added to RunConfig after it was trained)
    filled with their defaults; new keys default to the old behaviour, so they are no difference."""
    return merge(to_dict(RunConfig()), trained)


def config_diff(
    old: dict[str, Any], new: dict[str, Any], prefix: str = "", ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Keys whose values differ (``{"adv_start": [500, 75]}``), ignoring run-local keys and
    the top-level keys in ``ignore``."""
    out: dict[str, Any] = {}
    for k in sorted(set(old) | set(new)):
        if k in ("out", "threads") or (not prefix and k in ignore):
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_diff(a, b, prefix + k + "."))
        elif a != b:
            out[prefix + k] = [a, b]
    return out


def _queries_used(run: RunDir) -> int:
    used = 0
    for r in run.read_metrics():
        used = max(used, int(r.get("queries", 0) or 0), int(r.get("queries_total", 0) or 0))
    return used


def _api_events(path: Path) -> int:
    metrics = path / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return sum('"phase": "event"' in line for line in metrics.read_text().splitlines())


def mean_over_datasets(results: dict[str, dict[str, Any]], shot: int) -> dict[str, float] | None:
    """One cell: the dataset's result, or (several datasets) the mean with the mean CI."""
    cells = [r.get(f"{shot}-shot") for r in results.values()]
    cells = [c for c in cells if c]
    if not cells:
        return None
    if len(cells) == 1:
        return cells[0]
    n = len(cells)
    # independent per-dataset estimates: CI of the mean = sqrt(sum ci^2) / n
    ci = sum(c["ci95"] ** 2 for c in cells) ** 0.5 / n
    return {"mean": sum(c["mean"] for c in cells) / n, "ci95": ci}


def comparison_table(
    rows: Sequence[dict[str, Any]], scenarios: Sequence[str], shots: Sequence[int]
) -> str:
    """Markdown: rows = variants; columns = scenario x shot, then queries and wall time."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["scenario"], r["variant"]): r for r in rows}
    header = ["method"] + [f"{s} {k}-shot" for s in scenarios for k in shots]
    header += ["queries (M)", "API events", "train time (min)"]
    table = []
    for v in variants:
        line = [v]
        q, ev, t = [], [], []
        for s in scenarios:
            r = by.get((s, v))
            for k in shots:
                line.append(fmt_acc(mean_over_datasets(r["results"], k)) if r else "—")
            if r:
                q.append(f"{r['queries'] / 1e6:.2f}")
                ev.append(str(r["api_events"]))
                t.append(f"{r['train_seconds'] / 60:.1f}")
        line += [" / ".join(q) or "—", " / ".join(ev) or "—", " / ".join(t) or "—"]
        table.append(line)
    notes = [
        f"- {r['scenario']} {r['variant']}: reused run trained with "
        + ", ".join(f"{k}={a!r} (table: {b!r})" for k, (a, b) in r["config_diff"].items())
        for r in rows
        if r.get("config_diff")
    ]
    text = markdown_table(header, table)
    if notes:
        text += "\nConfig differences of reused runs:\n\n" + "\n".join(notes) + "\n"
    return text


def per_dataset_table(rows: Sequence[dict[str, Any]], shots: Sequence[int]) -> str:
    """Markdown: one line per (scenario, variant, dataset) — every dataset with its own CI."""
    lines = []
    for r in rows:
        for ds, res in r["results"].items():
            lines.append(
                [r["scenario"], r["variant"], ds]
                + [fmt_acc(res.get(f"{k}-shot")) for k in shots]
                + [r.get("best_step") if r.get("best_step") is not None else "—"]
            )
    return markdown_table(
        ["scenario", "method", "dataset", *[f"{k}-shot" for k in shots], "selected step"], lines
    )


def machine_line() -> str:
    return (
        f"{platform.node()} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} · {torch.get_num_threads()} thread(s) · "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
    )


def base_config(preset: str | None, sets: Sequence[str]) -> dict[str, Any]:
    """The shared config of a comparison: preset <- --set overrides (as a plain dict)."""
    from apimeta.cli.train import load_preset

    data = to_dict(RunConfig())
    if preset:
        data = merge(data, load_preset(preset))
    if sets:
        data = merge(data, parse_overrides(list(sets)))
    from_dict(RunConfig, data)  # validate early
    return data


__all__ = [
    "VARIANTS",
    "Scenario",
    "base_config",
    "comparison_table",
    "config_diff",
    "evaluate_init",
    "machine_line",
    "mean_over_datasets",
    "per_dataset_table",
    "run_dir_for",
    "run_one",
]
