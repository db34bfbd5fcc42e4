"""Method comparisons: train each (method, scenario) once, evaluate on shared meta-test tasks.

``apimeta bench`` and ``apimeta demo`` both use this module. A comparison is a list of
:class:`ZooScenario` (a zoo plus the datasets it is evaluated on) and a list of method variants:
every registered method (``METHODS``) and ``method:ablation`` for each ablation the method
declares (``bidf-mkd:no-boundary`` ...; the config changes are :data:`ABLATIONS`). Every run lives
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

import numpy as np
import torch

from apimeta.candidates import FOLDER
from apimeta.config import from_dict, merge, to_dict
from apimeta.errors import ConfigError
from apimeta.evaluate import meta_test, setting_label, tune_protocol
from apimeta.io import atomic_write_json
from apimeta.methods import METHODS
from apimeta.methods.trainer import check_run_config
from apimeta.models.meta import load_init, load_run_datasets
from apimeta.parallel import Backend, run_jobs
from apimeta.report import fmt_acc, markdown_table
from apimeta.run_config import (
    ABLATIONS,
    SECTIONS,
    RunConfig,
    apply_sets,
    base_config,
    migrate_legacy,
)
from apimeta.runner import start_run
from apimeta.runs import RunDir
from apimeta.stats import paired_bootstrap

log = logging.getLogger(__name__)


def variants() -> dict[str, tuple[str, dict[str, Any]]]:
    """Rows a comparison can have: name -> (registered method, config overrides)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in METHODS.names():
        out[name] = (name, {})
        for ab in METHODS.get(name).ablations:
            out[f"{name}:{ab}"] = (name, ABLATIONS[ab])
    return out


#: the rows of a comparison (see :func:`variants`)
VARIANTS = variants()


def zoo_free(name: str) -> bool:
    """Whether a variant's result does not depend on the zoo (it neither queries nor reads it)."""
    method = METHODS.get(variant(name)[0])
    return not (method.queries_apis or method.uses_zoo)


@dataclass(frozen=True)
class ZooScenario:
    """A column group of a comparison: ``name`` (e.g. SS), the ``zoo`` it draws APIs from and the
    ``dataset``(s) it evaluates on."""

    name: str
    zoo: str
    dataset: str

    @classmethod
    def parse(cls, text: str) -> ZooScenario:
        """``"SS=runs/zoos/emoji-conv4:emoji"`` -> ZooScenario("SS", ...)."""
        if "=" not in text or ":" not in text.split("=", 1)[1]:
            raise ConfigError(
                f"scenario {text!r} must look like NAME=ZOO:DATASET[,DATASET] "
                "(e.g. SS=runs/zoos/emoji-conv4:emoji)"
            )
        name, rest = text.split("=", 1)
        zoo, dataset = rest.rsplit(":", 1)
        return cls(name.strip(), zoo.strip(), dataset.strip())


def variant(name: str) -> tuple[str, dict[str, Any]]:
    """(method, overrides) of a row name; registered methods and ablations are looked up now,
    so a method registered after import (a plugin, a test) is a row too."""
    table = variants()
    if name not in table:
        raise ConfigError(f"unknown method variant {name!r}; choose from {', '.join(table)}")
    return table[name]


def run_dir_for(out: Path, scenario: ZooScenario, name: str) -> Path:
    """Zoo-free variants are shared by scenarios that evaluate the same datasets."""
    if zoo_free(name):
        return out / f"{name}-{scenario.dataset.replace(',', '+')}"
    return out / scenario.name / name.replace(":", "-")


def cell_dir(out: Path, scenario: ZooScenario, name: str, seed: int | None = None) -> Path:
    """The run directory of one cell: :func:`run_dir_for`, then ``seed-N`` for a seed."""
    path = run_dir_for(out, scenario, name)
    return path / f"seed-{seed}" if seed is not None else path


def check_cell_layout(out: Path, scenario: ZooScenario, name: str, seed: int | None) -> None:
    """ConfigError (one line) if ``--seeds`` does not match the layout of the row's runs already
    in ``out``: a one-seed bench (``seed`` None: the run in the row's directory itself) over a
    directory holding ``seed-N`` runs would write beside them, and a restart would discard them."""
    path = run_dir_for(out, scenario, name)
    if seed is None and path.is_dir():
        held = sorted(p.name for p in path.glob("seed-*") if p.is_dir())
        if held:
            raise ConfigError(
                f"{path} holds the runs of {len(held)} training seeds ({', '.join(held)}) of a "
                f"bench with --seeds {len(held)}; rerun with that --seeds (finished seeds are "
                "reused) or give another --out"
            )


def _partial_run(path: Path) -> bool:
    """Whether ``path`` is a run that stopped before its first checkpoint: no checkpoint,
    results or other run below it, so nothing is lost by starting it over."""
    return not (
        any(path.rglob("*.pt"))
        or any(path.rglob("eval.json"))
        or any(p.is_dir() and p.name.startswith("seed-") for p in path.iterdir())
    )


def evaluate_init(
    cfg: RunConfig,
    checkpoint: Path | None,
    shots: Sequence[int],
    tasks: int,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Meta-test ``checkpoint`` (None: the seeded random init of ``cfg``) on every dataset of
    ``cfg`` at each shot count with the run's protocol (:func:`~apimeta.evaluate.meta_test`): ``{dataset: {"1-shot": {...}, ...}}`` (accuracies in %).
    ``known``: results of this checkpoint on the same ``tasks`` (e.g. the training run's own
    meta-test), reused instead of evaluated again; task lists are seeded per shot, so they match."""
    datasets = load_run_datasets(cfg)
    model = load_init(checkpoint, cfg, datasets)
    out: dict[str, dict[str, Any]] = {}
    for ds in datasets:
        have = {
            k: r for k, r in (known or {}).get(ds.name, {}).items() if r and "accs" in r
        }  # reused only with its per-task accuracies (paired comparisons need them)
        todo = tuple(k for k in shots if f"{k}-shot" not in have)
        new = meta_test(model, ds, cfg, shots=todo, tasks=tasks, progress=progress) if todo else {}
        out[ds.name] = {f"{k}-shot": have.get(f"{k}-shot") or new[f"{k}-shot"] for k in shots}
    return out


def tune_init(
    cfg: RunConfig,
    checkpoint: Path | None,
    grid: dict[str, list[Any]],
    shots: Sequence[int],
    tasks: int,
    cache: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`~apimeta.evaluate.tune_protocol` on every dataset of ``cfg`` for ``checkpoint``
    (None: the seeded random init): ``{dataset: {"1-shot": {..., "setting", "val"}}}``.
    ``cache``: a JSON file holding an earlier answer for the same grid, shots, task counts,
    base protocol and checkpoint file (path, size and mtime: a retrained run is tuned again),
    reused (else written, atomically)."""
    key = {
        "grid": grid,
        "shots": list(shots),
        "tasks": tasks,
        "val_tasks": cfg.eval.tasks,
        "protocol": _protocol_key(cfg),
        "checkpoint": _file_key(checkpoint),
    }
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        if {k: stored.get(k) for k in key} == key:
            return stored["results"]
    datasets = load_run_datasets(cfg)
    model = load_init(checkpoint, cfg, datasets)
    results = {
        ds.name: tune_protocol(model, ds, cfg, grid, shots=shots, tasks=tasks) for ds in datasets
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, {**key, "results": results})
    return results


def _protocol_key(cfg: RunConfig) -> dict[str, Any]:
    """What the meta-val/meta-test protocol of ``cfg`` depends on, besides the grid."""
    e = cfg.eval
    return {"way": cfg.way, "query": cfg.query, "inner_lr": cfg.inner_lr, "head": e.head,
            "test_steps": e.test_steps, "test_lr": e.test_lr, "transductive": e.transductive,
            "seed": cfg.seed, **({"reinit": e.reinit} if e.reinit else {})}  # fmt: skip


def _file_key(path: Path | None) -> list[Any] | None:
    if path is None:
        return None
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def row_config(
    base: dict[str, Any],
    scenario: ZooScenario,
    name: str,
    path: Path,
    *,
    shots: Sequence[int],
    tasks: int,
    seed: int | None = None,
    sets: Sequence[str] = (),
) -> RunConfig:
    """The config of one cell: ``base`` (defaults <- preset) <- the variant's changes <-
    ``sets`` (``--set`` items: they win over a variant's own length or budget) <- the scenario's
    zoo and datasets, the row's method, ``seed`` and the bench's meta-test tasks and shots."""
    method, overrides = variant(name)
    data = apply_sets(merge(base, overrides), sets)
    data = merge(data, {"method": method, "zoo": scenario.zoo, "dataset": scenario.dataset})
    # the training run's own final meta-test is the bench's (same tasks and shots): reused
    data = merge(data, {"eval": {"test_tasks": tasks, "test_shots": list(shots)}})
    if seed is not None:
        data["seed"] = seed
    data["out"] = str(path)
    return from_dict(RunConfig, data)


def reuse_diff(trained: dict[str, Any], cfg: RunConfig, name: str) -> dict[str, Any]:
    """The keys in which the stored config ``trained`` of a finished run differs from the row's
    ``cfg`` (:func:`config_diff`), leaving out what the row's method never reads: the zoo of a
    zoo-free row, the sections its method does not read, and ``recovery.folder`` unless the
    row's candidates come from a folder."""
    ignore = ("zoo", "scenario") if zoo_free(name) else ()
    unread = tuple(s for s in SECTIONS if s not in METHODS.get(variant(name)[0]).reads)
    diff = config_diff(with_defaults(trained), to_dict(cfg), ignore=ignore + unread)
    if cfg.recovery.source != FOLDER:
        diff.pop("recovery.folder", None)
    return diff


def run_one(
    base: dict[str, Any],
    scenario: ZooScenario,
    name: str,
    out: Path,
    *,
    shots: Sequence[int],
    tasks: int,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    seed: int | None = None,
    tune: dict[str, list[Any]] | None = None,
    sets: Sequence[str] = (),
) -> dict[str, Any]:
    """Train (unless reusable) and evaluate one variant in one scenario; returns the eval row
    (per-task accuracies included); its config is :func:`row_config`. ``seed``: this training
    seed, in ``<run dir>/seed-N`` (None: the config's seed, in the run dir itself). ``tune``: a
    protocol grid
    (:func:`~apimeta.evaluate.parse_grid`); the row then also holds ``"tuned"``, its results
    with the fine-tuning protocol chosen on meta-val (:func:`tune_init`, cached in
    ``tuned.json``)."""
    method = variant(name)[0]
    check_cell_layout(out, scenario, name, seed)
    path = cell_dir(out, scenario, name, seed)
    done = path / "eval.json"
    cfg = row_config(base, scenario, name, path, shots=shots, tasks=tasks, seed=seed, sets=sets)
    if done.exists():
        row = json.loads(done.read_text())
        accs = all("accs" in r for res in row.get("results", {}).values() for r in res.values())
        if row.get("tasks") == tasks and row.get("shots") == list(shots) and accs:
            row["scenario"] = scenario.name  # zoo-free rows are shared by scenarios
            row["variant"] = name  # the directory's row, even if a run was copied in from another
            row["config_diff"] = reuse_diff(row.get("config", {}), cfg, name)
            if row["config_diff"]:
                log.warning(
                    "reusing %s, trained with a different config: %s", done, row["config_diff"]
                )
            return _with_tuned(row, path, shots, tasks, tune)
    t0 = time.perf_counter()
    queries = 0
    ckpt: Path | None = None
    train_metrics: dict[str, Any] = {}
    if method != "random":
        resume = (path / "last.pt").exists()
        if not resume and path.exists():
            if not _partial_run(path):  # never delete finished work
                raise ConfigError(
                    f"{path} holds runs or results but no last.pt to resume; move it away or "
                    "give another --out"
                )
            # stopped before its first checkpoint: nothing to resume, so start it over
            log.warning("discarding %s: it stopped before its first checkpoint", path)
            shutil.rmtree(path)
        impl, run = start_run(cfg, resume=resume)
        result = impl.train(cfg, run, progress, resume=resume)
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
        "zoo": scenario.zoo if not zoo_free(name) else None,
        "checkpoint": str(ckpt) if ckpt else None,
        "best_step": train_metrics.get("best_step"),
        "steps": train_metrics.get("steps", 0),
        "queries": queries,
        "api_events": _api_events(path),
        "train_seconds": train_metrics.get("train_seconds", 0.0),
        "wall_seconds": time.perf_counter() - t0,
        "seed": cfg.seed,
        "tasks": tasks,
        "shots": list(shots),
        "results": results,
        "config": to_dict(cfg),
    }
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(done, row)
    return _with_tuned(row, path, shots, tasks, tune)


def _with_tuned(
    row: dict[str, Any],
    path: Path,
    shots: Sequence[int],
    tasks: int,
    tune: dict[str, list[Any]] | None,
) -> dict[str, Any]:
    """``row`` with ``"tuned"`` (:func:`tune_init`, cached in ``path/tuned.json``) when a grid
    is given; ``eval.json`` never holds it."""
    if tune:
        cfg, ckpt = row_init(row)
        row["tuned"] = tune_init(cfg, ckpt, tune, shots, tasks, cache=path / "tuned.json")
    return row


@dataclass(frozen=True)
class Cell:
    """One run of a comparison: a variant in a scenario with one training seed (None: the
    config's seed)."""

    scenario: ZooScenario
    name: str
    seed: int | None = None


def _cell_job(shared: dict[str, Any], cell: Cell) -> None:
    """A parallel job: train and evaluate one cell (its row is read back from disk)."""
    run_one(shared["base"], cell.scenario, cell.name, Path(shared["out"]),
            shots=shared["shots"], tasks=shared["tasks"], seed=cell.seed,
            tune=shared.get("tune"), sets=shared.get("sets", ()))  # fmt: skip


def run_cells(
    base: dict[str, Any],
    cells: Sequence[Cell],
    out: Path,
    *,
    shots: Sequence[int],
    tasks: int,
    backend: Backend | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
    on_done: Callable[[Cell], None] | None = None,
    tune: dict[str, list[Any]] | None = None,
    sets: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The eval rows of ``cells``, in order (each row's config: :func:`row_config`). A parallel
    ``backend`` (:mod:`apimeta.parallel`: worker processes or Ray, one torch thread per job)
    runs each run directory once (zoo-free rows shared by scenarios train once); the rows are
    then read back in order. Finished runs are reused and interrupted ones resume, so a killed
    bench continues where it stopped. The numbers do not depend on the backend (every run is
    seeded by its config alone). On Ray every node must see ``out`` and the zoos at the same
    paths (a shared filesystem)."""
    for c in cells:  # a row that cannot start is refused before any row trains
        path = cell_dir(out, c.scenario, c.name, c.seed)
        check_run_config(
            row_config(base, c.scenario, c.name, path, shots=shots, tasks=tasks, seed=c.seed,
                       sets=sets)
        )  # fmt: skip
    backend = backend or Backend()
    if backend.parallel and len(cells) > 1:
        unique: dict[Path, Cell] = {}
        for c in cells:
            unique.setdefault(cell_dir(out, c.scenario, c.name, c.seed), c)
        jobs = [(c,) for c in unique.values()]
        shared = {"base": base, "out": str(out), "shots": list(shots), "tasks": tasks,
                  "tune": tune, "sets": list(sets)}  # fmt: skip
        for k, _ in run_jobs(_cell_job, jobs, backend, shared=shared):
            if on_done is not None:
                on_done(jobs[k][0])
    rows = []
    for c in cells:  # sequential, or reading back what the workers finished
        rows.append(
            run_one(base, c.scenario, c.name, out, shots=shots, tasks=tasks,
                    progress=progress, seed=c.seed, tune=tune, sets=sets)
        )  # fmt: skip
        if on_done is not None and not backend.parallel:
            on_done(c)
    return rows


def with_defaults(trained: dict[str, Any]) -> dict[str, Any]:
    """A stored run config with the keys it lacks (keys added to RunConfig after it was trained)
    filled with their defaults; new keys default to the old behaviour, so they are no difference."""
    return merge(to_dict(RunConfig()), migrate_legacy(trained, quiet=True))


def row_init(row: dict[str, Any]) -> tuple[RunConfig, Path | None]:
    """A finished row's (``eval.json``) run config, defaults filled in, and its evaluated
    checkpoint (None: the seeded random init)."""
    cfg = from_dict(RunConfig, with_defaults(row["config"]))
    return cfg, Path(row["checkpoint"]) if row.get("checkpoint") else None


def config_diff(
    old: dict[str, Any], new: dict[str, Any], prefix: str = "", ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Keys whose values differ (``{"adv_start": [500, 75]}``), ignoring run-local keys and
    the top-level keys in ``ignore``."""
    out: dict[str, Any] = {}
    for k in sorted(set(old) | set(new)):
        if k in ("out", "threads", "device") or (not prefix and k in ignore):
            continue
        if prefix == "eval." and k in ("test_tasks", "test_shots"):  # the bench's own choice
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_diff(a, b, prefix + k + "."))
        elif a != b:
            out[prefix + k] = [a, b]
    return out


def _plain(v: Any) -> Any:
    """500.0 -> 500 (schedule values are floats so that fractions fit)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _count(v: float) -> str:
    """15 -> "15"; a mean over seeds 1.3333 -> "1.33"."""
    return f"{v:.2f}".rstrip("0").rstrip(".")


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


def gap_share(method: float, random: float, oracle: float) -> float:
    """(method - random) / (oracle - random): the share of what the zoo's own data teaches
    (``maml-zoo`` over random init) that a method recovers; NaN when the oracle is no better."""
    span = oracle - random
    return (method - random) / span if span > 0 else float("nan")


def gap_share_table(
    rows: Sequence[dict[str, Any]],
    scenarios: Sequence[str],
    shots: Sequence[int],
    oracle: str = "maml-zoo",
) -> str:
    """Markdown: the gap share of every other row per scenario x shot, when the rows hold both
    ``random`` and the ``oracle`` row (``maml-zoo``, or a variant of it such as
    ``maml-zoo:lr3``; else "")."""
    by = {(r["scenario"], r["variant"]): r for r in rows}

    def acc(s: str, v: str, k: int) -> float | None:
        r = by.get((s, v))
        cell = mean_over_datasets(r["results"], k) if r else None
        return cell["mean"] if cell else None

    cols = [(s, k) for s in scenarios for k in shots]
    if not any(acc(s, "random", k) is not None and acc(s, oracle, k) is not None
               for s, k in cols):  # fmt: skip
        return ""
    lines = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        if v in ("random", oracle):
            continue
        line = [v]
        for s, k in cols:
            a, lo, hi = acc(s, v, k), acc(s, "random", k), acc(s, oracle, k)
            line.append(
                "—" if None in (a, lo, hi) else f"{100 * gap_share(a, lo, hi):.0f}%"  # type: ignore[arg-type]
            )
        lines.append(line)
    header = ["gap share"] + [f"{s} {k}-shot" for s, k in cols]
    return (
        f"Gap share = (method - random) / ({oracle} - random): how much of what the zoo's own "
        "data teaches a method gets out of the APIs.\n\n" + markdown_table(header, lines)
    )


def seed_groups(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (scenario, variant), one row per training seed, in seed order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["scenario"], r["variant"]), []).append(r)
    for group in out.values():
        group.sort(key=lambda r: r.get("seed") or 0)
    return out


def seed_mean_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, variant): per cell the mean over seeds of the seed means, with
    ``ci95`` holding the standard deviation over seeds (0 with one seed); queries, events and
    time averaged."""
    out = []
    for (_, _), group in seed_groups(rows).items():
        first = dict(group[0])
        results: dict[str, dict[str, Any]] = {}
        for ds, per_shot in first["results"].items():
            results[ds] = {}
            for key in per_shot:
                means = np.array([g["results"][ds][key]["mean"] for g in group])
                sd = float(means.std(ddof=1)) if len(means) > 1 else 0.0
                results[ds][key] = {"mean": float(means.mean()), "ci95": sd, "n": len(means)}
        first["results"] = results
        for k in ("queries", "api_events", "train_seconds"):
            first[k] = sum(g.get(k, 0) or 0 for g in group) / len(group)
        first["seeds"] = [g.get("seed") for g in group]
        out.append(first)
    return out


def task_matrix(group: Sequence[dict[str, Any]], shot: int) -> np.ndarray:
    """(seeds, tasks) per-task accuracies of one row at ``shot`` (datasets concatenated)."""
    return np.array(
        [
            np.concatenate(
                [g["results"][ds][f"{shot}-shot"]["accs"] for ds in sorted(g["results"])]
            )
            for g in group
        ]
    )


def paired_table(
    rows: Sequence[dict[str, Any]],
    scenarios: Sequence[str],
    shots: Sequence[int],
    refs: Sequence[str] = ("random", "bbkd"),
) -> str:
    """Markdown: every row minus each reference row, per scenario x shot, as ``mean [lo, hi]``
    (:func:`~apimeta.stats.paired_bootstrap` over seeds and the shared tasks); **better** /
    *worse* only where the 95% interval excludes 0. "" without a reference row."""
    groups = seed_groups(rows)
    lines = []
    for ref in refs:
        for v in dict.fromkeys(r["variant"] for r in rows):
            if v == ref:
                continue
            line, any_cell = [f"{v} − {ref}"], False
            for s in scenarios:
                for k in shots:
                    a, b = groups.get((s, v)), groups.get((s, ref))
                    if not a or not b:
                        line.append("—")
                        continue
                    d = paired_bootstrap(task_matrix(a, k), task_matrix(b, k))
                    mark = " **better**" if d.better else (" *worse*" if d.worse else "")
                    line.append(f"{d}{mark}")
                    any_cell = True
            if any_cell:
                lines.append(line)
    if not lines:
        return ""
    header = ["difference"] + [f"{s} {k}-shot" for s in scenarios for k in shots]
    return (
        "Paired differences (points; 95% bootstrap interval over training seeds and the shared "
        "meta-test tasks):\n\n" + markdown_table(header, lines)
    )


def comparison_table(
    rows: Sequence[dict[str, Any]],
    scenarios: Sequence[str],
    shots: Sequence[int],
    oracle: str = "maml-zoo",
) -> str:
    """Markdown: rows = variants; columns = scenario x shot, then queries and wall time; then
    the gap shares against the ``oracle`` row (:func:`gap_share_table`)."""
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
                ev.append(_count(r["api_events"]))
                t.append(f"{r['train_seconds'] / 60:.1f}")
        line += [" / ".join(q) or "—", " / ".join(ev) or "—", " / ".join(t) or "—"]
        table.append(line)
    notes = [
        f"- {r['scenario']} {r['variant']}: reused run trained with "
        + ", ".join(
            f"{k}={_plain(a)!r} (table: {_plain(b)!r})" for k, (a, b) in r["config_diff"].items()
        )
        for r in rows
        if r.get("config_diff")
    ]
    text = markdown_table(header, table)
    share = gap_share_table(rows, scenarios, shots, oracle)
    if share:
        text += "\n" + share
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


def tuned_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with their meta-val-tuned results in place of the run-config protocol's (rows
    without ``"tuned"`` are left out), for the same tables."""
    return [{**r, "results": r["tuned"]} for r in rows if r.get("tuned")]


def protocol_table(rows: Sequence[dict[str, Any]], shots: Sequence[int]) -> str:
    """Markdown: the protocol meta-val chose per (scenario, variant, dataset) and shot, one entry
    per training seed, with its meta-val accuracy."""
    lines = []
    for r in rows:
        for ds, res in (r.get("tuned") or {}).items():
            cells = []
            for k in shots:
                c = res.get(f"{k}-shot")
                if not c:
                    cells.append("—")
                    continue
                label = setting_label(c["setting"])
                cells.append(f"{label} ({c['val'][label]:.1f})")
            lines.append([r["scenario"], r["variant"], ds, r.get("seed") or "—", *cells])
    return markdown_table(
        [
            "scenario",
            "method",
            "dataset",
            "seed",
            *[f"{k}-shot: chosen (meta-val %)" for k in shots],
        ],
        lines,
    )


def machine_line() -> str:
    return (
        f"{platform.node()} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} · {torch.get_num_threads()} thread(s) · "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
    )


__all__ = [
    "VARIANTS",
    "Cell",
    "ZooScenario",
    "base_config",
    "cell_dir",
    "check_cell_layout",
    "comparison_table",
    "config_diff",
    "evaluate_init",
    "gap_share",
    "gap_share_table",
    "machine_line",
    "mean_over_datasets",
    "paired_table",
    "per_dataset_table",
    "protocol_table",
    "reuse_diff",
    "row_config",
    "row_init",
    "run_cells",
    "run_dir_for",
    "run_one",
    "seed_groups",
    "seed_mean_rows",
    "task_matrix",
    "tune_init",
    "tuned_rows",
    "variant",
    "variants",
    "zoo_free",
]
