"""Helpers shared by CLI commands: error display, thread setup, rich console."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import typer
from rich.console import Console

from apimeta.errors import ApimetaError

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Show an ``ApimetaError`` as one red line and exit 2, instead of a traceback."""
    try:
        yield
    except ApimetaError as e:
        err_console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def workers_option(what: str, default: int = 1) -> Any:
    return typer.Option(
        default,
        "--workers",
        help=f"Run {what} in this many worker processes, one torch thread each (with --ray: "
        "Ray tasks in flight; 0 = one per Ray CPU). The numbers do not depend on it.",
    )


def ray_option() -> Any:
    return typer.Option(
        False, "--ray", help="Run the parallel jobs on a local Ray (pip install 'apimeta[ray]')."
    )


def ray_address_option() -> Any:
    return typer.Option(
        None,
        "--ray-address",
        help="Join this Ray cluster (e.g. ray://head:10001 or auto) and run the jobs there; "
        "every node needs apimeta installed and the same paths.",
    )
