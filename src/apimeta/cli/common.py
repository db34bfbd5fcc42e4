"""Helpers shared by CLI commands: error display, thread setup, rich console."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
