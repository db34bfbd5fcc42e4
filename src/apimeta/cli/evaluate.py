"""``apimeta eval``: few-shot evaluation of an initialization (docs/design.md section 6)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apimeta.cli.app import app
from apimeta.cli.common import (
    console,
    friendly_errors,
    ray_address_option,
    ray_option,
    set_threads,
    workers_option,
)
from apimeta.errors import ConfigError
from apimeta.parallel import make_backend


def parse_shots(value: str) -> tuple[int, ...]:
    """``"1,5"`` -> (1, 5); ConfigError on anything else."""
    try:
        shots = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"--shots must be comma-separated integers like 1,5; got {value!r}"
        ) from None
    if not shots or any(s < 1 for s in shots):
        raise ConfigError(f"--shots needs positive integers like 1,5; got {value!r}")
    return shots


def eval_table(results: dict[str, dict[str, dict[str, Any]]], title: str) -> Table:
    """One row per (dataset, shot); a "chosen on meta-val" column when results were tuned."""
    from apimeta.evaluate import setting_label

    tuned = any("setting" in r for res in results.values() for r in res.values())
    cols = ["dataset", "shots", "accuracy %", "± 95% CI", "std", "tasks"]
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col in cols + (["chosen on meta-val"] if tuned else []):
        table.add_column(col, justify="right" if col in cols[2:] else "left")
    for ds, res in results.items():
        for shot, r in res.items():
            row = [ds, shot, f"{r['mean']:.2f}", f"{r['ci95']:.2f}", f"{r['std']:.2f}", str(r["n"])]
            if tuned:
                row.append(setting_label(r.get("setting", {})))
            table.add_row(*row)
    return table


@app.command("eval")
def eval_cmd(
    init: str = typer.Option(
        ..., "--init", "-i", help="'random' (seeded random meta-model) or a checkpoint path."
    ),
    dataset: str | None = typer.Option(
        None,
        "--dataset",
        "-d",
        help="Dataset(s), comma-separated (default: the checkpoint's; 'emoji' for random).",
    ),
    split: str = typer.Option("test", "--split", help="Split to evaluate: test, val or train."),
    shots: str = typer.Option("1,5", "--shots", help="Comma-separated shot counts."),
    tasks: int = typer.Option(600, "--tasks", help="Tasks per shot count."),
    way: int = typer.Option(5, "--way", help="Classes per task."),
    query: int = typer.Option(15, "--query", help="Query images per class."),
    steps: int = typer.Option(10, "--steps", help="Fine-tuning steps on the support set."),
    lr: float = typer.Option(0.01, "--lr", help="Fine-tuning learning rate."),
    head: str = typer.Option(
        "learned",
        "--head",
        help="How the classifier head starts: learned (the paper), zero, proto (Proto-MAML "
        "from the support means), random (a fresh head, seeded per task) or ncc (nearest "
        "normalized class mean, no fine-tuning).",
    ),
    reinit: int = typer.Option(
        0,
        "--reinit",
        help="Re-draw the last N feature stages of the init (a fixed seeded default init) "
        "before fine-tuning: keep only the low-level features (0: keep all).",
    ),
    tune: list[str] = typer.Option(
        [],
        "--tune",
        help="Choose the protocol per shot on meta-val from a grid, then meta-test only the "
        "winner, e.g. --tune head=learned,random --tune lr=0.01,0.1 (keys lr, steps, head, "
        "reinit; the other protocol options are the base).",
    ),
    val_tasks: int = typer.Option(
        100, "--val-tasks", help="Meta-val tasks per setting and shot with --tune."
    ),
    non_transductive: bool = typer.Option(
        False,
        "--non-transductive",
        help="Classify each query image in a batch with the support set only (Reptile protocol).",
    ),
    seed: int = typer.Option(
        2022, "--seed", help="Seed of the fixed task list (and of the random init)."
    ),
    data_root: str | None = typer.Option(None, "--data-root", help="Root of local datasets."),
    data_option: list[str] = typer.Option(
        [],
        "--data-option",
        help="Dataset loader option KEY=VALUE (repeatable), e.g. channels=1 or eval_only=true "
        "for folder data.",
    ),
    backbone: str = typer.Option("conv4", "--backbone", help="Backbone for --init random."),
    width: float = typer.Option(32, "--width", help="Conv4 filters / ResNet width (random)."),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Image size (default: the checkpoint's, else 32)."
    ),
    which: str = typer.Option(
        "model", "--which", help="State dict key to load from the checkpoint.", hidden=True
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, ..."),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="Write the results as JSON here, with per-task accuracies ('accs', in task order: "
        "the same seeded tasks for every init, so two files can be compared task by task).",
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    workers: int = workers_option("shards of tasks (25 tasks each)"),
    ray: bool = ray_option(),
    ray_address: str | None = ray_address_option(),
) -> None:
    """Fine-tune an initialization on fixed seeded few-shot tasks; print mean ± 95% CI."""
    with friendly_errors():
        from apimeta.config import parse_overrides
        from apimeta.evaluate import evaluate, parse_grid, tune_protocol
        from apimeta.io import atomic_write_json
        from apimeta.models.meta import load_init, load_meta_model, load_run_datasets
        from apimeta.run_config import EvalConfig, RunConfig

        set_threads(threads)
        backend = make_backend(workers, ray=ray, ray_address=ray_address)
        options = parse_overrides(data_option) if data_option else None
        shot_list = parse_shots(shots)
        if split not in ("train", "val", "test"):
            raise ConfigError(f"--split must be train, val or test; got {split!r}")
        if tasks < 1 or way < 2 or query < 1 or steps < 0:
            raise ConfigError("need --tasks >= 1, --way >= 2, --query >= 1 and --steps >= 0")
        grid = parse_grid(tune)
        if grid and split != "test":
            raise ConfigError(
                "--tune chooses on the val split and reports the test split; drop --split"
            )
        if grid and val_tasks < 1:
            raise ConfigError(f"--val-tasks must be >= 1, got {val_tasks}")
        if init == "random":
            cfg = RunConfig(
                dataset=dataset or "emoji",
                data_root=data_root,
                data_options=options or {},
                backbone=backbone,
                width=width,
                image_size=image_size or RunConfig().image_size,
                way=way,
                seed=seed,
                device=device,
            )
            datasets = load_run_datasets(cfg)
            model = load_init("random", cfg, datasets)
        else:
            if not Path(init).is_file():
                raise ConfigError(
                    f"--init must be 'random' or an existing checkpoint file; {init!r} is neither"
                )
            model, ckpt_cfg, ckpt = load_meta_model(init, which=which, device=device)
            spec = ckpt["model_spec"]
            if spec["num_classes"] != way:
                raise ConfigError(
                    f"the checkpoint's head has {spec['num_classes']} outputs; use --way "
                    f"{spec['num_classes']}"
                )
            size = image_size or (ckpt_cfg.image_size if spec["adaptive_pool"] else None)
            cfg = RunConfig(
                dataset=dataset or ckpt_cfg.dataset,
                data_root=data_root if data_root is not None else ckpt_cfg.data_root,
                data_options=options if options is not None else ckpt_cfg.data_options,
                image_size=size or spec["image_size"],
                seed=seed,
            )
            if not spec["adaptive_pool"] and cfg.image_size != spec["image_size"]:
                raise ConfigError(
                    f"this checkpoint takes {spec['image_size']} px images (no adaptive "
                    f"pooling); drop --image-size or set it to {spec['image_size']}"
                )
            datasets = load_run_datasets(cfg)
        results: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*cols, console=console, transient=True) as progress:
            for ds in datasets:
                bar = progress.add_task(ds.name, total=tasks * len(shot_list))
                per_shot: dict[int, int] = {}  # tasks done per shot (shards may interleave)

                def cb(done: int, total: int, info: dict, _bar=bar, _seen=per_shot, _n=ds.name):
                    _seen[info["shot"]] = done
                    progress.update(
                        _bar,
                        completed=sum(_seen.values()),
                        description=f"{_n} {info['shot']}-shot",
                    )

                if grid:
                    protocol = EvalConfig(
                        tasks=val_tasks, test_steps=steps, test_lr=lr, head=head, reinit=reinit,
                        transductive=not non_transductive,
                    )  # fmt: skip
                    tcfg = dataclasses.replace(
                        cfg, way=way, query=query, device=device, eval=protocol
                    )
                    results[ds.name] = tune_protocol(
                        model, ds, tcfg, grid, shots=shot_list, tasks=tasks, backend=backend,
                        progress=cb, seed=seed,
                    )  # fmt: skip
                    continue
                results[ds.name] = evaluate(
                    model,
                    ds,
                    split=split,
                    way=way,
                    shots=shot_list,
                    query=query,
                    tasks=tasks,
                    steps=steps,
                    lr=lr,
                    transductive=not non_transductive,
                    head=head,
                    reinit=reinit,
                    seed=seed,
                    device=device,
                    keep_accs=json_out is not None,  # per-task accuracies for paired comparisons
                    progress=cb,
                    backend=backend,
                )
        seconds = time.perf_counter() - t0
        mode = "non-transductive" if non_transductive else "transductive"
        console.print(
            eval_table(results, f"{init}: {split} split, {way}-way, {query} queries, {mode}")
        )
        n_tasks = tasks * len(shot_list) * len(datasets)
        console.print(f"{n_tasks} tasks in {seconds:.1f} s ({n_tasks / seconds:.1f} tasks/s)")
        if json_out is not None:
            atomic_write_json(
                json_out,
                {
                    "init": init,
                    "split": split,
                    "protocol": {
                        "way": way,
                        "shots": list(shot_list),
                        "query": query,
                        "tasks": tasks,
                        "steps": steps,
                        "lr": lr,
                        "transductive": not non_transductive,
                        "head": head,
                        "reinit": reinit,
                        "seed": seed,
                        **({"tune": grid, "val_tasks": val_tasks} if grid else {}),
                    },
                    "results": results,
                    "seconds": seconds,
                },
            )
            console.print(f"wrote {json_out}")


__all__ = ["eval_table", "parse_shots"]
