"""``random``: no meta-training; the seeded random meta-model init (the lower baseline).

``apimeta train --method random`` writes ``last.pt``/``best.pt`` holding the init and evaluates
it like any method, so every table has the same reference row.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from apimeta.methods.interface import METHODS
from apimeta.methods.trainer import MetaTrainer


@METHODS.register("random")
class RandomInit(MetaTrainer):
    """The meta-model as built by ``apimeta.models.meta.build_meta_model`` (seed ``cfg.seed``), untrained."""

    name = "random"

    def total_updates(self) -> int:
        return 0

    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, Any]]:
        raise RuntimeError("the random init is never trained")
