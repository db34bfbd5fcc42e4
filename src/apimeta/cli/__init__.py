"""The ``apimeta`` command line. Each subcommand lives in its own module of this package and adds
itself to :data:`app` on import; add a new module's import below."""

from apimeta.cli import bench, demo, evaluate, serve, train, zoo  # noqa: F401  (register)
from apimeta.cli.app import app

__all__ = ["app"]
