"""The ``apimeta`` command line. Each subcommand lives in its own module of this package."""

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


def _register() -> None:
    # Each module adds its commands to ``app`` on import.
    import importlib

    for mod in ("zoo", "train", "evaluate", "demo", "serve", "bench"):
        try:
            importlib.import_module(f"apimeta.cli.{mod}")
        except ModuleNotFoundError as e:  # a subcommand not written yet
            if e.name != f"apimeta.cli.{mod}":
                raise


_register()

__all__ = ["app"]
