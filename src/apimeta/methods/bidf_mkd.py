"""``bidf-mkd``: Bi-level Data-free Meta Knowledge Distillation from black-box APIs.

The method of Hu et al. (ICML 2023) as docs/design.md describes it, with our corrections (proper
KL, true-loss iterate selection, cached API outputs, meta-val selection, query budget).

One meta-update sums ``cfg.meta_batch`` episode losses (docs/design.md 4.8). An episode is either

* an **API episode** (the first one, then whenever the event schedule says one is due,
  :mod:`apimeta.events`): draw an API for the scenario, recover a support set S by zero-order
  inversion (CE), adapt the meta-model by ``kd.inner_steps`` KD steps on S (inner level), recover
  a query set Q near the adapted model's decision boundary (past ``kd.adv_start``), and distil
  the API into the adapted model on Q (outer level; the meta-gradient flows through the inner
  steps) -- :mod:`apimeta.bilevel`. S and Q go into the task memory under the API's global
  class ids; or
* a **memory episode**: an interpolated N-way task composed across APIs from the task memory,
  trained with MAML + CE (``memory.interpolate`` > 0, an extension: that share of them is the
  mix of two memory tasks, MLTI, :mod:`apimeta.interpolation`).

Ablations (:data:`~apimeta.run_config.ABLATIONS`): ``kd.adv=0`` (no boundary term),
``memory.enabled=false`` (no replay: every episode is an API episode until the budget runs
out), ``zo.enabled=false`` (white-box recovery with true gradients through local APIs; an upper
bound, NOT black-box).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar

import torch
from torch import Tensor

from apimeta.apis.base import BlackBoxAPI
from apimeta.bilevel import api_kd, frozen_student, inner_kd, outer_kd_loss
from apimeta.episodes import Episode
from apimeta.errors import ConfigError, EpisodeError, QueryBudgetExceeded
from apimeta.evaluate import head_features
from apimeta.events import APIEvent, EventSchedule
from apimeta.interpolation import Mix, draw_mix, mixing, pair_tasks
from apimeta.losses import output_kind
from apimeta.maml import maml_outer_loss, named_params
from apimeta.memory import TaskMemory, within_class_diversity
from apimeta.methods.api_learner import APILearner
from apimeta.methods.interface import METHODS
from apimeta.models.stages import feature_stages
from apimeta.recovery import Boundary, Objective, SupportCE
from apimeta.run_config import schedule_point
from apimeta.transforms import augment, crop_flip, parse_augment

log = logging.getLogger(__name__)


@METHODS.register("bidf-mkd")
class BiDfMKD(APILearner):
    """BiDf-MKD on a zoo of black-box APIs (see the module docstring)."""

    name = "bidf-mkd"
    reads: ClassVar[tuple[str, ...]] = ("recovery", "zo", "kd", "events", "memory", "http", "eval")
    ablations: ClassVar[tuple[str, ...]] = (
        "no-boundary",
        "no-memory",
        "white-box",
        "diverse-memory",
        "scheduled",
        "augmented-memory",
        "interpolated-memory",
        "fast-recovery",
        "shared-generator",
        "ema",
        "cosine-lr",
        "diverse-recovery",
        "diverse-pixels",
        "large-inner-lr",
        "random-head",
    )

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.recovery.source != "generator":
            raise ConfigError(
                f"recovery.source {cfg.recovery.source!r} is for bbkd; bidf-mkd recovers "
                "class-conditional support and query sets with the generator (recovery.source: "
                "generator)"
            )
        for section, key in (
            ("kd", "contrastive"), ("kd", "union_ce"), ("kd", "grey"), ("kd", "cosine_head"),
            ("kd", "manifold_mixup"), ("kd", "forget_every"), ("kd", "freeze_stages"),
            ("kd", "born_again"), ("kd", "contrastive_low"), ("recovery", "mixups"),
        ):  # fmt: skip
            value = getattr(getattr(cfg, section), key)
            if value:
                raise ConfigError(
                    f"{section}.{key} ({value}) is for bbkd; set it to 0 for bidf-mkd"
                )
        if cfg.kd.unanswered:
            raise ConfigError(
                f"kd.unanswered ({','.join(cfg.kd.unanswered)}) is for bbkd on a procedural "
                "recovery.source; bidf-mkd learns from every API's answers, leave it empty"
            )
        if cfg.kd.distill != 1.0:
            raise ConfigError(
                f"kd.distill ({cfg.kd.distill}) is for bbkd; bidf-mkd's KD is its bi-level loss, "
                "leave kd.distill at 1"
            )
        self.setup_apis()
        self.memory = TaskMemory(
            cfg.memory.mem_batches, cfg.memory.quantize_uint8, device=self.device
        )
        self.in_channels = int(self.spec["in_channels"])
        per_event = 2 * cfg.recovery.per_class
        if cfg.memory.enabled and per_event < cfg.shot + cfg.query:
            raise ConfigError(
                f"one API event stores {per_event} images per class, fewer than the "
                f"{cfg.shot + cfg.query} a {cfg.shot}-shot {cfg.query}-query memory task needs; "
                "raise recovery.per_class"
            )
        self.refuse_unaffordable(self.event_cost)
        total = self.total_updates()
        self.adv_start = schedule_point(cfg.kd.adv_start, total)
        if cfg.kd.adv > 0 and total > 0 and self.adv_start >= total:
            log.warning(
                "kd.adv_start=%d >= the run's %d meta-updates: the boundary term never switches "
                "on (every query set is recovered with CE). Set kd.adv_start below %d (e.g. %d), "
                "a fraction of the run such as 0.25, or kd.adv=0 to say so",
                self.adv_start, total, total, total // 4,
            )  # fmt: skip
        self.schedule = EventSchedule(cfg.events.trigger, cfg.events.patience)
        self.events: list[dict[str, Any]] = []
        self.budget_exhausted = False
        self._warned_boundary = False

    def extra_state(self) -> dict[str, Any]:
        return {
            **self.api_state(),
            "memory": self.memory.state_dict(),
            **self.schedule.state_dict(),
            "events": list(self.events),
            "budget_exhausted": self.budget_exhausted,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.load_api_state(state)
        self.memory.load_state_dict(state["memory"])
        self.schedule.load_state_dict(state)
        self.events = list(state["events"])
        self.budget_exhausted = bool(state["budget_exhausted"])

    def should_stop(self) -> bool:
        if not self.budget_exhausted:
            return False
        if self.cfg.on_budget_exhausted == "stop" or not self.cfg.memory.enabled:
            log.info("query budget exhausted (%s); stopping", self.ledger)
            return True
        return False

    # ------------------------------------------------------------------ helpers
    def event_cost(self, api: BlackBoxAPI) -> int:
        """Worst-case queries of one API event: two recoveries plus the two KD target queries."""
        cfg = self.cfg
        b = cfg.recovery.per_class * api.info.n_classes
        kd = 2 * b if cfg.kd.cache_api_outputs else (cfg.kd.inner_steps + 1) * b
        return 2 * self.recovery_cost(api) + kd

    def query_objective(self, api: BlackBoxAPI, step: int, fast: dict[str, Tensor]) -> Objective:
        """How Q is recovered: the boundary objective against the adapted student once
        ``kd.adv_start`` updates have passed (APIs with logits or probs), else CE (4.5)."""
        cfg = self.cfg
        if cfg.kd.adv <= 0 or step < self.adv_start:
            return SupportCE()
        if output_kind(api.info.output) in ("logits", "probs"):
            return Boundary(frozen_student(self.model, fast, self._to_model), cfg.kd.adv)
        if not self._warned_boundary:
            self._warned_boundary = True
            log.warning(
                "API output %r does not support the boundary term; recovering query sets "
                "with CE only",
                api.info.output,
            )
        return SupportCE()

    # ------------------------------------------------------------------ episodes
    def api_episode(self, step: int) -> tuple[Tensor, Tensor] | None:
        """One API event (docs/design.md 4.1-4.6): (outer KD loss, outer accuracy as a 0-dim
        tensor), or None when the query budget cannot pay for it."""
        cfg = self.cfg
        api = self.pool.draw()
        if not self.ledger.can_afford(self.event_cost(api)):
            self.budget_exhausted = True
            log.info("query budget cannot pay another API event (%s)", self.ledger)
            return None
        used0 = self.ledger.used
        kd = api_kd(api, self.kd, cfg.kd.T)
        aug = self.rng("kd-augment")
        try:
            sup = self.recover_from(api)
            s_aug = crop_flip(sup.images, aug)
            fast = inner_kd(
                self.model,
                self.inner_start(),
                api,
                s_aug,
                kd,
                steps=cfg.kd.inner_steps,
                lr=cfg.inner_lr,
                first_order=cfg.first_order,
                cache_outputs=cfg.kd.cache_api_outputs,
                to_model=self._to_model,
            )
            objective = self.query_objective(api, step, fast)
            qry = self.recover_from(api, objective)
            q_aug = crop_flip(qry.images, aug)
            t_q = api.query(q_aug)
        except QueryBudgetExceeded:
            self.budget_exhausted = True
            return None
        if sup.budget_exhausted or qry.budget_exhausted:
            self.budget_exhausted = True
            return None
        loss, logits = outer_kd_loss(self.model, fast, q_aug, t_q, kd, self._to_model)
        acc = (logits.detach().argmax(1) == qry.targets).float().mean()
        # the API's verdict on the query set (from the KD targets already queried)
        keep = t_q.argmax(1) == qry.targets
        if not cfg.memory.filter_query:
            keep = torch.ones_like(keep)
        episode = self.episode_of(api, sup, qry, keep)
        if cfg.memory.enabled:
            self.memory.add_episode(episode)
        with torch.no_grad():  # no queries: the learner's own features, and raw pixels
            feats = head_features(self.model, named_params(self.model), self._to_model(sup.images))
            diversity = torch.stack(
                [
                    within_class_diversity(feats, sup.targets),
                    within_class_diversity(sup.images, sup.targets),
                ]
            ).tolist()
        record = {
            "event": len(self.events),
            "step": step,
            "api": api.info.name,
            "arch": str(api.info.tags.get("arch", "")),
            "dataset": api.info.dataset,
            "queries": self.ledger.used - used0,
            "fidelity_support": sup.fidelity,
            "fidelity_query": qry.fidelity,
            "diversity_support": diversity[0],  # mean pairwise 1 - cos within a class, features
            "diversity_support_pixels": diversity[1],  # the same on raw pixels
            "query_mode": objective.mode,
            "outer_acc": float(acc),  # an API event syncs anyway (its records, its queries)
            "query_stored": int(keep.sum()) if cfg.memory.enabled else 0,
        }
        self.events.append(record)
        self.record_event(
            APIEvent(
                len(self.events) - 1,
                episode,
                {**record, "step": step + 1, "queries_total": self.ledger.used},
            )
        )
        log.debug("API event %s", record)
        return loss, acc

    def _memory_task(self) -> Episode:
        """One replayed memory task (augmented if ``memory.augment``); EpisodeError if the
        memory cannot build one yet."""
        cfg = self.cfg
        ep = self.memory.sample_task(
            cfg.way,
            cfg.shot,
            cfg.query,
            self.rng("memory-tasks"),
            image_size=cfg.image_size,
            channels=self.in_channels,
        ).to(self.device)
        names = parse_augment(cfg.memory.augment)
        if names:  # same shapes and labels: assigned in place, no re-validation (no host sync)
            g = self.rng("memory-augment")
            ep.support_x = augment(ep.support_x, names, g)
            ep.query_x = augment(ep.query_x, names, g)
        return ep

    def memory_episode(self) -> tuple[Episode, Mix | None] | None:
        """A task to replay and, with probability ``memory.interpolate``, the mix that makes it
        the interpolation of two memory tasks (MLTI; :mod:`apimeta.interpolation`); None when
        the memory is off or cannot build a task yet."""
        cfg = self.cfg
        if not cfg.memory.enabled:
            return None
        try:
            ep = self._memory_task()
            if not cfg.memory.interpolate:
                return ep, None
            g = self.rng("memory-interpolate")
            if float(torch.rand(1, generator=g)) >= cfg.memory.interpolate:
                return ep, None
            mix = draw_mix(len(feature_stages(self.model)), cfg.memory.interpolate_alpha, g)
            return pair_tasks(ep, self._memory_task(), mix), mix
        except EpisodeError:
            return None

    # ------------------------------------------------------------------ one meta-update
    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        total: Tensor | None = None
        accs: list[Tensor] = []
        n_api = n_mem = 0
        for _ in range(cfg.meta_batch):
            res = None
            want_api = (
                self.schedule.due
                or not cfg.memory.enabled
                or len(self.memory.classes()) < cfg.memory.min_classes
            )
            if want_api and not self.budget_exhausted:
                res = self.api_episode(step)
                if res is not None:
                    self.schedule.event_done()
                    n_api += 1
            if res is None:
                task = self.memory_episode()
                if task is None and not self.budget_exhausted:
                    res = self.api_episode(step)  # memory too small yet: learn from an API
                    n_api += res is not None
                elif task is not None:
                    ep, mix = task
                    with mixing(self.model, mix) if mix else contextlib.nullcontext():
                        out = maml_outer_loss(
                            self.model,
                            self.inner_start(),
                            ep,
                            steps=cfg.inner_steps,
                            lr=cfg.inner_lr,
                            first_order=cfg.first_order,
                        )
                    res = (out.loss, out.acc)
                    n_mem += 1
            if res is None:
                continue
            total = res[0] if total is None else total + res[0]
            accs.append(res[1])
        if total is None:
            if self.budget_exhausted:
                # nothing left to learn from: a zero loss keeps the loop consistent; should_stop
                # ends the run after this update when the memory is off or on_budget=stop
                total = sum(p.sum() * 0.0 for p in self.model.parameters())
            else:
                raise EpisodeError("no episode could be built (empty memory and no API event)")
        acc = _mean(accs)
        self.schedule.update(acc)
        return total, {
            "train_acc": 100.0 * acc,
            "api_episodes": n_api,
            "memory_episodes": n_mem,
            "api_events": len(self.events),
            "queries": self.ledger.used,
            "memory_classes": len(self.memory.classes()),
        }


def _mean(accs: list[Tensor]) -> float:
    """The mean of 0-dim accuracies in one host sync, summed in Python doubles as before."""
    return sum(torch.stack(accs).tolist()) / len(accs) if accs else 0.0


__all__ = ["BiDfMKD"]
