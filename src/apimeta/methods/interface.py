"""The ``Method`` interface and the method registry.

A method produces a meta-learned initialization. Register one with the decorator::

    @METHODS.register("my-method")
    class MyMethod(MetaTrainer): ...

``METHODS.get(name)()`` gives an instance; ``apimeta train --method`` and ``apimeta bench``
take their choices from ``METHODS.names()``. See docs/architecture.md for a worked example.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from apimeta.registry import Registry
from apimeta.run_config import RunConfig
from apimeta.runs import RunDir

# progress(done, total, info): info["phase"] in {"train", "val", "test"} plus metrics / "shot"
ProgressFn = Callable[[int, int, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What ``Method.train`` returns. ``metrics``: best val score/step and the final test
    results (``{"best": {dataset: per-shot results}, "final": {...}}``)."""

    run_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A way to produce a meta-learned initialization (factories are called with no arguments).

    ``reads``: the :data:`~apimeta.run_config.SECTIONS` of the run config the method uses (the
    top-level keys are shared by all). ``ablations``: names in
    :data:`~apimeta.run_config.ABLATIONS` that make sense for it (``bench`` rows ``name:ablation``).
    ``queries_apis``: whether it learns from a zoo by querying it; ``uses_zoo``: whether its
    result depends on ``zoo`` without querying it (the ``maml-zoo`` oracle reads its classes).
    """

    name: ClassVar[str] = "method"
    reads: ClassVar[tuple[str, ...]] = ("eval",)
    ablations: ClassVar[tuple[str, ...]] = ()
    queries_apis: ClassVar[bool] = False
    uses_zoo: ClassVar[bool] = False

    @abstractmethod
    def train(
        self,
        cfg: RunConfig,
        run: RunDir,
        progress: ProgressFn | None = None,
        *,
        resume: bool = False,
    ) -> TrainResult:
        """Train with ``cfg``, writing into ``run``; ``resume=True`` continues from
        ``run.last_checkpoint`` exactly (same next step as an uninterrupted run)."""


METHODS: Registry[type[Method]] = Registry("method")


__all__ = ["METHODS", "Method", "ProgressFn", "TrainResult"]
