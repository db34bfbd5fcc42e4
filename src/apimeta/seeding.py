"""Explicit randomness: every random component gets its own generator derived from one seed."""

from __future__ import annotations

import hashlib
import os

import torch


def derive_seed(seed: int, *names: object) -> int:
    """A stable 63-bit seed for a named component, e.g. ``derive_seed(2022, "zoo", 3)``."""
    key = ":".join([str(seed), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(
    seed: int, *names: object, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, *names)``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *names))
    return g


def deterministic_kernels(device: str | torch.device) -> bool:
    """On a CUDA ``device``: deterministic kernels, so a resumed run repeats an uninterrupted one
    (cuDNN deterministic, no autotuning, a fixed cuBLAS workspace, and
    ``torch.use_deterministic_algorithms`` warning about any op without a deterministic
    version). CPU kernels already are: a no-op there. Returns whether anything was set."""
    if torch.device(device).type != "cuda":
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    return True
