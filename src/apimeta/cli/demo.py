"""``apimeta demo``: the main job on the built-in offline data, end to end.

Renders ``emoji`` (cached), builds a 20-API Conv4 zoo (cached under ``$APIMETA_HOME/zoos``),
trains the ``cpu`` preset's method (``bbkd:colour-leaves-ink-lr5``; with ``--paper`` also the
paper's BiDf-MKD), evaluates it and random init on the same meta-test tasks with one
fine-tuning protocol, and writes a run directory with the resolved configs, metrics (JSONL),
checkpoints, image grids per API event, a learning curve and ``report.md``.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from apimeta.cli.app import app
from apimeta.cli.common import console, friendly_errors, set_threads
from apimeta.cli.train import TrainProgress

COLUMNS = (
    TextColumn("{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
    TimeRemainingColumn(),
)


#: the demo's length and budget per trained row (the preset's method is ``default``); direct
#: --episodes / --query-budget replace them for every row
DEMO_ROWS: dict[str, dict[str, int]] = {
    "default": {"episodes": 1600},
    "bidf-mkd": {"episodes": 800, "query_budget": 1_000_000},
}


def protocol_text(e: dict[str, Any], inner_lr: float) -> str:
    """A run config's ``eval`` section in words: ``"10 steps at lr 0.1, the init's own head"``;
    ``eval.tune`` keys are named as chosen per shot on meta-val."""
    tune = e.get("tune") or {}
    lr = "lr " + (
        "/".join(map(str, tune["lr"])) if "lr" in tune else str(e.get("test_lr") or inner_lr)
    )
    steps = "/".join(map(str, tune["steps"])) if "steps" in tune else str(e["test_steps"])
    head = (
        "the head (" + " or ".join(tune["head"]) + ")"
        if "head" in tune
        else ("the init's own head" if e["head"] == "learned" else f"a {e['head']} head")
    )
    text = f"{steps} steps at {lr}, {head}"
    if "reinit" in tune:
        text += ", the top " + "/".join(map(str, tune["reinit"])) + " feature stages re-drawn"
    elif e.get("reinit"):
        text += f", the top {e['reinit']} feature stages re-drawn"
    if tune:
        text += " (" + ", ".join(tune) + " chosen per shot on meta-val)"
    return text


@app.command("demo")
def demo_cmd(
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Run directory (default runs/demo-<UTC timestamp>)."
    ),
    dataset: str = typer.Option("emoji", "--dataset", "-d", help="Built-in dataset to use."),
    n_apis: int = typer.Option(20, "--n-apis", help="APIs in the Conv4 zoo."),
    episodes: int | None = typer.Option(
        None,
        "--episodes",
        help="Training episodes of every trained row (4 per meta-update). Default: the preset's "
        f"method {DEMO_ROWS['default']['episodes']}, bidf-mkd {DEMO_ROWS['bidf-mkd']['episodes']}"
        " (shorter than the cpu preset's runs, to finish in minutes).",
        show_default=False,
    ),
    query_budget: int | None = typer.Option(
        None,
        "--query-budget",
        help="Hard budget of images sent to the APIs, per trained row. Default: the row's own "
        "(the preset's method: 50,000; bidf-mkd: 1,000,000).",
        show_default=False,
    ),
    tasks: int = typer.Option(300, "--tasks", help="Meta-test tasks per shot (paper: 600)."),
    sets: list[str] = typer.Option(
        [], "--set", "-s", help="Override any config key, e.g. --set zo.q=20."
    ),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    paper: bool = typer.Option(
        False, "--paper", help="Also train the paper's BiDf-MKD (200 updates) as a third row."
    ),
) -> None:
    """Run the main job on the built-in data: emoji + 20 Conv4 APIs -> the cpu preset's method
    (and with --paper BiDf-MKD) vs random init, on the same meta-test tasks."""
    with friendly_errors():
        from apimeta.apis.zoo import build_zoo
        from apimeta.bench import ZooScenario, base_config, run_one
        from apimeta.config import apimeta_home, merge
        from apimeta.data import load_dataset
        from apimeta.report import (
            fmt_acc,
            markdown_table,
            plot_learning_curve,
            read_jsonl,
            write_report,
        )
        from apimeta.run_config import split_variant

        t_start = time.perf_counter()
        set_threads(threads)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = out or Path("runs") / f"demo-{stamp}"
        console.print(f"[bold]apimeta demo[/] -> [cyan]{out}[/]  ({threads} threads)")

        # 1. built-in dataset (rendered once, then cached)
        with Progress(*COLUMNS, console=console, transient=True) as p:
            task = p.add_task(f"loading {dataset} (rendered on first use)", total=None)
            ds = load_dataset(
                dataset, progress=lambda done, total: p.update(task, completed=done, total=total)
            )
        console.print(
            f"dataset {dataset}: {ds.summary()['train_classes']}/{ds.summary()['val_classes']}/"
            f"{ds.summary()['test_classes']} train/val/test classes, "
            f"{ds.channels}x{ds.image_size}x{ds.image_size}"
        )

        # 2. the API zoo (cached; finished APIs are reused)
        zoo_dir = apimeta_home() / "zoos" / f"{dataset}-conv4-{n_apis}"
        with Progress(*COLUMNS, console=console, transient=True) as p:
            task = p.add_task("building API zoo", total=n_apis)

            def on_zoo(ev) -> None:
                if ev.stage in ("done", "reused"):
                    p.update(task, advance=1, description=f"API zoo: {ev.name} ({ev.stage})")

            manifest = build_zoo(
                [dataset], n_apis, ["conv4"], 5, zoo_dir, threads=threads, progress=on_zoo
            )
        accs = [e["holdout_acc"] for e in manifest.apis]
        console.print(
            f"API zoo: {len(accs)} Conv4 APIs at {zoo_dir}, mean holdout accuracy "
            f"{100 * sum(accs) / len(accs):.1f}%"
        )

        # 3-4. train the preset's method (and with --paper BiDf-MKD), evaluate it and random
        # init on the same test tasks
        base = base_config("cpu", [])
        default = str(base["method"])  # a variant name, e.g. bbkd:colour-leaves-ink-lr5
        scenario = ZooScenario("SS", str(zoo_dir), dataset)
        # every row is fine-tuned with the default row's protocol (its meta-val uses it too)
        protocol = merge(base["eval"], split_variant(default)[1].get("eval", {}))
        same_protocol = [
            f"eval.{k}={'null' if protocol[k] is None else protocol[k]}"
            for k in ("test_steps", "test_lr", "head", "reinit", "tune")
        ]
        rows = {}
        for name in dict.fromkeys((default, *(["bidf-mkd"] if paper else []), "random")):
            own = DEMO_ROWS["default" if name == default else name] if name != "random" else {}
            n_ep = episodes or own.get("episodes", 800)
            budget = query_budget or own.get("query_budget")
            row_sets = [
                f"episodes={n_ep}",
                *([f"query_budget={budget}"] if budget else []),
                f"eval.every={max(n_ep // 4, 4)}",
                "eval.tasks=50",
                f"eval.test_tasks={tasks}",
                f"threads={threads}",
                *same_protocol,
                *sets,
            ]
            with Progress(*COLUMNS, console=console, transient=True) as p:
                if name != "random":
                    p.console.print(f"training [bold]{name}[/] ({n_ep // 4} meta-updates)")
                rows[name] = run_one(
                    base, scenario, name, out, shots=(1, 5), tasks=tasks,
                    progress=TrainProgress(p), sets=row_sets,
                )  # fmt: skip
        best = rows[default]

        # 5. artefacts
        runs = {n: Path(r["checkpoint"]).parent for n, r in rows.items() if r["checkpoint"]}
        metrics = {n: read_jsonl(path / "metrics.jsonl") for n, path in runs.items()}
        train_rows = [m for m in metrics[default] if m.get("phase") == "train"]
        val_rows = [
            {"step": m["step"], "val_acc_1shot": m["score"]}
            for m in metrics[default]
            if m.get("phase") == "val"
        ]
        curve = out / "learning_curve.png"
        plot_learning_curve(train_rows + val_rows, curve, title=f"{default} on {dataset} (API-SS)")
        table = markdown_table(
            ["init", "1-shot", "5-shot", "API queries", "API events", "train time"],
            [
                [
                    name,
                    fmt_acc(r["results"][dataset]["1-shot"]),
                    fmt_acc(r["results"][dataset]["5-shot"]),
                    f"{r['queries']:,}",
                    r["api_events"],
                    f"{r['train_seconds'] / 60:.1f} min",
                ]
                for name, r in rows.items()
            ],
        )
        wall = time.perf_counter() - t_start
        e = best["config"]["eval"]
        write_report(
            out / "report.md",
            f"apimeta demo: {default} on {dataset} (API-SS, {len(accs)} Conv4 APIs)",
            [
                (
                    "Result",
                    f"5-way meta-test accuracy (%) ± 95% CI on {tasks} tasks per shot, the same "
                    "tasks and the same fine-tuning protocol for every initialization: "
                    + protocol_text(e, best["config"]["inner_lr"])
                    + f" (the protocol of `{default}`, the `cpu` preset's method). Trained "
                    "checkpoints were selected on meta-val. One seed and shorter runs than the "
                    "preset's: the 3-seed comparisons are in BENCHMARKS.md §6.\n\n" + table,
                ),
                (
                    "Runs",
                    "".join(_run_lines(n, runs[n], metrics[n], rows[n]) for n in runs)
                    + f"- API zoo: `{zoo_dir}` ({len(accs)} APIs)\n"
                    f"- wall time of the whole demo: {wall / 60:.1f} min\n",
                ),
                ("Learning curve", f"![learning curve]({curve.name})\n"),
                (
                    "Images of the API events",
                    "".join(
                        f"{n}:\n\n"
                        + "\n".join(
                            f"![{n} event {i}]({g.relative_to(out)})"
                            for i, g in enumerate(sorted((runs[n] / "recovered").glob("*.png"))[:3])
                        )
                        + "\n\n"
                        for n in runs
                    ),
                ),
            ],
        )
        console.print()
        console.print(table)
        console.print(
            f"report: [cyan]{out / 'report.md'}[/]   learning curve: [cyan]{curve}[/]   "
            f"run directories: " + ", ".join(f"[cyan]{p}[/]" for p in runs.values())
        )
        console.print(f"demo finished in {wall / 60:.1f} min")


def _run_lines(name: str, path: Path, metrics: list[dict], row: dict) -> str:
    """Report lines of one trained row: its directory, API events and queries."""
    events = [m for m in metrics if m.get("phase") == "event"]
    lines = f"- {name}: `{path}` (config.yaml, metrics.jsonl, best.pt, last.pt); "
    lines += f"{len(events)} API events, {row['queries']:,} queries"
    budget = row["config"].get("query_budget")
    lines += f" of a {budget:,} budget" if budget else ""
    if events and "fidelity_support" in events[0]:
        fid = sum(e["fidelity_support"] + e["fidelity_query"] for e in events) / (2 * len(events))
        div = sum(e.get("diversity_support", float("nan")) for e in events) / len(events)
        lines += (
            f"; mean recovery fidelity {100 * fid:.1f}%, mean within-class diversity of support "
            f"sets {div:.3f} (1 - cos of the meta-model's features; 0 = near-copies)"
        )
    elif events and "confidence" in events[0]:
        conf = sum(e["confidence"] for e in events) / len(events)
        lines += f"; the APIs' mean top probability on the candidates {100 * conf:.1f}%"
    return lines + "\n"
