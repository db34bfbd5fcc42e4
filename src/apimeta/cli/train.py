"""``apimeta train``: meta-train an initialization with a registered method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from apimeta.cli.app import app
from apimeta.cli.common import console, err_console, friendly_errors, set_threads
from apimeta.config import merge
from apimeta.errors import APIUnavailableError, ConfigError, TrainingInterrupted

#: exit status of a run stopped by an unreachable API with a resumable checkpoint (EX_TEMPFAIL)
EXIT_RESUMABLE = 75


def _methods_help() -> str:
    from apimeta.methods import METHODS

    return (
        "Method to train: "
        + ", ".join(METHODS.names())
        + ", or a variant METHOD:NAME of `apimeta bench` (e.g. bbkd:colour-leaves-ink-lr5, the cpu "
        "preset's). Default: the config's `method`."
    )


def result_table(metrics: dict[str, Any], title: str) -> Table:
    """Rows: checkpoint (best/final) x dataset x shot; mean ± 95% CI, and the protocol meta-val
    chose when the run tunes it (``eval.tune``)."""
    from apimeta.evaluate import setting_label

    rows = [
        (which, ds, shot, r)
        for which, per_ds in metrics.get("test", {}).items()
        for ds, res in per_ds.items()
        for shot, r in res.items()
    ]
    tuned = any("setting" in r for *_, r in rows)
    cols = ["checkpoint", "dataset", "shots", "accuracy %", "± 95% CI", "tasks"]
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col in cols + (["chosen on meta-val"] if tuned else []):
        table.add_column(col, justify="right" if col in ("accuracy %", "± 95% CI") else "left")
    for which, ds, shot, r in rows:
        cells = [which, ds, shot, f"{r['mean']:.2f}", f"{r['ci95']:.2f}", str(r["n"])]
        table.add_row(*cells, *([setting_label(r.get("setting", {}))] if tuned else []))
    return table


class TrainProgress:
    """Rich progress for the training loop (train / val / test phases)."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, done: int, total: int, info: dict[str, Any]) -> None:
        phase = info.get("phase", "train")
        if phase == "train":
            desc = f"train  loss {info.get('loss', float('nan')):.3f}"
            if "train_acc" in info:
                desc += f"  acc {info['train_acc']:.1f}%"
            if info.get("queries"):
                desc += (
                    f"  queries {info['queries'] / 1e6:.2f}M ({info.get('api_events', 0)} events)"
                )
        else:
            desc = f"{phase} {info.get('dataset', '')} {info.get('shot', '')}-shot"
        key = phase if phase == "train" else f"{phase}:{info.get('dataset')}:{info.get('shot')}"
        if key not in self.tasks:
            if phase != "train":  # a new eval pass replaces the previous one
                for k in [k for k in self.tasks if k != "train"]:
                    self.p.remove_task(self.tasks.pop(k))
            self.tasks[key] = self.p.add_task(desc, total=total)
        self.p.update(self.tasks[key], completed=done, total=total, description=desc)
        if phase != "train" and done >= total:
            self.p.remove_task(self.tasks.pop(key))


@app.command("train")
def train(
    method: str | None = typer.Option(
        None, "--method", "-m", help=_methods_help(), show_default=False
    ),
    preset: str | None = typer.Option(
        None, "--preset", "-p", help="Preset config from apimeta/presets (e.g. cpu, paper)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config file."),
    sets: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key: --set zo.q=20 (repeatable)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default runs/<method>-<UTC timestamp>)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last.pt (exact resume)."
    ),
    dataset: str | None = typer.Option(
        None, "--dataset", "-d", help="Dataset(s), comma-separated for API-MH."
    ),
    data_root: str | None = typer.Option(None, "--data-root", help="Root of local datasets."),
    data_option: list[str] = typer.Option(
        [],
        "--data-option",
        help="Dataset loader option KEY=VALUE (repeatable), e.g. channels=1 or eval_only=true "
        "for folder data.",
    ),
    zoo: str | None = typer.Option(None, "--zoo", help="API zoo dir, ONNX dir or http(s) URL."),
    episodes: int | None = typer.Option(None, "--episodes", help="Training episodes."),
    shot: int | None = typer.Option(None, "--shot", help="K shots per class."),
    seed: int | None = typer.Option(None, "--seed", help="Master seed."),
    query_budget: int | None = typer.Option(
        None, "--query-budget", help="Hard API query budget (images)."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps ..."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    no_boundary: bool = typer.Option(
        False,
        "--no-boundary",
        help="Ablation: recover query sets without the boundary term (kd.adv=0).",
    ),
    no_memory: bool = typer.Option(
        False,
        "--no-memory",
        help="Ablation: no task-memory replay (every episode is an API episode until the budget ends).",
    ),
    white_box: bool = typer.Option(
        False,
        "--white-box",
        help="Upper bound, NOT black-box: recover with true gradients through local APIs, "
        "without the early stop (it only saves queries).",
    ),
) -> None:
    """Meta-train an initialization with a registered method.

    Writes config.yaml, metrics.jsonl, last.pt, best.pt and test.json into the run directory
    and prints the meta-test table.
    """
    with friendly_errors():
        from apimeta.bench import variants
        from apimeta.config import parse_overrides
        from apimeta.methods import METHODS
        from apimeta.run_config import ABLATIONS, resolve_named
        from apimeta.runner import interrupts, start_run

        if resume and out is None:
            raise ConfigError("--resume needs --out DIR (the run directory to continue)")
        if resume and (preset or config):
            raise ConfigError("--resume reads the run's config.yaml; drop --preset/--config")
        direct = {
            "method": method,
            "dataset": dataset,
            "data_root": data_root,
            "data_options": parse_overrides(data_option) if data_option else None,
            "zoo": zoo,
            "episodes": episodes,
            "shot": shot,
            "seed": seed,
            "query_budget": query_budget,
            "device": device,
            "threads": threads,
            "out": str(out) if out is not None else None,
        }
        ablations: dict[str, Any] = {}
        flags = ((no_boundary, "no-boundary"), (no_memory, "no-memory"), (white_box, "white-box"))
        for flag, name in flags:
            if flag:
                ablations = merge(ablations, ABLATIONS[name])
        named, cfg = resolve_named(  # named: e.g. bbkd:contrastive-leaves; cfg: method bbkd
            preset=preset,
            config=config,
            direct=direct,
            ablations=ablations,
            sets=sets,
            resume_from=out if resume else None,
            variants=variants(),
        )
        for flag, name in flags:
            if flag and name not in METHODS.get(cfg.method).ablations:
                raise ConfigError(
                    f"--{name} is an ablation of bidf-mkd, not of {named}; add --method bidf-mkd"
                )
        if not resume and dataset is None and not any(x.startswith("dataset=") for x in sets):
            cfg = _dataset_of_zoo(cfg)
        set_threads(cfg.threads)
        method, run = start_run(cfg, resume=resume)
        console.print(
            f"[bold]{named}[/] on [bold]{cfg.dataset}[/] "
            f"({cfg.way}-way {cfg.shot}-shot, {cfg.episodes} episodes) -> [cyan]{run.path}[/]"
            + (" [yellow](resumed)[/]" if resume else "")
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        try:
            with interrupts() as fired, Progress(*columns, console=console, transient=True) as p:
                result = method.train(cfg, run, TrainProgress(p), resume=resume)
        except APIUnavailableError as e:  # checkpointed: tell how to resume, exit 75
            err_console.print(f"[bold red]error:[/] {escape(str(e))}")
            raise typer.Exit(EXIT_RESUMABLE) from None
        except TrainingInterrupted as e:  # checkpointed: 130 (SIGINT) or 143 (SIGTERM)
            err_console.print(f"[bold yellow]{escape(str(e))}[/]")
            raise typer.Exit(128 + fired["signal"]) from None
        except KeyboardInterrupt:  # before the first meta-update began: nothing trained yet
            err_console.print(
                f"[bold yellow]interrupted before training started; nothing to resume in "
                f"{run.path} (start it again)[/]"
            )
            raise typer.Exit(128 + fired["signal"]) from None
        m = result.metrics
        console.print(
            result_table(
                m,
                f"{cfg.method}: meta-test, {m.get('test_tasks')} tasks "
                f"(best = step {m.get('best_step')} on {m.get('select_split')})",
            )
        )
        console.print(f"run directory: [cyan]{run.path}[/]")


def _dataset_of_zoo(cfg: Any) -> Any:
    """With no --dataset: the datasets of a local zoo or description (not the preset's), read
    before anything is loaded (only apimeta datasets: an own label set cannot be evaluated)."""
    import dataclasses

    from apimeta.apis.sources import declared_datasets
    from apimeta.data import DATASETS

    if not cfg.zoo:
        return cfg
    names = [d for d in declared_datasets(cfg.zoo) if d in DATASETS]
    if names and set(names) != set(cfg.dataset_names):
        console.print(
            f"the zoo's APIs were trained on {','.join(names)}: training and evaluating on it "
            f"(not {cfg.dataset}); pass --dataset to choose"
        )
        cfg = dataclasses.replace(cfg, dataset=",".join(names))
    return cfg


__all__ = ["EXIT_RESUMABLE", "TrainProgress", "result_table"]
