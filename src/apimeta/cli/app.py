"""The ``apimeta`` Typer app; each subcommand module of :mod:`apimeta.cli` adds its commands."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="apimeta",
    help="Meta-learn a few-shot initialization from black-box model APIs (BiDf-MKD).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # one INFO line per HTTP request would flood training logs: those are debug detail
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


__all__ = ["app"]
