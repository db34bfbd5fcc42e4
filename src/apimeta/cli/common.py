"""Helpers shared by CLI commands: error display, thread setup, rich console."""

from __future__ import annotations

import contextlib
import signal
import threading
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


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM are held (recorded, not lost) and raised again when
    it ends, to their own handlers. For calls into rich's Progress: a KeyboardInterrupt raised
    between a lock's acquire and its ``with`` body there would leave the lock held, and the
    Progress then hangs on exit. Python-level handlers, since a signal mask would not hold a
    signal the kernel hands to another thread (rich's refresh thread). A no-op outside the
    main thread (where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {
        s: signal.signal(s, lambda n, f: held.append(n)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])  # handled right here, outside the block


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
