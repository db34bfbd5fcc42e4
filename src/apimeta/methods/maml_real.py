"""``maml-real``: MAML on REAL meta-train images (the real-data ceiling of the data-free methods).

Each meta-update samples ``cfg.meta_batch`` N-way K-shot Q-query tasks from the meta-train split
of ``cfg.dataset`` (several datasets: each task picks one uniformly), adapts with
``cfg.inner_steps`` full-batch CE steps at ``cfg.inner_lr`` (second order unless
``cfg.first_order``), and takes one Adam step on the SUM of the query CE losses (docs/design.md 4.8).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from apimeta.episodes import TaskSampler
from apimeta.maml import maml_outer_loss
from apimeta.methods.interface import METHODS
from apimeta.methods.trainer import MetaTrainer


@METHODS.register("maml-real")
class MAMLReal(MetaTrainer):
    """Second-order (or first-order) MAML with CE on real meta-train tasks."""

    name = "maml-real"
    ablations = ("random-head", "lr3", "lr5")

    def setup(self) -> None:
        cfg = self.cfg
        self.samplers: list[TaskSampler] = [
            ds.sampler("train", cfg.way, cfg.shot, cfg.query, self.rng("tasks", ds.name))
            for ds in self.datasets
        ]
        self.pick = self.rng("dataset-choice")

    def sample_episode(self):
        """One meta-train episode on ``self.device`` (dataset chosen uniformly if several)."""
        i = 0
        if len(self.samplers) > 1:
            i = int(torch.randint(len(self.samplers), (1,), generator=self.pick))
        return self.samplers[i].sample().to(self.device)

    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        total: Tensor | None = None
        accs = []
        for _ in range(cfg.meta_batch):
            res = maml_outer_loss(
                self.model,
                self.inner_start(),
                self.sample_episode(),
                steps=cfg.inner_steps,
                lr=cfg.inner_lr,
                first_order=cfg.first_order,
            )
            total = res.loss if total is None else total + res.loss
            accs.append(res.acc)
        assert total is not None
        accs_f = torch.stack(accs).tolist()  # one host sync
        return total, {"train_acc": 100.0 * sum(accs_f) / len(accs_f)}
