"""Bi-level knowledge distillation from one API (docs/design.md 4.4-4.6).

The two levels of an API episode, as small functions on parameter dicts:

* **inner level** (:func:`inner_kd`): adapt the meta-parameters theta to the API by
  ``kd.inner_steps`` KD steps on the recovered support set S (theta' = theta - lr * grad);
* the **adapted student** (:func:`frozen_student`): theta' held fixed, the callable the
  boundary objective of the query-set recovery compares the API with;
* **outer level** (:func:`outer_kd_loss`): KD of the API into the adapted model on the
  query set Q; its gradient flows through the inner steps into theta (second order unless
  ``first_order``).

Images arrive at the API's input spec and are resized to the meta-model's (``to_model``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from apimeta.apis.base import BlackBoxAPI
from apimeta.losses import KDLoss, output_kind
from apimeta.maml import Params, functional_forward, inner_adapt

TeacherKD = Callable[[Tensor, Tensor], Tensor]
"""(student logits (B, K), API scores (B, K)) -> scalar KD loss."""


def api_kd(api: BlackBoxAPI, kd: KDLoss, T: float = 1.0) -> TeacherKD:
    """``kd`` at temperature ``T`` against ``api``'s outputs (logits, or probabilities for
    probs/top-k/label APIs)."""
    is_probs = output_kind(api.info.output) != "logits"

    def fn(logits: Tensor, teacher: Tensor) -> Tensor:
        return kd(logits, teacher, T=T, teacher_is_probs=is_probs)

    return fn


def inner_kd(
    model: nn.Module,
    params: Params,
    api: BlackBoxAPI,
    images: Tensor,
    kd: TeacherKD,
    *,
    steps: int,
    lr: float,
    first_order: bool = False,
    cache_outputs: bool = True,
    to_model: Callable[[Tensor], Tensor] = lambda x: x,
) -> Params:
    """Adapt ``params`` to ``api`` on the support images (B, C, s, s) at the API's spec.

    ``cache_outputs``: query the API once and distil towards those outputs at every step (ours,
    B queries); False re-queries it at every step (the reference, ``steps`` x B queries).
    Returns theta' (a new dict, connected to ``params`` unless ``first_order``).
    """
    if cache_outputs:
        teacher: Tensor | None = api.query(images)
        loss_fn = kd
    else:

        def loss_fn(logits: Tensor, _: Tensor | None) -> Tensor:
            return kd(logits, api.query(images))

        teacher = None
    return inner_adapt(
        model,
        params,
        to_model(images),
        teacher,
        loss_fn=loss_fn,
        steps=steps,
        lr=lr,
        first_order=first_order,
    )


def frozen_student(
    model: nn.Module, fast: Params, to_model: Callable[[Tensor], Tensor] = lambda x: x
) -> Callable[[Tensor], Tensor]:
    """The adapted model theta' as a fixed function x (API spec) -> logits, without gradients."""
    frozen = {k: v.detach() for k, v in fast.items()}

    def student(x: Tensor) -> Tensor:
        with torch.no_grad():
            return functional_forward(model, frozen, to_model(x))

    return student


def outer_kd_loss(
    model: nn.Module,
    fast: Params,
    images: Tensor,
    teacher: Tensor,
    kd: TeacherKD,
    to_model: Callable[[Tensor], Tensor] = lambda x: x,
) -> tuple[Tensor, Tensor]:
    """(KD loss of the adapted model on the query images towards ``teacher`` (B, K), its
    logits (B, K)). Differentiable w.r.t. the meta-parameters behind ``fast``."""
    logits = functional_forward(model, fast, to_model(images))
    return kd(logits, teacher), logits


__all__ = ["TeacherKD", "api_kd", "frozen_student", "inner_kd", "outer_kd_loss"]
