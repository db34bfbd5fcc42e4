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

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from apimeta.data.base import FewShotDataset
from apimeta.episodes import Episode, TaskSampler
from apimeta.errors import ConfigError
from apimeta.maml import Params, finetune, functional_forward, named_params
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
) -> Iterator[Episode]:
    """Yield the fixed, seeded list of ``tasks`` episodes for one (split, way, shot, query)."""
    g = torch.Generator().manual_seed(task_seed(seed, split, way, shot, query))
    factory = data.sampler if isinstance(data, FewShotDataset) else data
    sampler = factory(split, way, shot, query, g)
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


def adapt_and_score(
    model: nn.Module,
    init: Params,
    episode: Episode,
    *,
    steps: int = 10,
    lr: float = 0.01,
    transductive: bool = True,
) -> float:
    """Fine-tune ``init`` on the support set (``steps`` CE steps), return query accuracy."""
    fast = finetune(model, init, episode.support_x, episode.support_y, steps=steps, lr=lr)
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
) -> dict[str, dict[str, Any]]:
    """Evaluate the initialization ``model`` on fixed seeded tasks, per shot.

    ``data``: a dataset (its ``split`` is used) or a ``sampler_factory(split, way, shot, query,
    generator)``. Returns ``{"1-shot": {"mean", "ci95", "std", "n", ["accs"]}, ...}`` with
    accuracies in percent. ``device``: where episodes are moved (default: the model's device;
    it must be the model's device). The model is put in eval mode during evaluation (the transductive BN
    of the meta-model uses batch statistics regardless) and restored afterwards; its parameters
    are never modified. ``channels_last``: run convolutions in NHWC layout (about 1.5x faster
    on CPU for Conv4; numerically equivalent up to float rounding).
    """
    if tasks < 1:
        raise ConfigError(f"tasks must be >= 1, got {tasks}")
    if not shots:
        raise ConfigError("give at least one shot count, e.g. shots=(1, 5)")
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    init = {n: _layout(p.detach(), channels_last) for n, p in named_params(model).items()}
    results: dict[str, dict[str, Any]] = {}
    try:
        for shot in shots:
            accs = []
            episodes = task_list(
                data, split=split, way=way, shot=shot, query=query, tasks=tasks, seed=seed
            )
            for i, ep in enumerate(episodes):
                ep = ep.to(dev)
                if channels_last:
                    ep.support_x = _layout(ep.support_x, True)
                    ep.query_x = _layout(ep.query_x, True)
                acc = adapt_and_score(
                    model, init, ep, steps=steps, lr=lr, transductive=transductive
                )
                accs.append(100.0 * acc)
                if progress is not None:
                    progress(i + 1, tasks, {"shot": shot})
            mean, ci, std = ci95(accs)
            res: dict[str, Any] = {"mean": mean, "ci95": ci, "std": std, "n": len(accs)}
            if keep_accs:
                res["accs"] = accs
            results[f"{shot}-shot"] = res
            log.info("%s %d-shot: %.2f ± %.2f (%d tasks)", split, shot, mean, ci, len(accs))
    finally:
        model.train(was_training)
    return results


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
) -> dict[str, dict[str, Any]]:
    """The meta-test protocol with a run's settings (way, query, ``eval.test_steps``,
    ``inner_lr``, ``eval.transductive``) on the shared seeded task list: ``{"1-shot": ...}``
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
        lr=cfg.inner_lr,
        transductive=cfg.eval.transductive,
        seed=DEFAULT_EVAL_SEED,
        device=cfg.device,
        keep_accs=keep_accs,
        progress=progress,
    )


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


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


__all__ = [
    "DEFAULT_EVAL_SEED",
    "adapt_and_score",
    "ci95",
    "evaluate",
    "evaluate_with_config",
    "format_result",
    "predict_non_transductive",
    "summary_score",
    "task_list",
    "task_seed",
]
