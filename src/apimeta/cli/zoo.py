"""``apimeta zoo``: build a pool of black-box API classifiers and inspect it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from apimeta.cli.app import app
from apimeta.cli.common import (
    console,
    err_console,
    friendly_errors,
    ray_address_option,
    ray_option,
    set_threads,
    workers_option,
)
from apimeta.parallel import make_backend

zoo_app = typer.Typer(
    help="Build and inspect API zoos: pools of trained classifiers served as black-box APIs.",
    no_args_is_help=True,
)
app.add_typer(zoo_app, name="zoo")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _options(items: list[str]) -> dict[str, Any]:
    """``["per_class=60"]`` -> ``{"per_class": 60}`` (values read as YAML scalars)."""
    from apimeta.config import parse_overrides

    return parse_overrides(items)


def zoo_table(apis: list[dict[str, Any]], title: str | None = None) -> Table:
    """A rich table of manifest entries (name, arch@width, dataset, holdout acc, epochs, time,
    classes)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    right: dict[str, Any] = {"justify": "right", "no_wrap": True}
    for col, kw in (
        ("name", {"no_wrap": True}),
        ("arch", {"no_wrap": True}),
        ("dataset", {"no_wrap": True}),
        ("holdout", right),
        ("ep", right),
        ("time", right),
        ("classes", {"no_wrap": True, "overflow": "ellipsis"}),
    ):
        table.add_column(col, **kw)
    for e in apis:
        names = ",".join(e.get("class_names") or map(str, e["classes"]))
        names = names if len(names) <= 18 else names[:17] + "…"
        acc = e.get("holdout_acc")
        table.add_row(
            e["name"],
            f"{e['arch']}@{e['width']:g}" if "arch" in e else f"onnx ({e.get('output')})",
            e["dataset"],
            "-" if acc is None else f"{100 * acc:.1f}%",
            str(e.get("epochs_run", "-")),
            f"{e.get('train_time_s', 0):.1f}s",
            names,
        )
    if apis:
        accs = [e["holdout_acc"] for e in apis if e.get("holdout_acc") is not None]
        total = sum(e.get("train_time_s", 0) for e in apis)
        mean = f"{100 * sum(accs) / len(accs):.1f}%" if accs else "-"
        table.add_section()
        table.add_row(f"{len(apis)} APIs", "", "mean", mean, "", f"{total:.1f}s", "")
    return table


def coverage_line(apis: list[dict[str, Any]]) -> str:
    """One line per dataset: distinct classes the APIs cover and how many APIs hold each."""
    from apimeta.apis.zoo import zoo_coverage

    return "\n".join(
        f"coverage {ds}: {c['classes']} classes in {c['apis']} APIs, each held by "
        f"{c['min']}-{c['max']} APIs (mean {c['mean']:.2f}); {100 * c['repeated']:.0f}% by two or more"
        for ds, c in zoo_coverage(apis).items()
    )


@zoo_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the zoo into."),
    dataset: str = typer.Option(
        "emoji",
        "--dataset",
        "-d",
        help="Dataset name; several comma-separated (emoji,kanji) alternate between APIs (API-MH).",
    ),
    n_apis: int = typer.Option(20, "--n-apis", "-n", help="Number of API classifiers to train."),
    archs: str = typer.Option(
        "conv4",
        "--archs",
        "-a",
        help="Comma-separated backbones, assigned round-robin (conv4 | conv4,resnet10,resnet18).",
    ),
    way: int = typer.Option(5, "--way", help="Classes per API (drawn from meta-train classes)."),
    class_pool: int | None = typer.Option(
        None,
        "--class-pool",
        help="Draw the APIs' classes from a seeded subset of this many meta-train classes "
        "(default: all), so each class is covered by several APIs (the paper: 100 APIs over "
        "64 classes).",
    ),
    epochs: int = typer.Option(
        20, "--epochs", help="Max training epochs per API (paper: 60); early stopping on holdout."
    ),
    batch_size: int = typer.Option(
        128,
        "--batch-size",
        help="Training batch (paper: 128). With 20 images/class a 5-way API has 80 training "
        "images, i.e. one step per epoch at 128: use 32 or more epochs for better APIs.",
    ),
    patience: int = typer.Option(
        10, "--patience", help="Stop an API after this many epochs without holdout gain (0: never)."
    ),
    seed: int = typer.Option(2022, "--seed", help="Zoo seed; API i depends only on (seed, i)."),
    data_root: Path | None = typer.Option(
        None, "--data-root", help="Where dataset files live (datasets that need files)."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", help="Resize images to this many pixels (default: dataset's own)."
    ),
    conv4_width: int = typer.Option(32, "--conv4-width", help="Conv4 filters (paper: 32)."),
    resnet_width: float = typer.Option(
        0.25,
        "--resnet-width",
        help="ResNet width multiplier: 1.0 = paper (64-128-256-512); 0.25 (default) is CPU-sized.",
    ),
    dataset_option: list[str] = typer.Option(
        [],
        "--dataset-option",
        help="Extra dataset loader option KEY=VALUE (repeatable), e.g. per_class=60.",
    ),
    augment: bool = typer.Option(
        True, "--augment/--no-augment", help="Random crop + flip while training (paper: none)."
    ),
    device: str = typer.Option("cpu", "--device", help="Torch device to train on (cpu, cuda)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads to use."),
    force: bool = typer.Option(
        False, "--force", help="Rebuild from scratch even if --out holds a different zoo."
    ),
    workers: int = workers_option("the APIs (one job per API)"),
    ray: bool = ray_option(),
    ray_address: str | None = ray_address_option(),
) -> None:
    """Train an API zoo (resumes an interrupted build with the same arguments)."""
    from apimeta.apis.zoo import ZooProgress, build_zoo

    with friendly_errors():
        set_threads(threads)
        backend = make_backend(workers, ray=ray, ray_address=ray_address)
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            apis_task = bar.add_task(
                "APIs", total=n_apis, info=backend.describe() if backend.parallel else ""
            )
            # parallel builds report whole APIs only (epochs happen in the workers)
            epoch_task = bar.add_task("epochs", total=epochs, info="", visible=not backend.parallel)

            def on_progress(p: ZooProgress) -> None:
                if p.stage == "reused":
                    bar.advance(apis_task)
                    bar.update(apis_task, info=f"{p.name} reused")
                elif p.stage == "start":
                    bar.reset(epoch_task, total=p.epochs)
                    bar.update(epoch_task, description=p.name, info=f"{p.arch} on {p.dataset}")
                elif p.stage == "epoch":
                    bar.update(
                        epoch_task,
                        completed=p.epoch,
                        info=f"{p.arch} on {p.dataset}, holdout {100 * (p.holdout_acc or 0):.1f}%",
                    )
                elif p.stage == "done":
                    bar.update(epoch_task, completed=p.epochs)
                    bar.advance(apis_task)
                    bar.update(
                        apis_task, info=f"{p.name}: holdout {100 * (p.holdout_acc or 0):.1f}%"
                    )

            manifest = build_zoo(
                _split(dataset),
                n_apis,
                _split(archs),
                way,
                out,
                seed=seed,
                epochs=epochs,
                patience=patience or None,
                batch_size=batch_size,
                dataset_options=_options(dataset_option),
                class_pool=class_pool,
                augment=augment,
                conv4_width=conv4_width,
                resnet_width=resnet_width,
                data_root=data_root,
                image_size=image_size,
                device=device,
                threads=threads,
                force=force,
                progress=on_progress,
                backend=backend,
            )
        console.print(zoo_table(manifest.apis, title=f"API zoo {out}"))
        console.print(coverage_line(manifest.apis))


@zoo_app.command("show")
def show(
    source: str = typer.Argument(
        ..., help="Zoo directory (zoo.json), API description file, or http://host:port."
    ),
) -> None:
    """Print the APIs of a zoo: architecture, dataset, classes, holdout accuracy, train time.

    Checks every weights file; a missing or damaged one is listed and the exit status is 1.
    A description file or a server is opened (names, shapes and widths checked) and its APIs
    listed; one that cannot be used is an error (exit 2)."""
    from apimeta.apis.describe import is_description
    from apimeta.apis.http import is_http
    from apimeta.apis.local import check_weights
    from apimeta.apis.manifest import read_manifest, zoo_dir

    if is_description(source) or is_http(source):
        _show_apis(source)
        return
    path = Path(source)
    with friendly_errors():
        data = read_manifest(path)
        args = data.get("build_args", {})
        console.print(
            f"[bold]{path}[/]: datasets {','.join(args.get('datasets', []))}, "
            f"archs {','.join(args.get('archs', []))}, way {args.get('way')}, "
            f"seed {args.get('seed')}, epochs {args.get('epochs')}"
        )
        console.print(zoo_table(data["apis"]))
        console.print(coverage_line(data["apis"]))
        problems = [
            f"{e['name']}: {p}"
            for e in data["apis"]
            if (p := check_weights(zoo_dir(path), e)) is not None
        ]
        for line in problems:
            err_console.print(f"[bold red]damaged:[/] {line}")
        if problems:
            err_console.print(
                f"{len(problems)} of {len(data['apis'])} APIs are damaged; rebuild them with "
                "`apimeta zoo build` and the same arguments (finished APIs are reused)"
            )
            raise typer.Exit(1)


def _show_apis(source: str) -> None:
    """List the APIs of a description file or a server, as loaded (nothing is queried)."""
    from apimeta.apis.sources import load_zoo

    with friendly_errors():
        apis = load_zoo(source)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "kind", "dataset", "input", "output", "classes"):
        table.add_column(col, no_wrap=True, overflow="ellipsis")
    for a in apis:
        i = a.info
        names = ",".join(i.class_names)
        layout = getattr(getattr(a, "adapter", None), "layout", "nchw")
        table.add_row(
            i.name,
            type(getattr(a, "api", a)).__name__,
            i.dataset,
            f"{i.channels}x{i.image_size}x{i.image_size} {layout}",
            i.output,
            names if len(names) <= 24 else names[:23] + "…",
        )
    console.print(f"[bold]{source}[/]: {len(apis)} API{'s' if len(apis) != 1 else ''}")
    console.print(table)
    for a in apis:
        close = getattr(a, "close", None)
        if close is not None:
            close()


@zoo_app.command("export-onnx")
def export_onnx_cmd(
    zoo_dir: Path = typer.Argument(..., help="API zoo directory (zoo.json)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Write a complete ONNX zoo here (default: in place)."
    ),
    legacy: bool = typer.Option(
        False, "--legacy-exporter", help="Use the TorchScript exporter (dynamo=False)."
    ),
) -> None:
    """Export every API of a zoo to ONNX (normalization inside, dynamic batch)."""
    from apimeta.apis.onnx import export_zoo_onnx

    with friendly_errors():

        def progress(i: int, n: int, name: str) -> None:
            console.print(f"[{i + 1}/{n}] {name} exported")

        folder = export_zoo_onnx(zoo_dir, out, dynamo=not legacy, progress=progress)
    console.print(f"ONNX zoo written to {folder} (zoo.json has onnx_file entries)")
