"""Feature stages of a backbone and re-drawing the top ones (``eval.reinit``).

A backbone's *stages* are its feature blocks in input-to-output order, without the classifier
head: Conv4's four conv-BN-ReLU-pool blocks, a ResNet's stem (if any) and residual blocks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from apimeta.errors import ConfigError


def feature_stages(model: nn.Module) -> list[nn.Module]:
    """The feature stages of ``model`` (a backbone or a wrapper holding one as ``.net``), in
    order; ConfigError if the backbone does not declare them (a ``stages()`` method)."""
    for m in model.modules():
        stages = getattr(m, "stages", None)
        if callable(stages):
            return list(stages())
    raise ConfigError(
        f"{type(model).__name__} declares no feature stages (a stages() method); "
        "eval.reinit needs them"
    )


def output_module(stage: nn.Module) -> nn.Module:
    """The module whose output is the stage's, for a forward hook: a stage may be a slice of a
    Sequential (Conv4's blocks), a new container the model never calls, so the hook goes on
    its last layer."""
    while isinstance(stage, nn.Sequential) and len(stage):
        stage = stage[-1]
    return stage


def check_reinit(model: nn.Module, k: int) -> list[nn.Module]:
    """The feature stages of ``model``; ConfigError (one line) unless 0 <= ``k`` <= their count."""
    stages = feature_stages(model)
    if not 0 <= k <= len(stages):
        raise ConfigError(
            f"eval.reinit must be in 0..{len(stages)} (the backbone's feature stages); got {k}"
        )
    return stages


def stage_param_groups(model: nn.Module, scales: list[float]) -> list[dict]:
    """Optimizer parameter groups of ``model`` with an ``lr_scale`` each: one group per feature
    stage named by ``scales`` (input first), then one of every other parameter at scale 1 (the
    stages not named, the head). ``scales`` empty: one group. ConfigError (one line) when
    ``scales`` names more stages than the backbone has or a scale is negative."""
    if not scales:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    stages = feature_stages(model)
    if len(scales) > len(stages):
        raise ConfigError(
            f"outer_lr_stages names {len(scales)} stages; the backbone has {len(stages)}: "
            "give at most that many multipliers"
        )
    if any(float(s) < 0 for s in scales):
        raise ConfigError(f"outer_lr_stages must be multipliers >= 0, got {list(scales)}")
    groups = [
        {"params": list(st.parameters()), "lr_scale": float(s)}
        for s, st in zip(scales, stages[: len(scales)], strict=True)
    ]
    named = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if id(p) not in named]
    return [*groups, {"params": rest, "lr_scale": 1.0}]


def redraw_top_stages(model: nn.Module, k: int, seed: int) -> nn.Module:
    """A copy of ``model`` whose last ``k`` feature stages are re-drawn with PyTorch's default
    init of each layer (``reset_parameters``) from the seed ``seed``; the other stages and
    the head are kept. ``k = 0`` returns ``model`` itself. Drawn on CPU, then moved to the
    model's device; the global RNG is left untouched."""
    if k == 0:
        return model
    stages = check_reinit(model, k)
    device = next(model.parameters()).device
    out = copy.deepcopy(model).cpu()  # drawn on CPU: the same stages whatever the device
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: no other device's RNG moves
        for stage in feature_stages(out)[len(stages) - k :]:
            for m in stage.modules():
                if hasattr(m, "reset_parameters") and m is not stage:
                    m.reset_parameters()
    return out.to(device)


def redraw_stages_(stages: list[nn.Module], seed: int) -> None:
    """Re-draw ``stages`` of a model in training in place (the same parameter tensors, so an
    optimizer keeps them): each layer's default init (``reset_parameters``; batch-norm
    statistics too) drawn on CPU from the seed ``seed`` and copied in, the values
    :func:`redraw_top_stages` gives a copy; the same on every device, the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for stage in stages:
            fresh = copy.deepcopy(stage).cpu()
            for m in fresh.modules():  # (a stage's own layers; containers have none)
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            new = fresh.state_dict()
            with torch.no_grad():
                for name, dst in stage.state_dict().items():
                    dst.copy_(new[name])


__all__ = ["check_reinit", "feature_stages", "output_module", "redraw_stages_", "redraw_top_stages"]
