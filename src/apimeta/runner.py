"""Starting a training run: the method of ``cfg.method`` and its run directory.

``apimeta train`` and ``apimeta bench`` both start runs here::

    method, run = start_run(cfg, resume=False)
    result = method.train(cfg, run, progress, resume=False)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def interrupts() -> Iterator[dict[str, int]]:
    """Within the block SIGTERM interrupts like Ctrl-C (``KeyboardInterrupt``), so a training
    run saves ``last.pt`` either way. Yields ``{"signal": n}``: the signal that arrived (SIGINT
    unless SIGTERM did). A no-op outside the main thread."""
    fired = {"signal": int(signal.SIGINT)}
    if threading.current_thread() is not threading.main_thread():
        yield fired
        return

    def on_term(signum: int, frame: object) -> None:
        fired["signal"] = signum
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield fired
    finally:
        signal.signal(signal.SIGTERM, old)


__all__ = ["interrupts", "start_run", "train"]
