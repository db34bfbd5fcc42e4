"""``apimeta bench``: the method comparison table (rows = methods, columns = scenario x shot)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from apimeta.cli.app import app
from apimeta.cli.common import (
    console,
    friendly_errors,
    ray_address_option,
    ray_option,
    set_threads,
    workers_option,
)
from apimeta.cli.evaluate import parse_shots
from apimeta.cli.train import TrainProgress
from apimeta.parallel import make_backend


def _variants() -> list[str]:
    from apimeta.bench import variants

    return list(variants())


@app.command("bench")
def bench_cmd(
    scenario: list[str] = typer.Option(
        ...,
        "--scenario",
        help="NAME=ZOO:DATASET[,DATASET] (repeatable), e.g. SS=runs/zoos/emoji-conv4:emoji.",
    ),
    methods: str = typer.Option(
        "random,maml-real,maml-zoo,bbkd,bbkd:contrastive-leaves,bbkd:union-leaves-ink,"
        "bbkd:colour-leaves-ink,bbkd:colour-leaves-ink-lr5,bidf-mkd,bidf-mkd:no-boundary,"
        "bidf-mkd:no-memory,bidf-mkd:white-box",
        "--methods",
        help="Comma-separated method variants (rows of the table): " + ", ".join(_variants()) + ".",
    ),
    preset: str = typer.Option("cpu", "--preset", "-p", help="Preset every run starts from."),
    sets: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key for every run, e.g. --set episodes=2000."
    ),
    shots: str = typer.Option("1,5", "--shots", help="Shot counts of the meta-test columns."),
    tasks: int = typer.Option(600, "--tasks", help="Meta-test tasks per shot (same for all)."),
    out: Path = typer.Option(
        Path("runs/bench"), "--out", "-o", help="Comparison directory (finished runs are reused)."
    ),
    table: Path | None = typer.Option(
        None, "--table", help="Markdown file to write (default OUT/results.md)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    device: str | None = typer.Option(
        None, "--device", help="Torch device of every run (cpu, cuda, cuda:1 ...)."
    ),
    workers: int = workers_option("cells (variant x scenario x seed); finished runs are reused"),
    ray: bool = ray_option(),
    ray_address: str | None = ray_address_option(),
    seeds: int = typer.Option(
        1,
        "--seeds",
        help="Training seeds per row (seed, seed+1, ...): cells become the mean over seeds ± "
        "their spread, with paired differences against random and bbkd.",
    ),
    oracle: str = typer.Option(
        "maml-zoo",
        "--oracle",
        help="The ceiling row of the gap shares: maml-zoo, or a variant of it chosen on "
        "meta-val (e.g. maml-zoo:lr3, Adam's outer lr 0.003); it must be among --methods to "
        "print them.",
    ),
    tune: list[str] = typer.Option(
        [],
        "--tune",
        help="KEY=V1,V2 (repeatable; KEY: lr, steps, head, reinit): also choose every row's "
        "meta-test fine-tuning protocol on meta-val from this grid (per run and shot) and add "
        "its tables beside the run config's protocol, e.g. --tune lr=0.01,0.03,0.1 "
        "--tune head=learned,zero.",
    ),
) -> None:
    """Train every method variant in every scenario, evaluate each on the same meta-test tasks
    and write a Markdown table with queries used and wall time.

    Variants: every registered method, and METHOD:ABLATION for the ablations it declares
    (apimeta.run_config.ABLATIONS): bidf-mkd:white-box is true gradients without early stop (an
    upper bound, not black-box); bidf-mkd:diverse-memory (memory.min_classes=10,
    memory.filter_query=true), bidf-mkd:scheduled (an API event every events.patience updates) and
    bidf-mkd:augmented-memory (memory.augment=crop,flip,jitter,cutout), bidf-mkd:ema (ema=0.95)
    and bidf-mkd:cosine-lr (outer_lr_schedule=cosine), bidf-mkd:diverse-recovery and
    bidf-mkd:diverse-pixels (recovery.diversity in features or pixels) and bidf-mkd:large-inner-lr
    (inner_lr=0.1) are default-off extensions.

    A row's config: the preset, then the variant's own changes (bbkd:colour-leaves-ink-lr5, the
    cpu preset's method, brings 1,000 updates, a 50 k budget and outer lr 0.005), then every
    --set, then the scenario's zoo and datasets.

    Runs are stored under OUT/<scenario>/<variant>/ and reused when their eval.json exists, so
    an interrupted comparison resumes and several processes (each with its own --methods) can
    fill one table. With --tune, each run's meta-val choice and its meta-test are cached in its
    tuned.json.
    """
    with friendly_errors():
        from apimeta.bench import (
            Cell,
            ZooScenario,
            base_config,
            check_cell_layout,
            comparison_table,
            machine_line,
            paired_table,
            per_dataset_table,
            protocol_table,
            run_cells,
            seed_mean_rows,
            tuned_rows,
            variant,
        )
        from apimeta.errors import ConfigError
        from apimeta.evaluate import parse_grid
        from apimeta.io import atomic_write_text

        set_threads(threads)
        scen = [ZooScenario.parse(s) for s in scenario]
        names = [m.strip() for m in methods.split(",") if m.strip()]
        for n in names:
            variant(n)
        if variant(oracle)[0] != "maml-zoo":
            raise ConfigError(
                f"--oracle {oracle!r} is not the zoo oracle; pass maml-zoo or one of its "
                "variants (e.g. maml-zoo:lr3)"
            )
        shot_list = parse_shots(shots)
        grid = parse_grid(tune)
        all_sets = [*sets, *([f"device={device}"] if device else [])]
        base = base_config(preset, [])
        first_seed = int(base_config(preset, all_sets)["seed"])  # a bad --set fails here
        if seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {seeds}")
        backend = make_backend(workers, ray=ray, ray_address=ray_address)
        seed_list: list[int | None] = (
            [None] if seeds == 1 else [first_seed + i for i in range(seeds)]
        )
        for s_ in scen:  # before any work: --seeds must match the runs already in --out
            for n in names:
                check_cell_layout(out, s_, n, seed_list[0])
        rows = []
        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*cols, console=console, transient=True) as progress:
            cells = [Cell(s, n, seed) for s in scen for n in names for seed in seed_list]
            overall = progress.add_task(
                f"comparison ({backend.describe()})" if backend.parallel else "comparison",
                total=len(cells),
            )

            def done(cell: Cell) -> None:
                progress.advance(overall)

            rows = run_cells(
                base,
                cells,
                out,
                shots=shot_list,
                tasks=tasks,
                backend=backend,
                progress=TrainProgress(progress) if not backend.parallel else None,
                on_done=done,
                tune=grid or None,
                sets=all_sets,
            )
        cmd = "apimeta bench " + " ".join(
            [f"--scenario {s}" for s in scenario]
            + [f"--methods {methods}", f"--preset {preset}"]
            + [f"--set {x}" for x in sets]
            + [f"--shots {shots}", f"--tasks {tasks}", f"--out {out}"]
            + ([f"--seeds {seeds}"] if seeds > 1 else [])
            + ([f"--oracle {oracle}"] if oracle != "maml-zoo" else [])
            + [f"--tune {t}" for t in tune]
            + ([f"--workers {workers}"] if workers > 1 else [])
            + (["--ray"] if ray and not ray_address else [])
            + ([f"--ray-address {ray_address}"] if ray_address else [])
        )
        names_s = [s.name for s in scen]
        shown = seed_mean_rows(rows) if seeds > 1 else rows
        legend = (
            f"Cells: mean accuracy % over {seeds} training seeds ± their standard deviation. "
            if seeds > 1
            else "Cells: mean accuracy % ± 95% CI (1.96·σ/√n). "
        )
        paired = paired_table(rows, names_s, shot_list)
        text = (
            f"# Comparison ({tasks} meta-test tasks per shot, 5-way, same episodes for every row)\n\n"
            f"Command: `{cmd}`\n\nMachine: {machine_line()}\n\n"
            + comparison_table(shown, names_s, shot_list, oracle)
            + "\n"
            + legend
            + "Queries / events / time per scenario. Each row is meta-tested with its own run "
            "config's protocol (a config holding a grid, `eval.tune`, with the one its meta-val "
            "chooses), so rows may differ in protocol here"
            + ("; the section below tunes every row on one grid" if grid else "")
            + ".\n\n"
            + (paired + "\n" if paired else "")
            + "## Per dataset\n\n"
            + per_dataset_table(rows, shot_list)
        )
        if grid:
            tuned = tuned_rows(rows)
            paired_t = paired_table(tuned, names_s, shot_list)
            text += (
                "\n## Fine-tuning protocol chosen on meta-val\n\n"
                "Each run's meta-test protocol chosen per shot on its meta-val tasks from "
                + ", ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in grid.items())
                + "; the meta-test tasks are the same as above.\n\n"
                + comparison_table(
                    seed_mean_rows(tuned) if seeds > 1 else tuned, names_s, shot_list, oracle
                )
                + "\n"
                + legend
                + "\n\n"
                + (paired_t + "\n" if paired_t else "")
                + "Chosen protocols:\n\n"
                + protocol_table(rows, shot_list)
            )
        path = table or out / "results.md"
        atomic_write_text(path, text)
        console.print(text)
        console.print(f"table written to [cyan]{path}[/]")
