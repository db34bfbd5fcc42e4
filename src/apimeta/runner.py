"""Starting a training run: the method of ``cfg.method`` and its run directory.

``apimeta train`` and ``apimeta bench`` both start runs here::

    method, run = start_run(cfg, resume=False)
    result = method.train(cfg, run, progress, resume=False)
"""

from __future__ import annotations

from apimeta.methods import METHODS, Method, check_run_config
from apimeta.run_config import RunConfig
from apimeta.runs import RunDir


def start_run(cfg: RunConfig, *, resume: bool = False, root: str = "runs") -> tuple[Method, RunDir]:
    """(a fresh instance of ``cfg.method``, the run directory) after checking the config, so a
    bad value fails before any directory is made or data is loaded."""
    method = METHODS.get(cfg.method)()
    check_run_config(cfg)
    return method, RunDir.create(cfg, root, resume=resume)


def train(cfg: RunConfig, *, resume: bool = False, progress=None):  # type: ignore[no-untyped-def]
    """Train ``cfg`` in its run directory; returns the method's :class:`TrainResult`."""
    method, run = start_run(cfg, resume=resume)
    return method.train(cfg, run, progress, resume=resume)


__all__ = ["start_run", "train"]
