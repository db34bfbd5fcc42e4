"""Checkpoints: atomic ``torch.save`` of plain state, loaded back with ``weights_only=True``.

A checkpoint is a dict holding only tensors, Python scalars/strings/None, lists, tuples and dicts
(model and optimizer ``state_dict``s, RNG states as ``Generator.get_state()`` tensors, step
counters, ledger/memory state, the resolved config as a dict), so loading it never runs code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from apimeta.errors import CheckpointError
from apimeta.io import atomic_torch_save

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus ``"format"``) to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_torch_save({"format": CHECKPOINT_FORMAT, **state}, path)
    log.debug("saved checkpoint %s", path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises ``CheckpointError`` if the file is missing, corrupt, holds non-plain objects or has an
    unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (runs/*/last.pt)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(e).__name__}: {e}. "
            "It may be truncated or not an apimeta checkpoint."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an apimeta checkpoint of format {CHECKPOINT_FORMAT} "
            f"(found format {state.get('format') if isinstance(state, dict) else type(state)})"
        )
    return state


def rng_states(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """``{name: generator.get_state()}`` for a checkpoint."""
    return {name: g.get_state() for name, g in generators.items()}


def restore_rng_states(
    generators: Mapping[str, torch.Generator], states: Mapping[str, torch.Tensor]
) -> None:
    """Restore generators saved with :func:`rng_states` (every name must be present)."""
    missing = set(generators) - set(states)
    if missing:
        raise CheckpointError(f"checkpoint lacks RNG state for {', '.join(sorted(missing))}")
    for name, g in generators.items():
        g.set_state(states[name])


__all__ = [
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "restore_rng_states",
    "rng_states",
    "save_checkpoint",
]
