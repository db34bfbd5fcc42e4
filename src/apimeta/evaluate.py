"""Few-shot evaluation of an initialization (docs/design.md section 6).

For each shot K, a FIXED task list is drawn from a generator seeded with
``task_seed(seed, split, way, K, query)``, so every initialization evaluated with the same
arguments sees identical episodes. Each task: copy the init, take ``steps`` full-batch CE
gradient steps (lr ``lr``) on the support set adapting every parameter (head included, no
re-initialization), then score accuracy on the query set. Report the mean and
``1.96 * std / sqrt(n)`` with the population std (ddof 0).

BatchNorm: the meta-model's transductive BN normalizes the support batch and the query batch
each with its own statistics (``transductive=True``). ``transductive=False`` is the Reptile
paper's protocol: every query image is classified in a batch made of the support set plus that
one image (one forward pass of S+1 images per query image).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apimeta.data.base import FewShotDataset
from apimeta.episodes import Episode, TaskSampler, episode_at
from apimeta.errors import ConfigError
from apimeta.maml import Params, finetune, functional_forward, head_name, linear_init, named_params
from apimeta.models.stages import redraw_top_stages
from apimeta.parallel import Backend, run_jobs
from apimeta.run_config import RunConfig
from apimeta.seeding import derive_seed

log = logging.getLogger(__name__)

DEFAULT_EVAL_SEED = 2022
# sampler_factory(split, way, shot, query, generator) -> TaskSampler (FewShotDataset.sampler fits)
SamplerFactory = Callable[[str, int, int, int, torch.Generator], TaskSampler]
# progress(done, total, info) — info carries at least {"shot": K}
EvalProgress = Callable[[int, int, dict[str, Any]], None]


def task_seed(seed: int, split: str, way: int, shot: int, query: int) -> int:
    """The seed of the fixed task list for one protocol (independent of the model)."""
    return derive_seed(seed, "eval-tasks", split, way, shot, query)


def task_list(
    data: FewShotDataset | SamplerFactory,
    *,
    split: str = "test",
    way: int = 5,
    shot: int = 1,
    query: int = 15,
    tasks: int = 600,
    seed: int = DEFAULT_EVAL_SEED,
    device: torch.device | str | None = None,
) -> Iterator[Episode]:
    """Yield the fixed, seeded list of ``tasks`` episodes for one (split, way, shot, query).
    ``device``: the split's images are copied there once and episodes are built there (the
    indices are drawn on the CPU, so the tasks are the same on every device)."""
    g = torch.Generator().manual_seed(task_seed(seed, split, way, shot, query))
    factory = data.sampler if isinstance(data, FewShotDataset) else data
    sampler = factory(split, way, shot, query, g)
    if device is not None and isinstance(sampler, TaskSampler):
        sampler.images = sampler.images.to(device)
    for _ in range(tasks):
        yield sampler.sample()


def ci95(accs: Sequence[float] | Tensor) -> tuple[float, float, float]:
    """(mean, 1.96 * std / sqrt(n), std) with the population std (ddof 0)."""
    a = torch.as_tensor(accs, dtype=torch.float64)
    if a.numel() == 0:
        raise ValueError("no accuracies to summarize")
    std = float(a.std(correction=0)) if a.numel() > 1 else 0.0
    return float(a.mean()), 1.96 * std / math.sqrt(a.numel()), std


@torch.no_grad()
def predict_non_transductive(
    model: nn.Module, params: Params, support_x: Tensor, query_x: Tensor
) -> Tensor:
    """Logits (Q, n) where query image i is classified in one batch with the whole support set.

    ``support_x``: (S, C, H, W); ``query_x``: (Q, C, H, W). One forward of S+1 images per query
    image (measured: as fast on CPU as one big batch with per-group BN statistics, and simpler).
    """
    return torch.cat(
        [functional_forward(model, params, torch.cat([support_x, qi[None]]))[-1:] for qi in query_x]
    )


#: how the classifier head starts at meta-test (``eval.head``): ``learned`` (the meta-learned
#: head, the paper's protocol), ``zero`` (weights and bias 0), ``proto`` (Proto-MAML: W_k = 2 c_k,
#: b_k = -||c_k||^2 from the support features' class means c_k), ``random`` (a fresh head drawn
#: like ``nn.Linear``'s default init, seeded by the task's classes, so every init of a comparison
#: gets the same head on the same task; the meta-learned features without the meta-learned head),
#: ``ncc`` (no fine-tuning: the nearest class mean of L2-normalized features)
HEADS = ("learned", "zero", "proto", "random", "ncc")


#: the seed of the stages ``eval.reinit`` re-draws (also ``kd.freeze_draw: eval``'s)
REINIT_SEED = derive_seed(DEFAULT_EVAL_SEED, "reinit")


def reinit_stages(model: nn.Module, k: int) -> nn.Module:
    """``model``, or a copy whose last ``k`` feature stages (``eval.reinit``) are re-drawn with
    each layer's default init from one fixed seed: the same new stages for every init of the
    same backbone, so a comparison differs only in the stages kept. Transfers the low-level
    features of an init and leaves the high-level ones fresh."""
    return redraw_top_stages(model, k, REINIT_SEED)


def head_features(model: nn.Module, params: Params, x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, D): the input of the classifier head under ``params``."""
    head = model.get_submodule(head_name(model))
    seen: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        functional_forward(model, params, x)
    finally:
        handle.remove()
    return seen[-1]


def _class_means(feats: Tensor, y: Tensor, way: int) -> Tensor:
    return torch.stack([feats[y == k].mean(0) for k in range(way)])


def fresh_head(
    shape: torch.Size | tuple[int, int],
    class_ids: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """A (way, D) weight and (way,) bias drawn like ``nn.Linear``'s default init
    (:func:`~apimeta.maml.linear_init`) from a generator seeded by ``class_ids``: the same head
    for the same task, whatever the init."""
    g = torch.Generator().manual_seed(derive_seed(DEFAULT_EVAL_SEED, "head", *class_ids))
    w, b = linear_init(shape[0], shape[1], g)
    return w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def start_head(model: nn.Module, params: Params, episode: Episode, head: str) -> Params:
    """``params`` with the classifier head set as ``head`` says (see :data:`HEADS`)."""
    if head == "learned":
        return params
    if head not in ("zero", "proto", "random"):
        raise ConfigError(f"eval.head must be one of {', '.join(HEADS)}; got {head!r}")
    name = head_name(model)
    w, b = params[f"{name}.weight"], params[f"{name}.bias"]
    way = len(episode.class_ids)
    if w.shape[0] != way:
        raise ConfigError(f"the head has {w.shape[0]} outputs; episodes are {way}-way")
    if head == "zero":
        new_w, new_b = torch.zeros_like(w), torch.zeros_like(b)
    elif head == "random":
        new_w, new_b = fresh_head(w.shape, episode.class_ids, w.dtype, w.device)
    else:
        with torch.no_grad():
            c = _class_means(
                head_features(model, params, episode.support_x), episode.support_y, way
            )
        new_w, new_b = (2 * c).to(w.dtype), -(c * c).sum(1).to(b.dtype)
    return {**params, f"{name}.weight": new_w, f"{name}.bias": new_b}


def adapt_and_score(
    model: nn.Module,
    init: Params,
    episode: Episode,
    *,
    steps: int = 10,
    lr: float = 0.01,
    transductive: bool = True,
    head: str = "learned",
) -> float:
    """Start the head as ``head`` says, fine-tune on the support set (``steps`` CE steps),
    return query accuracy; ``head="ncc"``: nearest normalized class mean, no fine-tuning."""
    if head == "ncc":
        with torch.no_grad():
            fs = F.normalize(head_features(model, init, episode.support_x), dim=1)
            fq = F.normalize(head_features(model, init, episode.query_x), dim=1)
            c = F.normalize(_class_means(fs, episode.support_y, len(episode.class_ids)), dim=1)
            pred = (fq @ c.T).argmax(1)
        return int((pred == episode.query_y).sum()) / int(episode.query_y.numel())
    start = start_head(model, init, episode, head)
    fast = finetune(model, start, episode.support_x, episode.support_y, steps=steps, lr=lr)
    with torch.no_grad():
        if transductive:
            logits = functional_forward(model, fast, episode.query_x)
        else:
            logits = predict_non_transductive(model, fast, episode.support_x, episode.query_x)
    return int((logits.argmax(1) == episode.query_y).sum()) / int(episode.query_y.numel())


def evaluate(
    model: nn.Module,
    data: FewShotDataset | SamplerFactory,
    *,
    split: str = "test",
    way: int = 5,
    shots: Sequence[int] = (1, 5),
    query: int = 15,
    tasks: int = 600,
    steps: int = 10,
    lr: float = 0.01,
    transductive: bool = True,
    seed: int = DEFAULT_EVAL_SEED,
    device: torch.device | str | None = None,
    keep_accs: bool = False,
    channels_last: bool = True,
    progress: EvalProgress | None = None,
    head: str = "learned",
    backend: Backend | None = None,
    reinit: int = 0,
) -> dict[str, dict[str, Any]]:
    """Evaluate the initialization ``model`` on fixed seeded tasks, per shot (``head``: how
    the classifier head starts, :data:`HEADS`; ``reinit``: re-draw the last ``reinit`` feature
    stages first, :func:`reinit_stages`).

    ``data``: a dataset (its ``split`` is used) or a ``sampler_factory(split, way, shot, query,
    generator)``. Returns ``{"1-shot": {"mean", "ci95", "std", "n", ["accs"]}, ...}`` with
    accuracies in percent. ``device``: where episodes are moved (default: the model's device;
    it must be the model's device). The model is put in eval mode during evaluation (the transductive BN
    of the meta-model uses batch statistics regardless) and restored afterwards; its parameters
    are never modified. ``channels_last``: run convolutions in NHWC layout (about 1.5x faster
    on CPU for Conv4; numerically equivalent up to float rounding). ``backend``: a parallel
    :class:`~apimeta.parallel.Backend` evaluates shards of tasks in worker processes or on Ray
    (CPU only), the same tasks and accuracies as in-process.
    """
    if tasks < 1:
        raise ConfigError(f"tasks must be >= 1, got {tasks}")
    if head not in HEADS:
        raise ConfigError(f"eval.head must be one of {', '.join(HEADS)}; got {head!r}")
    if not shots:
        raise ConfigError("give at least one shot count, e.g. shots=(1, 5)")
    model = reinit_stages(model, reinit)
    dev = torch.device(device) if device is not None else _model_device(model)
    backend = backend or Backend()
    if backend.parallel and dev.type != "cpu":
        log.warning("parallel evaluation runs on CPU workers; evaluating on %s in-process", dev)
        backend = Backend()
    settings = {
        "steps": steps,
        "lr": lr,
        "transductive": transductive,
        "head": head,
        "channels_last": channels_last,
    }
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        if backend.parallel:
            per_shot = _evaluate_sharded(
                model, data, split, way, shots, query, tasks, seed, settings, backend, progress
            )
        else:
            init = _init_params(model, channels_last)
            per_shot = {}
            for shot in shots:
                episodes = task_list(
                    data, split=split, way=way, shot=shot, query=query, tasks=tasks, seed=seed,
                    device=dev,
                )  # fmt: skip
                accs = []
                for i, ep in enumerate(episodes):
                    accs.append(_score(model, init, ep.to(dev), settings))
                    if progress is not None:
                        progress(i + 1, tasks, {"shot": shot})
                per_shot[shot] = accs
        for shot in shots:
            accs = per_shot[shot]
            mean, ci, std = ci95(accs)
            res: dict[str, Any] = {"mean": mean, "ci95": ci, "std": std, "n": len(accs)}
            if keep_accs:
                res["accs"] = accs
            results[f"{shot}-shot"] = res
            log.info("%s %d-shot: %.2f ± %.2f (%d tasks)", split, shot, mean, ci, len(accs))
    finally:
        model.train(was_training)
    return results


def _score(model: nn.Module, init: Params, ep: Episode, settings: dict[str, Any]) -> float:
    """Accuracy in % of ``init`` adapted on one episode (already on the model's device)."""
    if settings["channels_last"]:
        ep.support_x = _layout(ep.support_x, True)
        ep.query_x = _layout(ep.query_x, True)
    acc = adapt_and_score(
        model,
        init,
        ep,
        steps=settings["steps"],
        lr=settings["lr"],
        transductive=settings["transductive"],
        head=settings["head"],
    )
    return 100.0 * acc


#: tasks per parallel evaluation job (a shard): small enough to balance, big enough to amortize
SHARD_TASKS = 25


def _evaluate_sharded(
    model: nn.Module,
    data: FewShotDataset | SamplerFactory,
    split: str,
    way: int,
    shots: Sequence[int],
    query: int,
    tasks: int,
    seed: int,
    settings: dict[str, Any],
    backend: Backend,
    progress: EvalProgress | None,
) -> dict[int, list[float]]:
    """The per-task accuracies of every shot, computed in shards of :data:`SHARD_TASKS` tasks
    on ``backend``. This process draws the same seeded task list as index tensors; the model
    (on CPU) and the split's images are shipped once, each shard as indices."""
    factory = data.sampler if isinstance(data, FewShotDataset) else data
    images: dict[int, Tensor] = {}
    jobs: list[tuple] = []
    for shot in shots:
        g = torch.Generator().manual_seed(task_seed(seed, split, way, shot, query))
        sampler = factory(split, way, shot, query, g)
        images[shot] = sampler.images  # one tensor for every shot: pickled (shipped) once
        picks = [sampler.sample_indices() for _ in range(tasks)]
        for a in range(0, tasks, SHARD_TASKS):
            jobs.append((shot, query, a, picks[a : a + SHARD_TASKS]))
    cpu_model = copy.deepcopy(model).cpu()
    shared = {"model": cpu_model, "images": images, "settings": settings}
    out = {shot: [0.0] * tasks for shot in shots}
    done = dict.fromkeys(shots, 0)
    for k, accs in run_jobs(_shard_job, jobs, backend, shared=shared):
        shot, _, a, _ = jobs[k]
        out[shot][a : a + len(accs)] = accs
        done[shot] += len(accs)
        if progress is not None:
            progress(done[shot], tasks, {"shot": shot})
    return out


def _shard_job(shared: dict[str, Any], shot: int, query: int, start: int, picks: list) -> list:
    """One parallel evaluation job: the accuracies (%) of one shard of tasks, in order."""
    model, settings = shared["model"], shared["settings"]
    model.eval()
    init = _init_params(model, settings["channels_last"])
    images = shared["images"][shot]
    return [
        _score(model, init, episode_at(images, s, q, c, shot=shot, query=query), settings)
        for s, q, c in picks
    ]


def evaluate_with_config(
    model: nn.Module,
    dataset: FewShotDataset,
    cfg: RunConfig,
    *,
    split: str,
    shots: Sequence[int],
    tasks: int,
    progress: EvalProgress | None = None,
    keep_accs: bool = False,
    backend: Backend | None = None,
    seed: int = DEFAULT_EVAL_SEED,
) -> dict[str, dict[str, Any]]:
    """The meta-test protocol with a run's settings (way, query, ``eval.test_steps``,
    ``eval.test_lr`` (None: ``inner_lr``), ``eval.transductive``, ``eval.head``,
    ``eval.reinit``) on the shared seeded task list (``seed``): ``{"1-shot": ...}``
    (``keep_accs``: with the per-task accuracies, for paired comparisons)."""
    return evaluate(
        model,
        dataset,
        split=split,
        way=cfg.way,
        shots=tuple(shots),
        query=cfg.query,
        tasks=tasks,
        steps=cfg.eval.test_steps,
        lr=finetune_lr(cfg),
        transductive=cfg.eval.transductive,
        seed=seed,
        device=cfg.device,
        keep_accs=keep_accs,
        progress=progress,
        head=cfg.eval.head,
        backend=backend,
        reinit=cfg.eval.reinit,
    )


def finetune_lr(cfg: RunConfig) -> float:
    """The fine-tuning lr of meta-val/meta-test: ``eval.test_lr``, else ``inner_lr`` (the paper)."""
    return cfg.inner_lr if cfg.eval.test_lr is None else cfg.eval.test_lr


#: what meta-val tuning may vary (``apimeta bench --tune KEY=V1,V2``) -> (EvalConfig field, type)
TUNABLE: dict[str, tuple[str, type]] = {
    "lr": ("test_lr", float),
    "steps": ("test_steps", int),
    "head": ("head", str),
    "reinit": ("reinit", int),
}


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=0.01,0.1", "head=learned,zero"]`` -> ``{"lr": [0.01, 0.1], "head": [...]}``;
    ConfigError (one line) on an unknown key, a bad or repeated value, a repeated key."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or key not in TUNABLE:
            raise ConfigError(
                f"--tune {spec!r}: give KEY=V1,V2 with KEY one of {', '.join(TUNABLE)} "
                "(e.g. --tune lr=0.01,0.03,0.1)"
            )
        if key in grid:
            raise ConfigError(f"--tune {key} is given twice; put all its values in one option")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return check_grid(grid, where="--tune")


def check_grid(grid: dict[str, Any], where: str = "eval.tune") -> dict[str, list[Any]]:
    """``grid`` ({key of :data:`TUNABLE`: values}) with each value converted to its type;
    ConfigError (one line, naming ``where``) on an unknown key, a bad or repeated value."""
    out: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if key not in TUNABLE:
            raise ConfigError(f"{where}: unknown key {key!r}; use {', '.join(TUNABLE)}")
        kind = TUNABLE[key][1]
        seq = values if isinstance(values, (list, tuple)) else [values]
        try:
            vals = [kind(v) for v in seq]
        except (TypeError, ValueError):
            raise ConfigError(f"{where} {key}: values must be {kind.__name__}s") from None
        check, need = {
            "lr": (lambda v: v > 0, "> 0"),
            "steps": (lambda v: v >= 0, ">= 0"),
            "head": (lambda v: v in HEADS, f"in {', '.join(HEADS)}"),
            "reinit": (lambda v: v >= 0, ">= 0"),
        }[key]
        if not vals or not all(check(v) for v in vals) or len(set(vals)) != len(vals):
            raise ConfigError(f"{where} {key}={seq}: give distinct {key} values {need}")
        out[key] = vals
    return out


def grid_settings(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of ``grid``, in grid order; ncc (no fine-tuning) appears once per
    ``reinit``, with no lr or steps."""
    keys = list(grid)
    out: list[dict[str, Any]] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        s = dict(zip(keys, combo, strict=True))
        if s.get("head") == "ncc":
            s = {k: v for k, v in s.items() if k in ("head", "reinit")}
        if s not in out:
            out.append(s)
    return out


def setting_label(setting: dict[str, Any]) -> str:
    """``{"lr": 0.1, "head": "zero"}`` -> ``"lr=0.1 head=zero"``."""
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "run config"


def with_protocol(cfg: RunConfig, setting: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` whose eval section uses ``setting`` (keys of :data:`TUNABLE`)."""
    changes = {TUNABLE[k][0]: v for k, v in setting.items()}
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **changes))


def tune_protocol(
    model: nn.Module,
    dataset: FewShotDataset,
    cfg: RunConfig,
    grid: dict[str, list[Any]],
    *,
    shots: Sequence[int],
    tasks: int,
    val_tasks: int | None = None,
    backend: Backend | None = None,
    progress: EvalProgress | None = None,
    seed: int = DEFAULT_EVAL_SEED,
) -> dict[str, dict[str, Any]]:
    """Choose the fine-tuning protocol per shot on **meta-val**, then meta-test it.

    Every setting of :func:`grid_settings` (over the run's own protocol ``cfg.eval``) is scored
    on ``val_tasks`` (default ``eval.tasks``) seeded meta-val tasks; the best mean wins (ties:
    the first in grid order). Only the winner sees the ``tasks`` meta-test tasks (the shared
    seeded list of ``seed``, per-task accuracies kept). Returns ``{"1-shot": {"mean", "ci95",
    "std", "n", "accs", "setting": {...}, "val": {label: meta-val mean}}, ...}``.
    """
    settings = grid_settings(grid)
    n_val = cfg.eval.tasks if val_tasks is None else val_tasks
    out: dict[str, dict[str, Any]] = {}
    for shot in shots:
        key = f"{shot}-shot"
        val: dict[str, float] = {}
        best: dict[str, Any] | None = None
        for s in settings:
            res = evaluate_with_config(
                model, dataset, with_protocol(cfg, s), split="val", shots=(shot,),
                tasks=n_val, backend=backend, seed=seed,
            )  # fmt: skip
            val[setting_label(s)] = res[key]["mean"]
            if best is None or res[key]["mean"] > val[setting_label(best)]:
                best = s
        assert best is not None
        test = evaluate_with_config(
            model, dataset, with_protocol(cfg, best), split="test", shots=(shot,),
            tasks=tasks, keep_accs=True, backend=backend, progress=progress, seed=seed,
        )  # fmt: skip
        out[key] = {**test[key], "setting": best, "val": val}
        log.info("%s: meta-val chose %s", key, setting_label(best))
    return out


def meta_test(
    model: nn.Module,
    dataset: FewShotDataset,
    cfg: RunConfig,
    *,
    shots: Sequence[int],
    tasks: int,
    progress: EvalProgress | None = None,
    backend: Backend | None = None,
) -> dict[str, dict[str, Any]]:
    """A run's meta-test on the shared seeded task list, per-task accuracies kept: the run's
    protocol (:func:`evaluate_with_config`), or, when ``eval.tune`` holds a grid, the protocol
    chosen per shot on meta-val from that grid (:func:`tune_protocol`; each shot's result then
    names its ``"setting"``)."""
    if cfg.eval.tune:
        grid = check_grid(cfg.eval.tune)
        return tune_protocol(
            model, dataset, cfg, grid, shots=shots, tasks=tasks, backend=backend,
            progress=progress,
        )  # fmt: skip
    return evaluate_with_config(
        model, dataset, cfg, split="test", shots=shots, tasks=tasks, progress=progress,
        keep_accs=True, backend=backend,
    )  # fmt: skip


def summary_score(results: dict[str, dict[str, Any]]) -> float:
    """Mean of the per-shot means (the scalar used for model selection)."""
    return sum(r["mean"] for r in results.values()) / len(results)


def format_result(results: dict[str, dict[str, Any]]) -> str:
    """``"1-shot 45.12 ± 0.80 | 5-shot 61.30 ± 0.71"``."""
    return " | ".join(f"{k} {r['mean']:.2f} ± {r['ci95']:.2f}" for k, r in results.items())


def _layout(t: Tensor, channels_last: bool) -> Tensor:
    if channels_last and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _init_params(model: nn.Module, channels_last: bool) -> Params:
    """The model's parameters, detached, in the evaluation layout."""
    return {n: _layout(p.detach(), channels_last) for n, p in named_params(model).items()}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


__all__ = [
    "DEFAULT_EVAL_SEED",
    "REINIT_SEED",
    "adapt_and_score",
    "check_grid",
    "ci95",
    "evaluate",
    "evaluate_with_config",
    "finetune_lr",
    "format_result",
    "grid_settings",
    "meta_test",
    "parse_grid",
    "predict_non_transductive",
    "setting_label",
    "summary_score",
    "task_list",
    "task_seed",
    "tune_protocol",
    "with_protocol",
]
