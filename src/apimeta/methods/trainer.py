"""The episodic meta-training loop shared by methods: ``MetaTrainer``.

A method subclasses :class:`MetaTrainer` and fills in hooks::

    @METHODS.register("my-method")
    class MyMethod(MetaTrainer):
        name = "my-method"
        reads = ("eval",)                        # config sections it uses

        def setup(self) -> None:                 # build APIs, generators, memory ...
            self.tasks = self.rng("my-tasks")    # checkpointed automatically

        def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, float]]:
            # SUM of cfg.meta_batch episode losses (docs/design.md 4.8) + scalar metrics to log
            ...

        def extra_state(self) -> dict: ...      # method state (tensors & primitives)
        def load_extra_state(self, state: dict) -> None: ...
        def should_stop(self) -> bool: ...      # e.g. query budget exhausted

``MetaTrainer.train`` owns everything else: the meta-model (``self.model``), Adam
(``self.optimizer``), the meta-update loop, meta-val every ``cfg.eval.every`` episodes with
best-checkpoint selection on ``cfg.eval.select_split``, ``last.pt`` every
``cfg.checkpoint_every`` meta-updates, metrics JSONL, exact resume (the loop's counters are one
:class:`TrainerState`, saved and restored field by field) and the final meta-test.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import signal
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apimeta.apis.base import parse_output_mode
from apimeta.candidates import FOLDER, SOURCES
from apimeta.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from apimeta.config import to_dict
from apimeta.errors import APIUnavailableError, CheckpointError, ConfigError, TrainingInterrupted
from apimeta.evaluate import (
    HEADS,
    check_grid,
    evaluate_with_config,
    format_result,
    meta_test,
    summary_score,
)
from apimeta.events import TRIGGERS, APIEvent, EventHook, save_recovered_grid
from apimeta.losses import CONTRASTIVE_LOSSES, KD_LOSSES
from apimeta.maml import TRAIN_HEADS, named_params, start_inner_head
from apimeta.methods.interface import Method, ProgressFn, TrainResult
from apimeta.models import BACKBONES
from apimeta.models.meta import load_meta_model, load_run_datasets, meta_model_for_datasets
from apimeta.models.stages import check_reinit, stage_param_groups
from apimeta.recovery import ITERATES
from apimeta.registry import Registry
from apimeta.run_config import FREEZE_DRAWS, UNION_SCOPES, RunConfig, schedule_point
from apimeta.runs import RunDir
from apimeta.scenarios import SCENARIOS
from apimeta.seeding import deterministic_kernels, make_generator
from apimeta.transforms import parse_augment
from apimeta.zo import DIRECTIONS, ESTIMATORS

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config checks
#: outer-lr factor at meta-update ``step`` (0-based) of ``total``
OUTER_LR_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda step, total: 1.0,
    "cosine": lambda step, total: 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1))),
}

#: every string choice of RunConfig and where its valid values come from (checked once, here)
CHOICES: dict[str, Callable[[RunConfig], tuple[str, Any]]] = {
    "backbone": lambda c: (c.backbone, BACKBONES),
    "scenario": lambda c: (c.scenario, ("auto", *SCENARIOS)),
    "on_budget_exhausted": lambda c: (c.on_budget_exhausted, ("replay", "stop")),
    "recovery.best_iterate": lambda c: (c.recovery.best_iterate, ITERATES),
    "zo.estimator": lambda c: (c.zo.estimator, ESTIMATORS),
    "zo.directions": lambda c: (c.zo.directions, DIRECTIONS),
    "kd.loss": lambda c: (c.kd.loss, KD_LOSSES),
    "kd.contrastive_loss": lambda c: (c.kd.contrastive_loss, CONTRASTIVE_LOSSES),
    "events.trigger": lambda c: (c.events.trigger, TRIGGERS),
    "eval.select_split": lambda c: (c.eval.select_split, ("val", "test")),
    "eval.head": lambda c: (c.eval.head, HEADS),
    "outer_lr_schedule": lambda c: (c.outer_lr_schedule, OUTER_LR_SCHEDULES),
    "recovery.diversity_space": lambda c: (c.recovery.diversity_space, ("features", "pixels")),
    "train_head": lambda c: (c.train_head, TRAIN_HEADS),
    "recovery.source": lambda c: (c.recovery.source, ("generator", FOLDER, *SOURCES.names())),
}


def check_run_config(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` (one line, naming the key) for a value no component accepts."""
    for key, get in CHOICES.items():
        value, valid = get(cfg)
        names = valid.names() if isinstance(valid, Registry) else list(valid)
        if value not in names:
            raise ConfigError(f"{key} must be one of {', '.join(names)}; got {value!r}")
    parse_output_mode(cfg.api_output)
    parse_augment(cfg.memory.augment)
    if cfg.eval.tune is not None and not isinstance(cfg.eval.tune, dict):
        raise ConfigError(
            f"eval.tune must map keys to value lists, e.g. {{head: [learned, random]}}, or be "
            f"null; got {cfg.eval.tune!r}"
        )
    check_grid(cfg.eval.tune or {})
    checks = [
        (cfg.way >= 2, f"way must be >= 2, got {cfg.way}"),
        (cfg.shot >= 1, f"shot must be >= 1, got {cfg.shot}"),
        (cfg.query >= 1, f"query must be >= 1, got {cfg.query}"),
        (cfg.meta_batch >= 1, f"meta_batch must be >= 1, got {cfg.meta_batch}"),
        (
            cfg.recovery.diversity >= 0,
            f"recovery.diversity must be >= 0 (0 = off), got {cfg.recovery.diversity}",
        ),
        (
            cfg.recovery.candidates >= 1,
            f"recovery.candidates must be >= 1 images per event, got {cfg.recovery.candidates}",
        ),
        (
            cfg.kd.contrastive >= 0,
            f"kd.contrastive must be >= 0 (0 = off), got {cfg.kd.contrastive}",
        ),
        (
            cfg.kd.contrastive_tau > 0,
            f"kd.contrastive_tau must be > 0, got {cfg.kd.contrastive_tau}",
        ),
        (
            not cfg.kd.contrastive_colour or cfg.kd.contrastive > 0,
            "kd.contrastive_colour distorts the contrastive views: set kd.contrastive > 0 too",
        ),
        (
            cfg.recovery.source != FOLDER or bool(cfg.recovery.folder),
            f"recovery.source {FOLDER} needs a folder of unlabelled images: "
            "--set recovery.folder=PATH",
        ),
        (cfg.recovery.mixups >= 0, f"recovery.mixups must be >= 0, got {cfg.recovery.mixups}"),
        (
            0 <= cfg.recovery.meta_step <= 1,
            f"recovery.meta_step must be in [0, 1] (0 = off), got {cfg.recovery.meta_step}",
        ),
        (
            0 <= cfg.memory.interpolate <= 1,
            f"memory.interpolate must be in [0, 1] (0 = off), got {cfg.memory.interpolate}",
        ),
        (
            cfg.memory.interpolate_alpha > 0,
            f"memory.interpolate_alpha must be > 0, got {cfg.memory.interpolate_alpha}",
        ),
        (cfg.kd.union_ce >= 0, f"kd.union_ce must be >= 0 (0 = off), got {cfg.kd.union_ce}"),
        (
            cfg.kd.union_scope in UNION_SCOPES,
            f"kd.union_scope must be one of {', '.join(UNION_SCOPES)}, got {cfg.kd.union_scope!r}",
        ),
        (0 <= cfg.kd.grey <= 1, f"kd.grey must be in [0, 1] (0 = off), got {cfg.kd.grey}"),
        (cfg.kd.distill >= 0, f"kd.distill must be >= 0 (0 = off), got {cfg.kd.distill}"),
        (
            cfg.kd.forget_every >= 0,
            f"kd.forget_every must be >= 0 (0 = off), got {cfg.kd.forget_every}",
        ),
        (
            cfg.kd.freeze_stages >= 0,
            f"kd.freeze_stages must be >= 0 (0 = off), got {cfg.kd.freeze_stages}",
        ),
        (
            cfg.kd.freeze_draw in FREEZE_DRAWS,
            f"kd.freeze_draw must be one of {', '.join(FREEZE_DRAWS)}, got {cfg.kd.freeze_draw!r}",
        ),
        (
            cfg.kd.contrastive_low >= 0,
            f"kd.contrastive_low must be >= 0 (0 = off), got {cfg.kd.contrastive_low}",
        ),
        (
            not cfg.kd.contrastive_low or cfg.kd.contrastive > 0,
            "kd.contrastive_low adds a loss on the contrastive views: set kd.contrastive > 0 too",
        ),
        (
            cfg.kd.contrastive_loss == "nt-xent" or cfg.kd.contrastive > 0,
            f"kd.contrastive_loss {cfg.kd.contrastive_loss!r} is the contrastive loss's "
            "objective: set kd.contrastive > 0 too",
        ),
        (
            cfg.kd.born_again >= 0,
            f"kd.born_again must be >= 0 (0 = off), got {cfg.kd.born_again}",
        ),
        (
            cfg.kd.born_again_weight >= 0,
            f"kd.born_again_weight must be >= 0, got {cfg.kd.born_again_weight}",
        ),
        (cfg.kd.born_again_T > 0, f"kd.born_again_T must be > 0, got {cfg.kd.born_again_T}"),
        (
            not (cfg.kd.born_again and cfg.kd.freeze_stages),
            "kd.born_again re-draws every stage, kd.freeze_stages keeps the top ones; turn one off",
        ),
        (
            not (cfg.kd.born_again and cfg.ema),
            "kd.born_again restarts the model each generation, which an ema of its weights would "
            "mix across; set ema=0",
        ),
        (
            not (cfg.kd.freeze_stages and cfg.kd.forget_every),
            "kd.freeze_stages and kd.forget_every both change the top stages; turn one off",
        ),
        (
            cfg.kd.manifold_mixup >= 0,
            f"kd.manifold_mixup is a Beta(a, a) parameter: >= 0 (0 = off), got "
            f"{cfg.kd.manifold_mixup}",
        ),
        (
            cfg.kd.cosine_head >= 0,
            f"kd.cosine_head is the cosine head's initial scale: >= 0 (0 = off), got "
            f"{cfg.kd.cosine_head}",
        ),
        (
            0 <= cfg.kd.union_ce_min_prob < 1,
            f"kd.union_ce_min_prob must be in [0, 1), got {cfg.kd.union_ce_min_prob}",
        ),
        (0.0 <= cfg.ema < 1.0, f"ema must be in [0, 1) (0 = off), got {cfg.ema}"),
        (cfg.outer_wd >= 0, f"outer_wd must be >= 0 (0 = off), got {cfg.outer_wd}"),
        (cfg.episodes >= 0, f"episodes must be >= 0, got {cfg.episodes}"),
        (cfg.inner_steps >= 0, f"inner_steps must be >= 0, got {cfg.inner_steps}"),
        (cfg.eval.tasks >= 1, f"eval.tasks must be >= 1, got {cfg.eval.tasks}"),
        (
            cfg.eval.every > 0,
            f"eval.every must be > 0 (episodes, or a fraction of the run), got {cfg.eval.every}",
        ),
        (cfg.kd.adv_start >= 0, f"kd.adv_start must be >= 0, got {cfg.kd.adv_start}"),
        (
            cfg.eval.test_lr is None or cfg.eval.test_lr > 0,
            f"eval.test_lr must be > 0, or none for inner_lr; got {cfg.eval.test_lr}",
        ),
        (cfg.eval.test_steps >= 0, f"eval.test_steps must be >= 0, got {cfg.eval.test_steps}"),
        (cfg.eval.reinit >= 0, f"eval.reinit must be >= 0 (feature stages), got {cfg.eval.reinit}"),
        (cfg.eval.test_tasks >= 1, f"eval.test_tasks must be >= 1, got {cfg.eval.test_tasks}"),
        (
            bool(cfg.eval.test_shots) and all(k >= 1 for k in cfg.eval.test_shots),
            f"eval.test_shots must list shot counts >= 1 (e.g. 1,5), got {cfg.eval.test_shots}",
        ),
        (
            cfg.query_budget is None or cfg.query_budget >= 0,
            f"query_budget must be >= 0 images, or none for no limit; got {cfg.query_budget}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainerState:
    """The loop's counters: what ``last.pt`` stores besides weights, optimizer, RNG and method
    state, and what resume restores (one checkpoint key per field)."""

    step: int = 0  # meta-updates done
    best_score: float | None = None  # best selection score so far
    best_step: int | None = None  # meta-update of best.pt
    elapsed: float = 0.0  # training seconds (evaluation excluded)


_STATE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainerState))


class MetaTrainer(Method):
    """Template for episodic meta-training (see the module docstring for the hooks).

    Attributes available to hooks: ``cfg``, ``run``, ``datasets`` (meta-train/val/test datasets
    of ``cfg.dataset``), ``model`` (the meta-model), ``spec`` (its spec), ``optimizer`` (Adam,
    ``cfg.outer_lr``), ``state`` (:class:`TrainerState`; ``step`` = meta-updates done),
    ``device``, ``event_hooks`` (called with each :class:`~apimeta.events.APIEvent`).
    """

    #: errors of :meth:`meta_batch_loss` that stop the run *resumably*: the partial update is
    #: discarded, ``last.pt`` is written with the state from the start of that update and
    #: :class:`~apimeta.errors.APIUnavailableError` is raised (API methods: ``(APIError,)``).
    #: Empty (the default): errors propagate unchanged.
    resumable_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self) -> None:
        self._rngs: dict[str, torch.Generator] = {}
        self.ema_model: nn.Module | None = None  # the weight average (cfg.ema > 0)
        self.state = TrainerState()
        self.event_hooks: list[EventHook] = []

    # ---- hooks -------------------------------------------------------------------------
    def setup(self) -> None:
        """Called once after model/optimizer exist and before any resume; build state here."""

    @abstractmethod
    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, Any]]:
        """The loss of meta-update ``step`` (0-based): the SUM of ``cfg.meta_batch`` episode
        losses, differentiable w.r.t. ``self.model``'s parameters, and scalar metrics to log."""

    def extra_state(self) -> dict[str, Any]:
        """Method state to checkpoint (tensors / primitives / dicts / lists only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def should_stop(self) -> bool:
        """Return True to end training early (after the current meta-update)."""
        return False

    def rollback_update(self, extra: dict[str, Any]) -> None:
        """Undo a failed meta-update: restore the :meth:`extra_state` taken at its start.

        Called only for :attr:`resumable_errors`; RNGs are restored by the caller. The default
        reloads ``extra``; API methods keep their current ledger (the images of the failed
        update were sent and stay counted).
        """
        self.load_extra_state(extra)

    def total_updates(self) -> int:
        """Number of meta-updates: ``cfg.episodes // cfg.meta_batch``."""
        return self.cfg.episodes // self.cfg.meta_batch

    # ---- helpers for subclasses --------------------------------------------------------
    @property
    def step(self) -> int:
        """Meta-updates done."""
        return self.state.step

    def rng(self, *names: object) -> torch.Generator:
        """A ``torch.Generator`` seeded from ``(cfg.seed, method name, *names)`` whose state is
        saved in every checkpoint and restored on resume."""
        key = ":".join(map(str, names))
        if key not in self._rngs:
            self._rngs[key] = make_generator(self.cfg.seed, self.name, *names)
        return self._rngs[key]

    def inner_start(self) -> dict[str, Tensor]:
        """The meta-parameters an inner loop starts from: ``named_params(model)`` with the head
        as ``cfg.train_head`` says (learned: unchanged; zero; random: fresh, from a saved RNG)."""
        return start_inner_head(
            self.model, named_params(self.model), self.cfg.train_head, self.rng("train-head")
        )

    def record_event(self, event: APIEvent) -> None:
        """Log an API event under the meta-update it belongs to (so a resume from the checkpoint
        before that update drops it with the update) and pass it to :attr:`event_hooks`."""
        self.run.log({"phase": "event", **event.record})
        for hook in self.event_hooks:
            hook(event)

    def evaluate_split(
        self,
        split: str,
        tasks: int,
        model: nn.Module | None = None,
        phase: str | None = None,
        shots: tuple[int, ...] | None = None,
        keep_accs: bool = False,
    ) -> tuple[float, dict[str, dict[str, Any]]]:
        """Evaluate ``model`` (default the meta-model) on ``split`` of every dataset at
        ``shots`` (default ``cfg.shot``); returns (selection score = mean over datasets at
        ``cfg.shot``, or the first shot count, {dataset: results})."""
        cfg = self.cfg
        model = self.model if model is None else model
        shots = tuple(dict.fromkeys(shots)) if shots else (cfg.shot,)
        out: dict[str, dict[str, Any]] = {}
        for ds in self.datasets:
            cb = _eval_progress(self._progress, phase or split, ds.name)
            out[ds.name] = evaluate_with_config(
                model, ds, cfg, split=split, shots=shots, tasks=tasks, progress=cb,
                keep_accs=keep_accs,
            )  # fmt: skip
        key = f"{cfg.shot if cfg.shot in shots else shots[0]}-shot"
        score = sum(summary_score({key: r[key]}) for r in out.values()) / len(out)
        return score, out

    @property
    def selected_model(self) -> nn.Module:
        """The model meta-val, ``best.pt`` and the meta-test see: the weight average with
        ``cfg.ema`` > 0, else the meta-model itself."""
        return self.model if self.ema_model is None else self.ema_model

    def _update_ema(self) -> None:
        """``w_ema <- ema * w_ema + (1 - ema) * w`` for every parameter; buffers are copied."""
        if self.ema_model is None:
            return
        with torch.no_grad():
            torch._foreach_lerp_(
                list(self.ema_model.parameters()), list(self.model.parameters()), 1.0 - self.cfg.ema
            )
            for b_ema, b in zip(self.ema_model.buffers(), self.model.buffers(), strict=True):
                b_ema.copy_(b)

    # ---- the loop ----------------------------------------------------------------------
    def _checkpoint(self, selected: bool = False) -> dict[str, Any]:
        """The checkpoint dict; ``selected``: its ``model`` is :attr:`selected_model` (best.pt)."""
        model = self.selected_model if selected else self.model
        out = {
            "method": self.name,
            "config": to_dict(self.cfg),
            "model_spec": self.spec,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            **dataclasses.asdict(self.state),
            "rng": rng_states(self._rngs),
            "extra": self.extra_state(),
        }
        if self.ema_model is not None:
            out["ema"] = {k: v.detach().cpu() for k, v in self.ema_model.state_dict().items()}
        return out

    def _update_snapshot(self) -> dict[str, Any]:
        """What a failed meta-update may have changed: RNG states and method state.

        Cheap: ``extra_state`` returns fresh containers of tensors that are never modified in
        place; the model and optimizer only change in ``optimizer.step()``, after the loss.
        """
        return {"rng": rng_states(self._rngs), "extra": self.extra_state()}

    def _rollback(self, snapshot: dict[str, Any]) -> None:
        """Back to ``snapshot`` (the start of meta-update ``self.step``): RNG states, method
        state (API methods keep their ledger), no gradients, no metrics of the partial update."""
        for key in [k for k in self._rngs if k not in snapshot["rng"]]:
            del self._rngs[key]  # created during the failed update: recreated fresh
        restore_rng_states(self._rngs, snapshot["rng"])
        self.rollback_update(snapshot["extra"])
        self.optimizer.zero_grad(set_to_none=True)
        self.run.truncate_metrics(self.step)  # records of the discarded update

    def _spent(self) -> str:
        ledger = getattr(self, "ledger", None)
        return f" Queries so far: {ledger.used} (kept in the checkpoint)." if ledger else ""

    def _stop_resumable(self, snapshot: dict[str, Any], error: Exception) -> APIUnavailableError:
        """Roll back to ``snapshot``, write ``last.pt`` and return the error to raise. Resuming
        redoes that update from the same RNG states, so the run continues as if never
        interrupted."""
        self._rollback(snapshot)
        save_checkpoint(self.run.last_checkpoint, self._checkpoint())
        log.error("meta-update %d failed (%s); checkpointed", self.step + 1, error)
        return APIUnavailableError(
            f"{error}\nThe run stopped at meta-update {self.step} of {self.total_updates()} and "
            f"saved its state before the failed update in {self.run.last_checkpoint}; nothing "
            f"trained is lost.{self._spent()} When the API is back, continue with: "
            f"apimeta train --resume --out {self.run.path}",
            self.step,
            str(self.run.path),
        )

    def _stop_interrupted(self, snapshot: dict[str, Any] | None) -> TrainingInterrupted:
        """Ctrl-C / SIGTERM: roll back a partial meta-update (``snapshot``; None between
        updates), write ``last.pt`` and return the error to raise."""
        if snapshot is not None:
            self._rollback(snapshot)
        save_checkpoint(self.run.last_checkpoint, self._checkpoint())
        log.warning("interrupted at meta-update %d; checkpointed", self.step)
        return TrainingInterrupted(
            f"interrupted: the run saved its state after meta-update {self.step} of "
            f"{self.total_updates()} in {self.run.last_checkpoint}.{self._spent()} Continue "
            f"with: apimeta train --resume --out {self.run.path}",
            self.step,
            str(self.run.path),
        )

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.run.last_checkpoint, map_location=self.device)
        if ckpt.get("method") != self.name:
            raise CheckpointError(
                f"{self.run.last_checkpoint} was written by method {ckpt.get('method')!r}, "
                f"not {self.name!r}; resume it with --method {ckpt.get('method')}"
            )
        self.model.load_state_dict(ckpt["model"])
        if self.ema_model is not None:
            if "ema" not in ckpt:
                raise CheckpointError(
                    f"{self.run.last_checkpoint} holds no weight average; resume it with ema=0 "
                    "(the value it was trained with)"
                )
            self.ema_model.load_state_dict(ckpt["ema"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # a setting that adds or removes trained parameters changed
            raise CheckpointError(
                f"{self.run.last_checkpoint} was trained with other parameters than this config "
                f"gives ({e}); resume it with the config it was trained with (e.g. the same "
                "kd.contrastive)"
            ) from e
        defaults = dataclasses.asdict(TrainerState())
        self.state = TrainerState(**{f: ckpt.get(f, defaults[f]) for f in _STATE_FIELDS})
        self.state.step, self.state.elapsed = int(self.state.step), float(self.state.elapsed)
        # RNGs named by setup() are restored; ones created later are restored lazily
        for key in ckpt["rng"]:
            if key not in self._rngs:
                self._rngs[key] = make_generator(self.cfg.seed, self.name, *key.split(":"))
        restore_rng_states(self._rngs, ckpt["rng"])
        self.load_extra_state(ckpt["extra"])
        self.run.truncate_metrics(self.step)
        log.info("resumed %s at meta-update %d", self.run.last_checkpoint, self.step)

    def _validate(self) -> None:
        cfg, st = self.cfg, self.state
        score, res = self.evaluate_split(
            cfg.eval.select_split, cfg.eval.tasks, model=self.selected_model, phase="val"
        )
        if st.best_score is None or score > st.best_score:
            st.best_score, st.best_step = score, st.step
            save_checkpoint(self.run.best_checkpoint, self._checkpoint(selected=True))
        self.run.log(
            {
                "step": st.step,
                "episode": st.step * cfg.meta_batch,
                "phase": "val",
                "split": cfg.eval.select_split,
                "score": score,
                "best_score": st.best_score,
                "best_step": st.best_step,
                "results": res,
            }
        )
        log.info(
            "meta-update %d: %s %s (best %.2f @ %d)",
            st.step,
            cfg.eval.select_split,
            "; ".join(f"{k}: {format_result(v)}" for k, v in res.items()),
            st.best_score,
            st.best_step,
        )

    def train(
        self,
        cfg: RunConfig,
        run: RunDir,
        progress: ProgressFn | None = None,
        *,
        resume: bool = False,
    ) -> TrainResult:
        self.cfg, self.run, self._progress = cfg, run, progress
        try:
            check_run_config(cfg)
            self.device = torch.device(cfg.device)
            if cfg.deterministic:
                deterministic_kernels(self.device)
            if cfg.eval.select_split == "test":
                log.warning(
                    "eval.select_split='test': the best checkpoint is chosen on meta-TEST tasks; "
                    "the reported test accuracy is optimistic (reference behaviour, "
                    "docs/design.md 9)"
                )
            self.datasets = load_run_datasets(cfg)
            self.model, self.spec = meta_model_for_datasets(cfg, self.datasets)
            for k in {cfg.eval.reinit, *(cfg.eval.tune or {}).get("reinit", [])}:
                if k:  # refused now, not at the first meta-val pass or the final meta-test
                    check_reinit(self.model, int(k))
            # outer_lr_stages: a group per named feature stage, each lr set per update below
            groups = stage_param_groups(self.model, list(cfg.outer_lr_stages))
            for group in groups:
                group["lr"] = cfg.outer_lr * group["lr_scale"]
            self.optimizer = (
                torch.optim.AdamW(groups, lr=cfg.outer_lr, weight_decay=cfg.outer_wd)
                if cfg.outer_wd
                else torch.optim.Adam(groups, lr=cfg.outer_lr)
            )
            self.ema_model = None
            if cfg.ema > 0:
                # trainable like the model (evaluation adapts what requires grad); no optimizer
                self.ema_model = copy.deepcopy(self.model)
            self.state = TrainerState()
            self.event_hooks = [save_recovered_grid(run)]
            self.setup()
            if resume:
                self._resume()
        except BaseException:
            run.discard_if_empty()  # refused before anything was written: leave no run dir
            raise
        run.save_config(cfg)  # on resume: the config as extended (e.g. more episodes)
        st = self.state
        total = self.total_updates()
        episodes = schedule_point(cfg.eval.every, total * cfg.meta_batch)
        eval_every = max(1, episodes // cfg.meta_batch)
        ckpt_every = max(1, cfg.checkpoint_every)
        if 1 < total <= eval_every:
            log.warning(
                "eval.every=%d episodes is %d meta-updates, not fewer than the run's %d: meta-val "
                "runs only at the end, so best.pt = last.pt (no selection). Set eval.every to at "
                "most %d episodes for several checkpoints to choose from",
                episodes, eval_every, total, max(cfg.meta_batch, total * cfg.meta_batch // 4),
            )  # fmt: skip
        if st.step == 0 and total == 0 and st.best_score is None:
            self._validate()  # nothing to train: the init itself is the best and final model
        self._partial: dict[str, Any] | None = None  # set while an update is in progress
        try:
            while st.step < total and not self._train_step(total, eval_every, ckpt_every):
                pass
            if not self.run.last_checkpoint.exists() or total == 0:
                save_checkpoint(self.run.last_checkpoint, self._checkpoint())
            return self._final_test()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM mapped to it (runner.interrupts)
            raise self._stop_interrupted(self._partial) from None

    def _train_step(self, total: int, eval_every: int, ckpt_every: int) -> bool:
        """One meta-update with its record, validation and checkpoint; True: stop early.

        ``self._partial`` holds the snapshot from the start of the update until its optimizer
        step is done, so an interrupt in between rolls the partial update back; one that
        arrives during the step itself is held until the step is counted
        (:func:`held_interrupts`), so ``last.pt`` never has the weights of one step and the
        count of another."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._partial = self._update_snapshot()
        try:
            loss, metrics = self.meta_batch_loss(st.step)
        except self.resumable_errors as e:
            raise self._stop_resumable(self._partial, e) from e
        loss_value = float(loss.detach())  # one host sync: the finite check and the record
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"meta-loss is {loss_value} at meta-update {st.step}; "
                "lower outer_lr/inner_lr or check the data"
            )
        loss.backward()
        factor = OUTER_LR_SCHEDULES[cfg.outer_lr_schedule](st.step, total)
        for group in self.optimizer.param_groups:  # a method's own groups: scale 1
            group["lr"] = cfg.outer_lr * factor * group.get("lr_scale", 1.0)
        dt = time.perf_counter() - t0
        # the record is written while the update can still be rolled back (an interrupt drops
        # it with the update), so a checkpoint at step N never lacks record N
        record = {
            "step": st.step + 1,
            "episode": (st.step + 1) * cfg.meta_batch,
            "phase": "train",
            "loss": loss_value,
            **({"outer_lr": cfg.outer_lr * factor} if cfg.outer_lr_schedule != "constant" else {}),
            **metrics,
            "step_time": dt,  # up to the optimizer step
        }
        self.run.log(record)
        with held_interrupts():  # the commit: an interrupt is raised after it, never inside
            self.optimizer.step()
            self._update_ema()
            st.step += 1
            self._partial = None
        st.elapsed += dt
        stop = self.should_stop()
        last = st.step == total or stop
        if st.step % eval_every == 0 or last:
            self._validate()
        if st.step % ckpt_every == 0 or last:
            save_checkpoint(self.run.last_checkpoint, self._checkpoint())
        if self._progress is not None:
            self._progress(st.step, total, {"phase": "train", **record})
        if stop:
            log.info("stopping early at meta-update %d (should_stop)", st.step)
        return stop

    def _meta_test(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """``model`` on ``eval.test_tasks`` meta-test tasks of every dataset at
        ``eval.test_shots``, with the run's protocol (``eval.tune``: chosen per shot on
        meta-val, :func:`~apimeta.evaluate.meta_test`); per-task accuracies kept."""
        cfg = self.cfg
        shots = tuple(dict.fromkeys(cfg.eval.test_shots))
        out: dict[str, dict[str, Any]] = {}
        for ds in self.datasets:
            cb = _eval_progress(self._progress, "test", ds.name)
            out[ds.name] = meta_test(
                model, ds, cfg, shots=shots, tasks=cfg.eval.test_tasks, progress=cb
            )
        return out

    def _final_test(self) -> TrainResult:
        cfg, st = self.cfg, self.state
        final = self._meta_test(self.selected_model)
        best: dict[str, Any] = final
        best_path = self.run.best_checkpoint if self.run.best_checkpoint.exists() else None
        if best_path is not None and st.best_step != st.step:
            model, _, _ = load_meta_model(best_path, device=self.device)
            best = self._meta_test(model)
        metrics = {
            "method": self.name,
            "steps": st.step,
            "select_split": cfg.eval.select_split,
            "best_score": st.best_score,
            "best_step": st.best_step,
            "test_tasks": cfg.eval.test_tasks,
            "test": {"best": best, "final": final},
            "train_seconds": st.elapsed,
            "seconds_per_update": st.elapsed / st.step if st.step else math.nan,
        }
        self.run.write_json("test.json", metrics)
        self.run.log({"step": st.step, "phase": "test", "test": metrics["test"]})
        return TrainResult(
            run_dir=self.run.path,
            final_checkpoint=self.run.last_checkpoint,
            best_checkpoint=best_path,
            metrics=metrics,
        )


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM are held, then delivered to the handlers they had
    when it ends (the first one that arrived), so a block that must run whole (a meta-update's
    optimizer step and step count) is never cut in two. A no-op outside the main thread, or
    where a handler was not installed from Python."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in sigs}
    if any(h is None for h in old.values()):
        yield
        return
    held: list[tuple[int, Any]] = []

    def hold(signum: int, frame: Any) -> None:
        held.append((signum, frame))

    for s in sigs:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if held:
            signum, frame = held[0]
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)  # e.g. KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)  # what the signal would have done


def _eval_progress(
    progress: ProgressFn | None, phase: str, dataset: str
) -> Callable[[int, int, dict[str, Any]], None] | None:
    if progress is None:
        return None

    def cb(done: int, total: int, info: dict[str, Any]) -> None:
        progress(done, total, {"phase": phase, "dataset": dataset, **info})

    return cb


__all__ = ["CHOICES", "MetaTrainer", "TrainerState", "check_run_config", "held_interrupts"]
