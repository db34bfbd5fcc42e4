"""``bidf-mkd``: Bi-level Data-free Meta Knowledge Distillation from black-box APIs.

The method of Hu et al. (ICML 2023) as specified in method.md, with our corrections
(proper KL, true-loss iterate selection, cached API outputs, meta-val selection, query budget).

One meta-update sums ``cfg.meta_batch`` episode losses (method.md 4.8). An episode is either

* an **API episode** (the first one, then one whenever memory-task accuracy has not improved for
  ``cfg.api_patience`` meta-updates): draw an API for the scenario, recover a support set S by
  zero-order inversion (CE), adapt the meta-model by ``kd_inner_steps`` KD steps on S (inner
  level), recover a query set Q near the adapted model's decision boundary (past ``adv_start``),
  and distil the API into the adapted model on Q (outer level; the meta-gradient flows through
  the inner steps). S and Q go into the task memory under the API's global class ids; or
* a **memory episode**: an interpolated N-way task composed across APIs from the task memory,
  trained with MAML + CE.

Ablations: ``adv=0`` (no boundary term), ``memory.enabled=false`` (no replay: every episode is an
API episode until the budget runs out), ``zo.enabled=false`` (white-box recovery with true
gradients through local APIs; an upper bound, NOT black-box).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from apimeta.apis.base import BlackBoxAPI
from apimeta.apis.cache import QueryCache
from apimeta.apis.ledger import QueryLedger
from apimeta.episodes import Episode
from apimeta.errors import APIError, ConfigError, EpisodeError, QueryBudgetExceeded
from apimeta.losses import kd_loss, output_kind
from apimeta.maml import functional_forward, inner_adapt, maml_outer_loss, named_params
from apimeta.memory import TaskMemory
from apimeta.methods.base import MetaTrainer, dataset_names
from apimeta.recovery import Recovered, recover
from apimeta.report import save_image_grid
from apimeta.scenarios import APIPool
from apimeta.seeding import derive_seed
from apimeta.transforms import crop_flip, resize
from apimeta.zo import ZOEstimator, build_estimator

log = logging.getLogger(__name__)


def http_client_options(cfg: Any) -> dict[str, Any]:
    """``HttpAPI`` keyword arguments from ``cfg.http`` (the API key read from ``api_key_file``;
    without one, ``HttpAPI`` reads ``$APIMETA_API_KEY``)."""
    h = cfg.http
    opts: dict[str, Any] = {
        "timeout": h.timeout,
        "max_retries": h.max_retries,
        "backoff": h.backoff,
        "max_backoff": h.max_backoff,
        "concurrency": h.concurrency,
        "bill_retries": h.bill_retries,
        "seed": derive_seed(cfg.seed, "http-jitter"),
    }
    if h.api_key_file:
        path = Path(h.api_key_file).expanduser()
        try:
            key = path.read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"cannot read http.api_key_file {path}: {e.strerror}; give a file holding the "
                "server's API key (or set $APIMETA_API_KEY)"
            ) from None
        if not key:
            raise ConfigError(f"http.api_key_file {path} is empty; put the API key in it")
        opts["api_key"] = key
    return opts


def query_cache_path(cfg: Any, run_dir: str | Path | None) -> Path | None:
    """Where ``cfg.http.query_cache`` puts the query cache (``"auto"``: in the run directory)."""
    where = cfg.http.query_cache
    if not where:
        return None
    if where == "auto":
        if run_dir is None:
            raise ConfigError("http.query_cache=auto needs the run directory; give a path instead")
        return Path(run_dir) / "query-cache.sqlite"
    return Path(where).expanduser()


def load_run_apis(
    cfg: Any, ledger: QueryLedger, run_dir: str | Path | None = None
) -> list[BlackBoxAPI]:
    """The zoo of ``cfg.zoo`` (directory, ONNX folder or http(s) URL) behind one ledger.

    HTTP zoos use the client settings of ``cfg.http``; ``cfg.http.query_cache`` (any zoo) adds
    an on-disk query cache (``"auto"``: ``<run_dir>/query-cache.sqlite``).
    """
    from apimeta.apis.zoo import load_zoo

    if not cfg.zoo:
        raise ConfigError(
            "this method learns from APIs: pass --zoo DIR (build one with `apimeta zoo build`) "
            "or --zoo http://host:port (a server started with `apimeta serve`)"
        )
    is_http = str(cfg.zoo).startswith(("http://", "https://"))
    options = http_client_options(cfg) if is_http else {}
    cache_path = query_cache_path(cfg, run_dir)
    apis = load_zoo(
        cfg.zoo,
        ledger=ledger,
        output=cfg.api_output,
        device=cfg.device,
        cache=QueryCache(cache_path) if cache_path is not None else None,
        **options,
    )
    wanted = set(dataset_names(cfg))
    have = {a.info.dataset for a in apis}
    if not have & wanted:
        raise ConfigError(
            f"the zoo's APIs cover datasets {sorted(have)}, but the run evaluates on "
            f"{sorted(wanted)}; pass --dataset {','.join(sorted(have))}"
        )
    if have - wanted:
        log.warning("zoo datasets %s are not evaluated (run datasets: %s)", have - wanted, wanted)
    return apis


def run_query_cache(apis: list[BlackBoxAPI]) -> QueryCache | None:
    """The :class:`QueryCache` behind ``apis`` (None without one)."""
    return next((a.cache for a in apis if getattr(a, "cache", None) is not None), None)  # type: ignore[attr-defined]


def cache_mark(cache: QueryCache | None) -> int:
    """What a checkpoint stores about the query cache: its newest row id (-1: no cache)."""
    return cache.high_water() if cache is not None else -1


def resume_cache_billing(cache: QueryCache | None, mark: int | None) -> None:
    """On resume from a checkpoint holding ``mark``: bill cache hits on rows stored after it
    (answered after the checkpoint, so paid but missing from the restored ledger)."""
    if cache is not None and mark is not None:
        cache.set_bill_after(int(mark) if int(mark) >= 0 else None)


def rollback_keeping_ledger(method: Any, extra: dict[str, Any]) -> None:
    """``load_extra_state(extra)`` except the ledger, which keeps what was actually sent.

    Why resuming does not pay twice or lose count (HTTP zoos): a failed or killed meta-update is
    redone from ``last.pt`` with the generator states from its start, so it recovers the same
    images and sends the same queries.

    * Failed update (server down past the retry policy): rolled back in memory with the ledger
      as it is, so images sent during it stay counted; with a query cache the redo takes the
      answers it already got from the cache (not billed again). Re-sent: only the request that
      failed.
    * SIGKILL: the ledger comes from the last checkpoint, so images sent after it were paid to
      the server but are missing from it. With a query cache (``http.query_cache``) every answer
      received before the kill was stored (one SQLite transaction per batch), so the redo takes
      it from the cache without sending it; and since the checkpoint holds the cache's newest row
      id (:func:`cache_mark`), those hits on rows stored after the checkpoint are charged to the
      ledger once (:meth:`QueryCache.owed`): the ledger again counts every image the server was
      paid for, except requests in flight at the kill (at most ``http.concurrency``), whose
      answers never arrived: those are paid twice and counted once. Without a cache, everything
      sent after the checkpoint is paid twice (counted once).
    """
    sent = method.ledger.state_dict()
    method.load_extra_state({**extra, "cache_mark": None})  # keep the cache's billing state
    method.ledger.load_state_dict(sent)
    cache = getattr(method, "query_cache", None)
    if cache is not None and extra.get("cache_mark") is not None:
        cache.settle_after(int(extra["cache_mark"]))  # the kept ledger counts those rows


class APILearner(MetaTrainer):
    """Shared machinery of methods that learn from a zoo of black-box APIs.

    ``setup_apis`` builds the ledger (``cfg.query_budget``), the APIs (with the optional query
    cache), the scenario's :class:`APIPool`, the ZO estimator and the KD loss; ``recover_from``
    runs one recovery with the run's settings. A failed API call inside a meta-update rolls the
    update back (keeping the ledger) and raises :class:`APIUnavailableError` (``resumable_errors``).
    """

    resumable_errors = (APIError,)

    def setup_apis(self) -> None:
        cfg = self.cfg
        self.ledger = QueryLedger(cfg.query_budget)
        self.apis = load_run_apis(cfg, self.ledger, self.run.path)
        self.query_cache = run_query_cache(self.apis)
        self.pool = APIPool(self.apis, cfg.scenario, self.generator("api-draws"))
        self.estimator: ZOEstimator | None = build_estimator(cfg.zo) if cfg.zo.enabled else None
        self.kd = kd_loss(cfg.kd_loss)
        if not cfg.zo.enabled:
            log.warning("zo.enabled=false: WHITE-BOX recovery (true gradients); not black-box")
            for api in self.apis:
                if not hasattr(api, "white_box_model"):
                    raise ConfigError(
                        f"white-box recovery needs in-process APIs; {api.info.name!r} is "
                        f"{type(api).__name__}. Use a local zoo directory or zo.enabled=true."
                    )

    def api_state(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "cache_mark": cache_mark(self.query_cache)}

    def load_api_state(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        resume_cache_billing(self.query_cache, state.get("cache_mark"))

    def rollback_update(self, extra: dict[str, Any]) -> None:
        """Undo a failed meta-update but keep the ledger: its images were sent (and paid)."""
        rollback_keeping_ledger(self, extra)

    def recover_from(
        self,
        api: BlackBoxAPI,
        mode: str = "support",
        student: Callable[[Tensor], Tensor] | None = None,
        final_query: bool = False,
    ) -> Recovered:
        """One recovery from ``api`` with the run's settings (white-box when ``zo.enabled`` is
        off). ``final_query=False``: callers query the augmented view themselves (4.4, 4.6)."""
        cfg = self.cfg
        white = not cfg.zo.enabled
        return recover(
            api,
            generator=self.generator("recovery"),
            n_per_class=cfg.recover_per_class,
            iters=cfg.recover_iters,
            mode=mode,
            student=student,
            adv=cfg.adv,
            estimator=self.estimator,
            gen_lr=cfg.gen_lr,
            nz=cfg.nz,
            ngf=cfg.ngf,
            best_iterate=cfg.best_iterate,
            early_stop_prob=cfg.early_stop_prob,
            white_box=white,
            white_box_model=api.white_box_model() if white else None,  # type: ignore[attr-defined]
            final_query=final_query,
            device=self.device,
        )

    def recovery_cost(self, api: BlackBoxAPI) -> int:
        """Worst-case queries of one recovery (no early stop), final query excluded."""
        b = self.cfg.recover_per_class * api.info.n_classes
        per_iter = b if self.estimator is None else self.estimator.cost(b)
        return self.cfg.recover_iters * per_iter


class BiDfMKD(APILearner):
    """BiDf-MKD on a zoo of black-box APIs (see the module docstring)."""

    name = "bidf-mkd"

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.setup_apis()
        self.memory = TaskMemory(cfg.memory.mem_batches, cfg.memory.quantize_uint8)
        self.in_channels = int(self.spec["in_channels"])
        if cfg.memory.enabled and cfg.recover_per_class * 2 < cfg.shot + cfg.query:
            raise ConfigError(
                f"one API event stores {2 * cfg.recover_per_class} images per class, fewer than "
                f"the {cfg.shot + cfg.query} a {cfg.shot}-shot {cfg.query}-query memory task "
                "needs; raise recover_per_class"
            )
        # plateau-triggered API events (method.md 4.8)
        if cfg.event_trigger not in ("plateau", "every"):
            raise ConfigError(
                f"event_trigger must be 'plateau' or 'every', got {cfg.event_trigger!r}"
            )
        self.event_due = True
        self.running_max = -1.0
        self.plateau = 0
        self.events: list[dict[str, Any]] = []
        self.budget_exhausted = False
        self._warned_boundary = False

    def extra_state(self) -> dict[str, Any]:
        return {
            **self.api_state(),
            "memory": self.memory.state_dict(),
            "event_due": self.event_due,
            "running_max": self.running_max,
            "plateau": self.plateau,
            "events": list(self.events),
            "budget_exhausted": self.budget_exhausted,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.load_api_state(state)
        self.memory.load_state_dict(state["memory"])
        self.event_due = bool(state["event_due"])
        self.running_max = float(state["running_max"])
        self.plateau = int(state["plateau"])
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
    def _to_model(self, x: Tensor) -> Tensor:
        """API-spec images -> the meta-model's input size (channels adapt inside the model)."""
        return resize(x, self.cfg.image_size)

    def _kd_fn(self, api: BlackBoxAPI) -> Callable[[Tensor, Tensor], Tensor]:
        is_probs = output_kind(api.info.output) != "logits"
        T = self.cfg.kd_T

        def fn(logits: Tensor, teacher: Tensor) -> Tensor:
            return self.kd(logits, teacher, T=T, teacher_is_probs=is_probs)

        return fn

    def event_cost(self, api: BlackBoxAPI) -> int:
        """Worst-case queries of one API event: two recoveries plus the two KD target queries."""
        b = self.cfg.recover_per_class * api.info.n_classes
        kd = 2 * b if self.cfg.cache_api_outputs else (self.cfg.kd_inner_steps + 1) * b
        return 2 * self.recovery_cost(api) + kd

    # ------------------------------------------------------------------ episodes
    def api_episode(self, step: int) -> tuple[Tensor, float] | None:
        """One API event (method.md 4.1-4.6); None when the query budget cannot pay for it."""
        cfg = self.cfg
        api = self.pool.draw()
        if not self.ledger.can_afford(self.event_cost(api)):
            self.budget_exhausted = True
            log.info("query budget cannot pay another API event (%s)", self.ledger)
            return None
        used0 = self.ledger.used
        kd = self._kd_fn(api)
        aug = self.generator("kd-augment")
        try:
            sup = self.recover_from(api, "support")
            s_aug = crop_flip(sup.images, aug)
            # inner level: KD on the support set; API outputs queried once and cached (4.4)
            if cfg.cache_api_outputs:
                t_s = api.query(s_aug)
                inner_loss = kd
            else:  # reference behaviour: the API is re-queried at every inner step

                def inner_loss(logits: Tensor, _: Tensor | None) -> Tensor:
                    return kd(logits, api.query(s_aug))

                t_s = None
            theta = named_params(self.model)
            fast = inner_adapt(
                self.model,
                theta,
                self._to_model(s_aug),
                t_s,
                loss_fn=inner_loss,
                steps=cfg.kd_inner_steps,
                lr=cfg.inner_lr,
                first_order=cfg.first_order,
            )
            # boundary query set (4.5), against the adapted student held fixed
            mode = "support"
            if cfg.adv > 0 and step >= cfg.adv_start:
                if output_kind(api.info.output) in ("logits", "probs"):
                    mode = "boundary"
                elif not self._warned_boundary:
                    self._warned_boundary = True
                    log.warning(
                        "API output %r does not support the boundary term; recovering query "
                        "sets with CE only",
                        api.info.output,
                    )
            frozen = {k: v.detach() for k, v in fast.items()}

            def student(x: Tensor) -> Tensor:
                with torch.no_grad():
                    return functional_forward(self.model, frozen, self._to_model(x))

            qry = self.recover_from(api, mode, student if mode == "boundary" else None)
            q_aug = crop_flip(qry.images, aug)
            t_q = api.query(q_aug)
        except QueryBudgetExceeded:
            self.budget_exhausted = True
            return None
        if sup.budget_exhausted or qry.budget_exhausted:
            self.budget_exhausted = True
            return None
        # outer level: KD on the boundary query set through the adapted weights (4.6)
        logits = functional_forward(self.model, fast, self._to_model(q_aug))
        loss = kd(logits, t_q)
        acc = float((logits.detach().argmax(1) == qry.targets).float().mean())
        # the API's verdict on the query set (from the KD targets already queried)
        q_keep = t_q.argmax(1) == qry.targets
        if not cfg.memory.filter_query:
            q_keep = torch.ones_like(q_keep)
        if cfg.memory.enabled:
            for rec, keep in ((sup, torch.ones_like(q_keep)), (qry, q_keep)):
                for i, cid in enumerate(api.info.classes):
                    images = rec.images[(rec.targets == i) & keep]
                    if len(images):
                        self.memory.add((api.info.dataset, int(cid)), images)
        event = {
            "event": len(self.events),
            "step": step,
            "api": api.info.name,
            "arch": str(api.info.tags.get("arch", "")),
            "dataset": api.info.dataset,
            "queries": self.ledger.used - used0,
            "fidelity_support": sup.fidelity,
            "fidelity_query": qry.fidelity,
            "query_mode": mode,
            "outer_acc": acc,
            "query_stored": int(q_keep.sum()) if cfg.memory.enabled else 0,
        }
        self.events.append(event)
        # logged under the meta-update it belongs to (as train records count), so a resume
        # from the checkpoint before that update drops it with the update
        self.run.log(
            {"phase": "event", **event, "step": step + 1, "queries_total": self.ledger.used}
        )
        grid = torch.cat([sup.images[sup.targets == i][:8] for i in range(api.info.n_classes)])
        save_image_grid(grid, self.run.file(f"recovered/event-{len(self.events) - 1:04d}.png"), 8)
        log.debug("API event %s", event)
        return loss, acc

    def memory_episode(self) -> Episode | None:
        cfg = self.cfg
        if not cfg.memory.enabled:
            return None
        try:
            ep = self.memory.sample_task(
                cfg.way,
                cfg.shot,
                cfg.query,
                self.generator("memory-tasks"),
                image_size=cfg.image_size,
                channels=self.in_channels,
            )
        except EpisodeError:
            return None
        return ep.to(self.device)

    # ------------------------------------------------------------------ one meta-update
    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, Any]]:
        cfg = self.cfg
        total: Tensor | None = None
        accs: list[float] = []
        n_api = n_mem = 0
        for _ in range(cfg.meta_batch):
            res = None
            want_api = (
                self.event_due
                or not cfg.memory.enabled
                or len(self.memory.classes()) < cfg.memory.min_classes
            )
            if want_api and not self.budget_exhausted:
                res = self.api_episode(step)
                if res is not None:
                    self.event_due = False
                    n_api += 1
            if res is None:
                ep = self.memory_episode()
                if ep is None and not self.budget_exhausted:
                    res = self.api_episode(step)  # memory too small yet: learn from an API
                    n_api += res is not None
                elif ep is not None:
                    out = maml_outer_loss(
                        self.model,
                        None,
                        ep,
                        steps=cfg.inner_steps,
                        lr=cfg.inner_lr,
                        first_order=cfg.first_order,
                    )
                    res = (out.loss, out.accuracy)
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
        acc = sum(accs) / len(accs) if accs else 0.0
        self._update_plateau(acc)
        return total, {
            "train_acc": 100.0 * acc,
            "api_episodes": n_api,
            "memory_episodes": n_mem,
            "api_events": len(self.events),
            "queries": self.ledger.used,
            "memory_classes": len(self.memory.classes()),
        }

    def _update_plateau(self, acc: float) -> None:
        """method.md 4.8: an API event is due after ``api_patience`` updates without a new max
        (``event_trigger: every``: after ``api_patience`` updates, whatever the accuracy)."""
        if self.cfg.event_trigger == "plateau" and acc > self.running_max:
            self.running_max, self.plateau = acc, 0
            return
        self.plateau += 1
        if self.plateau >= self.cfg.api_patience:
            self.event_due = True
            self.running_max, self.plateau = -1.0, 0


__all__ = [
    "APILearner",
    "BiDfMKD",
    "cache_mark",
    "http_client_options",
    "load_run_apis",
    "query_cache_path",
    "resume_cache_billing",
    "rollback_keeping_ledger",
    "run_query_cache",
]


def _register() -> None:
    from apimeta.methods import METHODS

    if BiDfMKD.name not in METHODS:
        METHODS.add(BiDfMKD.name, BiDfMKD)


_register()
