"""The ``Method`` interface, the shared meta-model builder and a meta-training template.

Writing a new method (e.g. ``bidf-mkd``, ``bbkd``) in ``apimeta/methods/<module>.py`` (add
the module name to the import loop at the end of ``apimeta/methods/__init__.py``)::

    from apimeta.methods import METHODS       # defined before the loop imports this module
    from apimeta.methods.base import MetaTrainer

    @METHODS.register("my-method")
    class MyMethod(MetaTrainer):
        name = "my-method"

        def setup(self) -> None:               # build APIs, generators, memory ...
            self.g = self.generator("my-tasks")   # checkpointed automatically

        def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, float]]:
            # sum of cfg.meta_batch episode losses (method.md 4.8) + scalar metrics to log
            ...

        def extra_state(self) -> dict: ...     # ledger/memory state (tensors & primitives)
        def load_extra_state(self, state: dict) -> None: ...
        def should_stop(self) -> bool: ...     # e.g. query budget exhausted and on_budget=stop

``MetaTrainer.train`` owns everything else: the meta-model (``self.model``), Adam
(``self.optimizer``), the meta-update loop, meta-val evaluation every ``cfg.eval_every``
episodes with best-checkpoint selection on ``cfg.select_split``, ``last.pt`` every
``cfg.checkpoint_every`` meta-updates, metrics JSONL, exact resume and the final meta-test at the
best and final checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from apimeta.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from apimeta.config import from_dict, to_dict
from apimeta.data.base import FewShotDataset, load_dataset
from apimeta.errors import APIUnavailableError, CheckpointError, ConfigError
from apimeta.evaluate import DEFAULT_EVAL_SEED, evaluate, format_result, summary_score
from apimeta.models import build_backbone
from apimeta.run_config import RunConfig
from apimeta.runs import RunDir
from apimeta.seeding import derive_seed, make_generator

log = logging.getLogger(__name__)

# progress(done, total, info): info["phase"] in {"train", "val", "test"} plus metrics / "shot"
ProgressFn = Callable[[int, int, dict[str, Any]], None]


# ----------------------------------------------------------------------------- meta-model


def dataset_names(cfg: RunConfig) -> list[str]:
    """``cfg.dataset`` split on commas (API-MH uses several)."""
    names = [d.strip() for d in cfg.dataset.split(",") if d.strip()]
    if not names:
        raise ConfigError("dataset is empty; give a dataset name, e.g. --dataset emoji")
    return names


def load_run_datasets(cfg: RunConfig, **options: Any) -> list[FewShotDataset]:
    """Load every dataset of ``cfg.dataset`` at ``cfg.image_size`` from ``cfg.data_root``.

    The dataset's own (rendering) seed stays at its default: ``cfg.seed`` must not change the
    images, so every run and method sees the same meta-val/meta-test data.
    """
    return [
        load_dataset(name, root=cfg.data_root, image_size=cfg.image_size, **options)
        for name in dataset_names(cfg)
    ]


def meta_model_spec(
    cfg: RunConfig,
    channels: int,
    image_size: int,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    adaptive_pool: bool | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``build_backbone`` for the meta-model (stored in checkpoints).

    Transductive BN, ``cfg.way`` outputs, ``cfg.backbone`` at ``cfg.width``; adaptive pooling by
    default when ``cfg.dataset`` names several datasets (API-MH: one net for every input size).
    """
    if adaptive_pool is None:
        adaptive_pool = len(dataset_names(cfg)) > 1
    return {
        "name": cfg.backbone,
        "num_classes": cfg.way,
        "in_channels": int(channels),
        "image_size": int(image_size),
        "width": float(cfg.width),
        "bn": "transductive",
        "adaptive_pool": bool(adaptive_pool),
        "mean": [float(m) for m in mean] if mean is not None else None,
        "std": [float(s) for s in std] if std is not None else None,
    }


def build_from_spec(spec: dict[str, Any], seed: int | None = None) -> nn.Module:
    """Build a model from a :func:`meta_model_spec` dict. ``seed``: initialize the weights from
    a private generator state (the global RNG is left untouched)."""
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if seed is None:
        return build_backbone(name, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "meta-model-init"))
        return build_backbone(name, **kwargs)


def build_meta_model(
    cfg: RunConfig,
    channels: int,
    image_size: int,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
) -> nn.Module:
    """The meta-model every method trains: ``cfg.backbone`` (Conv4, ``cfg.width`` filters),
    transductive BN, ``cfg.way`` outputs; weights seeded from ``cfg.seed``; on ``cfg.device``."""
    spec = meta_model_spec(cfg, channels, image_size, mean, std)
    return build_from_spec(spec, seed=cfg.seed).to(cfg.device)


def meta_model_for_datasets(
    cfg: RunConfig, datasets: list[FewShotDataset]
) -> tuple[nn.Module, dict]:
    """(model, spec) for the given datasets: their channels (max) and normalization (the first
    dataset's for a single dataset; the default 0.5/0.25 for several)."""
    channels = max(d.channels for d in datasets)
    if len(datasets) == 1:
        mean, std = datasets[0].mean, datasets[0].std
    else:
        mean = std = None
    spec = meta_model_spec(cfg, channels, datasets[0].image_size, mean, std)
    if spec["mean"] is not None and len(spec["mean"]) != channels:
        spec["mean"] = spec["std"] = None
    return build_from_spec(spec, seed=cfg.seed).to(cfg.device), spec


def load_meta_model(
    path: str | Path, which: str = "model", device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the meta-model stored in a checkpoint: returns (model, config, checkpoint)."""
    ckpt = load_checkpoint(path, map_location=device)
    for key in ("model_spec", "config", which):
        if key not in ckpt:
            raise CheckpointError(
                f"checkpoint {path} has no {key!r}; it is not a method checkpoint"
            )
    cfg = from_dict(RunConfig, ckpt["config"])
    model = build_from_spec(ckpt["model_spec"])
    try:
        model.load_state_dict(ckpt[which])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the stored spec: {e}"
        ) from None
    return model.to(device), cfg, ckpt


def evaluate_with_config(
    model: nn.Module,
    dataset: FewShotDataset,
    cfg: RunConfig,
    *,
    split: str,
    shots: tuple[int, ...],
    tasks: int,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The meta-test protocol with a run's settings (way, query, test_steps, inner_lr,
    transductive BN) on the shared seeded task list: ``{"1-shot": {...}, ...}``."""
    return evaluate(
        model,
        dataset,
        split=split,
        way=cfg.way,
        shots=shots,
        query=cfg.query,
        tasks=tasks,
        steps=cfg.test_steps,
        lr=cfg.inner_lr,
        transductive=cfg.transductive,
        seed=DEFAULT_EVAL_SEED,
        device=cfg.device,
        progress=progress,
    )


# ----------------------------------------------------------------------------- interface


@dataclass
class TrainResult:
    """What ``Method.train`` returns. ``metrics``: best val score/step and the final test
    results (``{"best": {dataset: per-shot results}, "final": {...}}``)."""

    run_dir: Path
    final_checkpoint: Path
    best_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A way to produce a meta-learned initialization. Registered in ``apimeta.methods.METHODS``
    (factories called with no arguments)."""

    name: ClassVar[str] = "method"

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


class MetaTrainer(Method):
    """Template for episodic meta-training (see the module docstring for the hooks).

    Attributes available to hooks: ``cfg``, ``run``, ``datasets`` (meta-train/val/test datasets
    of ``cfg.dataset``), ``model`` (the meta-model), ``optimizer`` (Adam, ``cfg.outer_lr``),
    ``step`` (meta-updates done), ``device``.
    """

    #: errors of :meth:`meta_batch_loss` that stop the run *resumably*: the partial update is
    #: discarded, ``last.pt`` is written with the state from the start of that update and
    #: :class:`~apimeta.errors.APIUnavailableError` is raised (API methods: ``(APIError,)``).
    #: Empty (the default): errors propagate unchanged.
    resumable_errors: ClassVar[tuple[type[Exception], ...]] = ()

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    # ---- hooks -------------------------------------------------------------------------
    def setup(self) -> None:
        """Called once after model/optimizer exist and before any resume; build state here."""

    @abstractmethod
    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, float]]:
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

        Called only for :attr:`resumable_errors`; generators are restored by the caller. The
        default reloads ``extra``; API methods keep their current ledger (the images of the
        failed update were sent and stay counted).
        """
        self.load_extra_state(extra)

    def total_updates(self) -> int:
        """Number of meta-updates: ``cfg.episodes // cfg.meta_batch``."""
        return self.cfg.episodes // self.cfg.meta_batch

    # ---- helpers for subclasses --------------------------------------------------------
    def generator(self, *names: object) -> torch.Generator:
        """A generator seeded from ``(cfg.seed, method name, *names)`` whose state is saved in
        every checkpoint and restored on resume."""
        key = ":".join(map(str, names))
        if key not in self._generators:
            self._generators[key] = make_generator(self.cfg.seed, self.name, *names)
        return self._generators[key]

    def evaluate_split(
        self,
        split: str,
        tasks: int,
        model: nn.Module | None = None,
        phase: str | None = None,
    ) -> tuple[float, dict[str, dict[str, Any]]]:
        """Evaluate ``model`` (default the meta-model) on ``split`` of every dataset at
        ``cfg.shot``; returns (selection score = mean over datasets, {dataset: results})."""
        cfg = self.cfg
        model = self.model if model is None else model
        out: dict[str, dict[str, Any]] = {}
        for ds in self.datasets:
            cb = _eval_progress(self._progress, phase or split, ds.name)
            out[ds.name] = evaluate_with_config(
                model, ds, cfg, split=split, shots=(cfg.shot,), tasks=tasks, progress=cb
            )
        score = sum(summary_score(r) for r in out.values()) / len(out)
        return score, out

    # ---- the loop ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "config": to_dict(self.cfg),
            "model_spec": self.spec,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "rng": rng_states(self._generators),
            "extra": self.extra_state(),
            "elapsed": self.elapsed,
        }

    def _update_snapshot(self) -> dict[str, Any]:
        """What a failed meta-update may have changed: generator states and method state.

        Cheap: ``extra_state`` returns fresh containers of tensors that are never modified in
        place; the model and optimizer only change in ``optimizer.step()``, after the loss.
        """
        return {"rng": rng_states(self._generators), "extra": self.extra_state()}

    def _stop_resumable(self, snapshot: dict[str, Any], error: Exception) -> APIUnavailableError:
        """Roll back to ``snapshot`` (the start of meta-update ``self.step``), write ``last.pt``
        and return the error to raise. Resuming redoes that update from the same generator
        states, so the run continues as if never interrupted."""
        for key in [k for k in self._generators if k not in snapshot["rng"]]:
            del self._generators[key]  # created during the failed update: recreated fresh
        restore_rng_states(self._generators, snapshot["rng"])
        self.rollback_update(snapshot["extra"])
        self.optimizer.zero_grad(set_to_none=True)
        save_checkpoint(self.run.last_checkpoint, self._state())
        self.run.truncate_metrics(self.step)  # records of the discarded update
        ledger = getattr(self, "ledger", None)
        spent = f" Queries so far: {ledger.used} (kept in the checkpoint)." if ledger else ""
        log.error("meta-update %d failed (%s); checkpointed", self.step + 1, error)
        return APIUnavailableError(
            f"{error}\nThe run stopped at meta-update {self.step} of {self.total_updates()} and "
            f"saved its state before the failed update in {self.run.last_checkpoint}; nothing "
            f"trained is lost.{spent} When the API is back, continue with: "
            f"apimeta train --resume --out {self.run.path}",
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
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = int(ckpt["step"])
        self.best_score = ckpt["best_score"]
        self.best_step = ckpt["best_step"]
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        # generators named by setup() are restored; ones created later are restored lazily
        for key in ckpt["rng"]:
            if key not in self._generators:
                self._generators[key] = make_generator(self.cfg.seed, self.name, *key.split(":"))
        restore_rng_states(self._generators, ckpt["rng"])
        self.load_extra_state(ckpt["extra"])
        self.run.truncate_metrics(self.step)
        log.info("resumed %s at meta-update %d", self.run.last_checkpoint, self.step)

    def _validate(self) -> None:
        score, res = self.evaluate_split(self.cfg.select_split, self.cfg.eval_tasks, phase="val")
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step = score, self.step
            save_checkpoint(self.run.best_checkpoint, self._state())
        self.run.log(
            {
                "step": self.step,
                "episode": self.step * self.cfg.meta_batch,
                "phase": "val",
                "split": self.cfg.select_split,
                "score": score,
                "best_score": self.best_score,
                "best_step": self.best_step,
                "results": res,
            }
        )
        log.info(
            "meta-update %d: %s %s (best %.2f @ %d)",
            self.step,
            self.cfg.select_split,
            "; ".join(f"{k}: {format_result(v)}" for k, v in res.items()),
            self.best_score,
            self.best_step,
        )

    def train(
        self,
        cfg: RunConfig,
        run: RunDir,
        progress: ProgressFn | None = None,
        *,
        resume: bool = False,
    ) -> TrainResult:
        _check_config(cfg)
        self.cfg, self.run, self._progress = cfg, run, progress
        self.device = torch.device(cfg.device)
        if cfg.select_split == "test":
            log.warning(
                "select_split='test': the best checkpoint is chosen on meta-TEST tasks; the "
                "reported test accuracy is optimistic (reference behaviour, method.md 9.2)"
            )
        self.datasets = load_run_datasets(cfg)
        self.model, self.spec = meta_model_for_datasets(cfg, self.datasets)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.outer_lr)
        self.step, self.best_score, self.best_step, self.elapsed = 0, None, None, 0.0
        self.setup()
        if resume:
            self._resume()
        run.save_config(cfg)  # on resume: the config as extended (e.g. more episodes)
        total = self.total_updates()
        eval_every = max(1, cfg.eval_every // cfg.meta_batch)
        ckpt_every = max(1, cfg.checkpoint_every)
        if self.step == 0 and total == 0 and self.best_score is None:
            self._validate()  # nothing to train: the init itself is the best and final model
        while self.step < total:
            t0 = time.perf_counter()
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            snapshot = self._update_snapshot() if self.resumable_errors else None
            try:
                loss, metrics = self.meta_batch_loss(self.step)
            except self.resumable_errors as e:
                assert snapshot is not None
                raise self._stop_resumable(snapshot, e) from e
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"meta-loss is {loss.item()} at meta-update {self.step}; "
                    "lower outer_lr/inner_lr or check the data"
                )
            loss.backward()
            self.optimizer.step()
            self.step += 1
            dt = time.perf_counter() - t0
            self.elapsed += dt
            record = {
                "step": self.step,
                "episode": self.step * cfg.meta_batch,
                "phase": "train",
                "loss": float(loss.detach()),
                **metrics,
                "step_time": dt,
            }
            self.run.log(record)
            stop = self.should_stop()
            last = self.step == total or stop
            if self.step % eval_every == 0 or last:
                self._validate()
            if self.step % ckpt_every == 0 or last:
                save_checkpoint(self.run.last_checkpoint, self._state())
            if progress is not None:
                progress(self.step, total, {"phase": "train", **record})
            if stop:
                log.info("stopping early at meta-update %d (should_stop)", self.step)
                break
        if not self.run.last_checkpoint.exists() or total == 0:
            save_checkpoint(self.run.last_checkpoint, self._state())
        return self._final_test()

    def _final_test(self) -> TrainResult:
        cfg = self.cfg
        _, final = self.evaluate_split("test", cfg.test_tasks, phase="test")
        best: dict[str, Any] = final
        best_path = self.run.best_checkpoint if self.run.best_checkpoint.exists() else None
        if best_path is not None and self.best_step != self.step:
            model, _, _ = load_meta_model(best_path, device=self.device)
            _, best = self.evaluate_split("test", cfg.test_tasks, model=model, phase="test")
        metrics = {
            "method": self.name,
            "steps": self.step,
            "select_split": cfg.select_split,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "test_tasks": cfg.test_tasks,
            "test": {"best": best, "final": final},
            "train_seconds": self.elapsed,
            "seconds_per_update": self.elapsed / self.step if self.step else math.nan,
        }
        self.run.write_json("test.json", metrics)
        self.run.log({"step": self.step, "phase": "test", "test": metrics["test"]})
        return TrainResult(
            run_dir=self.run.path,
            final_checkpoint=self.run.last_checkpoint,
            best_checkpoint=best_path,
            metrics=metrics,
        )


def _eval_progress(
    progress: ProgressFn | None, phase: str, dataset: str
) -> Callable[[int, int, dict[str, Any]], None] | None:
    if progress is None:
        return None

    def cb(done: int, total: int, info: dict[str, Any]) -> None:
        progress(done, total, {"phase": phase, "dataset": dataset, **info})

    return cb


def _check_config(cfg: RunConfig) -> None:
    checks = [
        (cfg.way >= 2, f"way must be >= 2, got {cfg.way}"),
        (cfg.shot >= 1, f"shot must be >= 1, got {cfg.shot}"),
        (cfg.query >= 1, f"query must be >= 1, got {cfg.query}"),
        (cfg.meta_batch >= 1, f"meta_batch must be >= 1, got {cfg.meta_batch}"),
        (cfg.episodes >= 0, f"episodes must be >= 0, got {cfg.episodes}"),
        (cfg.inner_steps >= 0, f"inner_steps must be >= 0, got {cfg.inner_steps}"),
        (cfg.eval_tasks >= 1, f"eval_tasks must be >= 1, got {cfg.eval_tasks}"),
        (cfg.test_tasks >= 1, f"test_tasks must be >= 1, got {cfg.test_tasks}"),
        (
            cfg.select_split in ("val", "test"),
            f"select_split must be 'val' or 'test', got {cfg.select_split!r}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


__all__ = [
    "MetaTrainer",
    "Method",
    "ProgressFn",
    "TrainResult",
    "build_from_spec",
    "build_meta_model",
    "dataset_names",
    "evaluate_with_config",
    "load_meta_model",
    "load_run_datasets",
    "meta_model_for_datasets",
    "meta_model_spec",
]
