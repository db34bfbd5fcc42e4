"""Task interpolation (MLTI, Yao et al., ICLR 2022; used on memory tasks by TDS): a new task
from two tasks of the same shape.

Class k of the new task mixes class k of task ``a`` with class k of task ``b``: at a random
depth (the images, or the output of one feature stage) the hidden representation of each of
``a``'s images becomes ``lam * h_a + (1 - lam) * h_b`` of the image at the same position of
``b``, with ``lam ~ Beta(alpha, alpha)``; the labels are ``a``'s (aligned with ``b``'s: memory
tasks list their images class by class). The same ``lam`` and depth hold for the support set,
every inner step and the query set, so MAML adapts to and is scored on the same mixed classes.

A mix after feature stage ``s`` runs both tasks as one batch ``cat([a, b])`` (the stages up to
``s`` see both; transductive batch norm there takes its statistics over both), and a forward
hook on stage ``s`` replaces its output by ``cat([m, m])`` with ``m`` the mix: every later
layer, the loss and the accuracy see each mixed image twice, which leaves their means (and
batch-norm statistics) those of ``m`` alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from apimeta.episodes import Episode
from apimeta.errors import EpisodeError
from apimeta.models.stages import feature_stages, output_module

INPUT = -1  # the depth of a mix of the images themselves


@dataclass(frozen=True)
class Mix:
    """Where and how much: ``stage`` -1 mixes the images, ``s >= 0`` the output of feature
    stage ``s``; ``lam`` is the weight of the first task."""

    stage: int
    lam: float


def draw_mix(n_stages: int, alpha: float, generator: torch.Generator) -> Mix:
    """A depth uniform over the images and the outputs of the first ``n_stages - 1`` feature
    stages (after the last one only the head is left to adapt), and ``lam ~ Beta(alpha,
    alpha)``; both from ``generator`` (CPU), so a resumed run draws the same mixes."""
    if n_stages < 1 or alpha <= 0:
        raise ValueError(f"need n_stages >= 1 and alpha > 0, got {n_stages}, {alpha}")
    stage = int(torch.randint(n_stages, (1,), generator=generator)) - 1
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return Mix(stage=stage, lam=float(np.random.default_rng(seed).beta(alpha, alpha)))


def pair_tasks(a: Episode, b: Episode, mix: Mix) -> Episode:
    """The task to train on: at ``mix.stage`` -1 the mixed images with ``a``'s labels, else
    both tasks' images as one batch (``a``'s first) to be mixed by :func:`mixing`. EpisodeError
    if the two are not the same shape of task."""
    for part in ("support", "query"):
        xa, xb = getattr(a, f"{part}_x"), getattr(b, f"{part}_x")
        if xa.shape != xb.shape:
            raise EpisodeError(
                f"tasks to interpolate need the same {part} shape, got {tuple(xa.shape)} and "
                f"{tuple(xb.shape)}"
            )
    if mix.stage == INPUT:
        return Episode(
            support_x=mix.lam * a.support_x + (1 - mix.lam) * b.support_x,
            support_y=a.support_y,
            query_x=mix.lam * a.query_x + (1 - mix.lam) * b.query_x,
            query_y=a.query_y,
            class_ids=a.class_ids,
        )
    return Episode(
        support_x=torch.cat([a.support_x, b.support_x]),
        support_y=a.support_y.repeat(2),
        query_x=torch.cat([a.query_x, b.query_x]),
        query_y=a.query_y.repeat(2),
        class_ids=a.class_ids,
    )


@contextlib.contextmanager
def mixing(model: nn.Module, mix: Mix) -> Iterator[None]:
    """Inside the block, every forward pass of ``model`` on a (2B, ...) batch ``cat([a, b])``
    turns the output of feature stage ``mix.stage`` into ``cat([m, m])``, ``m = lam * h_a +
    (1 - lam) * h_b`` (nothing at stage -1: :func:`pair_tasks` mixed the images). The hook is
    removed on leaving, also on an error."""
    if mix.stage == INPUT:
        yield
        return

    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        h_a, h_b = out.chunk(2)
        m = mix.lam * h_a + (1 - mix.lam) * h_b
        return torch.cat([m, m])

    handle = output_module(feature_stages(model)[mix.stage]).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["INPUT", "Mix", "draw_mix", "mixing", "pair_tasks"]
