"""``APILearner``: what every method that learns from a zoo of black-box APIs shares.

``setup_apis`` builds the ledger (``cfg.query_budget``), the APIs of ``cfg.zoo`` (with the
optional query cache, :mod:`apimeta.apis.runtime`), the scenario's :class:`APIPool`, the
recovery's gradient source (ZO estimator, or white-box with ``zo.enabled=false``) and the KD
loss; :meth:`APILearner.recover_from` runs one recovery with the run's settings
(``recovery.meta_step`` > 0: from a generator shared across APIs, moved toward each recovery's
adapted weights by a Reptile step, as in FREE; saved with the ledger for resume). A failed API
call inside a meta-update rolls the update back, keeping the ledger (its images were sent and
paid), and raises :class:`~apimeta.errors.APIUnavailableError` (``resumable_errors``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from apimeta.apis.base import BlackBoxAPI
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.runtime import cache_mark, load_run_apis, resume_cache_billing, run_query_cache
from apimeta.episodes import APIEpisode
from apimeta.errors import APIError, ConfigError
from apimeta.evaluate import head_features
from apimeta.losses import kd_loss
from apimeta.maml import named_params
from apimeta.memory import within_class_diversity
from apimeta.methods.trainer import MetaTrainer
from apimeta.models.generator import Generator, reset_parameters
from apimeta.recovery import Objective, Recovered, SupportCE, gradient_source, recover
from apimeta.scenarios import APIPool
from apimeta.seeding import make_generator
from apimeta.transforms import resize
from apimeta.zo import ZOEstimator, build_estimator

log = logging.getLogger(__name__)


class APILearner(MetaTrainer):
    """A :class:`MetaTrainer` that learns from black-box APIs (see the module docstring).

    Attributes after :meth:`setup_apis`: ``ledger``, ``apis``, ``query_cache`` (or None),
    ``pool``, ``estimator`` (None for white-box), ``kd`` (the KD loss function).
    """

    resumable_errors = (APIError,)
    reads: ClassVar[tuple[str, ...]] = ("recovery", "zo", "kd", "http", "eval")
    queries_apis = True

    def setup_apis(self) -> None:
        cfg = self.cfg
        self.ledger = QueryLedger(cfg.query_budget)
        self.apis = load_run_apis(cfg, self.ledger, self.run.path)
        self.query_cache = run_query_cache(self.apis)
        self.pool = APIPool(self.apis, cfg.scenario, self.rng("api-draws"))
        self.estimator: ZOEstimator | None = build_estimator(cfg.zo) if cfg.zo.enabled else None
        self.kd = kd_loss(cfg.kd.loss)
        # recovery.meta_step: the shared generators by input spec ("32x3") and working copies
        self.shared_generators: dict[str, Generator] = {}
        self._adapted: dict[str, Generator] = {}
        if not cfg.zo.enabled:
            log.warning("zo.enabled=false: WHITE-BOX recovery (true gradients); not black-box")
            for api in self.apis:  # fail now, not at the first event
                gradient_source(None, api, white_box=True)

    def refuse_unaffordable(self, event_cost: Callable[[BlackBoxAPI], int]) -> None:
        """A fresh run whose budget cannot pay for one API event (worst case, the cheapest API)
        would make no query and learn nothing: refuse it before it starts, saying what it needs."""
        cheapest = min(event_cost(api) for api in self.apis)
        if self.ledger.used == 0 and not self.ledger.can_afford(cheapest):
            raise ConfigError(
                f"query_budget {self.ledger.budget} cannot pay for one API event, which costs up "
                f"to {cheapest:,} queries with these settings (two recoveries of "
                f"recovery.iters={self.cfg.recovery.iters} x recovery.per_class="
                f"{self.cfg.recovery.per_class} x classes x (1 + zo.q) plus the KD targets); "
                f"raise --query-budget to at least {cheapest} or lower recovery.iters, zo.q or "
                "recovery.per_class"
            )

    def api_state(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "cache_mark": cache_mark(self.query_cache),
            "shared_generators": {
                k: {n: v.detach().cpu().clone() for n, v in g.state_dict().items()}
                for k, g in self.shared_generators.items()
            },
        }

    def load_api_state(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        resume_cache_billing(self.query_cache, state.get("cache_mark"))
        saved = state.get("shared_generators", {})
        for key in {*saved, *self.shared_generators}:
            gen = self._shared_generator(key)
            if key in saved:
                gen.load_state_dict(saved[key])
            else:  # built after the state was saved (a rolled-back update): back to its init
                reset_parameters(gen, self._shared_init(key))

    def _shared_init(self, key: str) -> torch.Generator:
        return make_generator(self.cfg.seed, self.name, "shared-generator", key)

    def _shared_generator(self, key: str) -> Generator:
        """The generator shared by every API whose input spec is ``key`` (``"SIZExCHANNELS"``,
        ``recovery.meta_step``), built on first use with the recovery init from a seed of its
        own, and its working copy (``_adapted[key]``)."""
        if key not in self.shared_generators:
            rc = self.cfg.recovery
            size, channels = (int(v) for v in key.split("x"))
            with torch.random.fork_rng(devices=[]):  # construction must not move the global RNG
                gen = Generator(nz=rc.nz, ngf=rc.ngf, image_size=size, channels=channels)
                work = Generator(nz=rc.nz, ngf=rc.ngf, image_size=size, channels=channels)
            reset_parameters(gen, self._shared_init(key))
            self.shared_generators[key] = gen.to(self.device)
            self._adapted[key] = work.to(self.device)
        return self.shared_generators[key]

    def _recover_shared(self, api: BlackBoxAPI, run: Callable[[Generator], Recovered]) -> Recovered:
        """``run`` on a working copy of the shared generator of the API's input spec, then the
        Reptile step: every float entry of the shared state moves ``recovery.meta_step`` of the
        way to the adapted one (integer counters are copied). No step when the recovery ran out
        of budget (its images are kept; the half-trained weights are not learned from)."""
        key = f"{int(api.info.image_size)}x{int(api.info.channels)}"
        shared = self._shared_generator(key)
        work = self._adapted[key]  # one object: a compiled generator compiles once
        work.load_state_dict(shared.state_dict())
        rec = run(work)
        if not rec.budget_exhausted:
            adapted = work.state_dict()
            with torch.no_grad():
                for name, v in shared.state_dict().items():
                    if v.is_floating_point():
                        v.lerp_(adapted[name], self.cfg.recovery.meta_step)
                    else:
                        v.copy_(adapted[name])
        return rec

    def rollback_update(self, extra: dict[str, Any]) -> None:
        """Undo a failed meta-update but keep the ledger: its images were sent (and paid).
        With a query cache, the rows the kept ledger already counts are settled."""
        sent = self.ledger.state_dict()
        self.load_extra_state({**extra, "cache_mark": None})  # keep the cache's billing state
        self.ledger.load_state_dict(sent)
        if self.query_cache is not None and extra.get("cache_mark") is not None:
            self.query_cache.settle_after(int(extra["cache_mark"]))

    def recover_from(
        self,
        api: BlackBoxAPI,
        objective: Objective | None = None,
        final_query: bool = False,
    ) -> Recovered:
        """One recovery from ``api`` with the run's settings (``cfg.recovery``, the gradient
        source, RNG ``recovery``). ``objective``: default :class:`SupportCE`.
        ``final_query=False``: callers query the augmented view themselves (4.4, 4.6)."""

        def run(generator: Generator | None = None) -> Recovered:
            return recover(
                api,
                self.cfg.recovery,
                rng=self.rng("recovery"),
                gradient=gradient_source(self.estimator, api, white_box=not self.cfg.zo.enabled),
                objective=objective if objective is not None else SupportCE(),
                generator=generator,
                final_query=final_query,
                device=self.device,
                regularizer=self.diversity_term() if self.cfg.recovery.diversity > 0 else None,
            )

        if self.cfg.recovery.meta_step > 0:
            return self._recover_shared(api, run)
        return run()

    def _to_model(self, x: Tensor) -> Tensor:
        """API-spec images -> the meta-model's input size (channels adapt inside the model)."""
        return resize(x, self.cfg.image_size)

    def diversity_term(self) -> Callable[[Tensor, Tensor], Tensor]:
        """``recovery.diversity`` x -(within-class diversity of the generator's images): a
        recovery regularizer that pushes one class's images apart, as the learner sees them
        (``recovery.diversity_space=features``: the meta-model's penultimate features, its
        weights held fixed) or in ``pixels``. Differentiable in the images; no queries."""
        params = {n: p.detach() for n, p in named_params(self.model).items()}
        weight = self.cfg.recovery.diversity
        pixels = self.cfg.recovery.diversity_space == "pixels"

        def term(x_hat: Tensor, targets: Tensor) -> Tensor:
            feats = x_hat if pixels else head_features(self.model, params, self._to_model(x_hat))
            return -weight * within_class_diversity(feats, targets)

        return term

    @staticmethod
    def episode_of(
        api: BlackBoxAPI, support: Recovered, query: Recovered, keep: Tensor | None = None
    ) -> APIEpisode:
        """The :class:`APIEpisode` of two recoveries from ``api`` (``keep``: query images the
        memory may store; default all)."""
        return APIEpisode(
            api=api.info.name,
            dataset=api.info.dataset,
            classes=api.info.classes,
            support_x=support.images,
            support_y=support.targets,
            query_x=query.images,
            query_y=query.targets,
            query_keep=keep
            if keep is not None
            else torch.ones_like(query.targets, dtype=torch.bool),
        )

    def recovery_cost(self, api: BlackBoxAPI) -> int:
        """Worst-case queries of one recovery (no early stop), final query excluded."""
        b = self.cfg.recovery.per_class * api.info.n_classes
        per_iter = b if self.estimator is None else self.estimator.cost(b)
        return self.cfg.recovery.iters * per_iter


__all__ = ["APILearner"]
