"""Functional MAML core: inner-loop adaptation on parameter dicts (any ``nn.Module``).

Parameters live in a plain ``dict[str, Tensor]`` (``named_params(model)``) and the model is run
with :func:`torch.func.functional_call`, so adapted ("fast") weights are ordinary tensors in the
autograd graph. Buffers (standard BatchNorm running stats, the ``Normalized`` mean/std) are taken
from the module unless overridden; transductive BN has no running stats at all.

* :func:`inner_adapt` — ``steps`` gradient steps of any differentiable ``loss_fn(logits, y)``:
  CE for MAML, a KD loss for the KD inner loop (``y`` = teacher outputs). Second order by default.
* :func:`maml_outer_loss` — adapt on an episode's support set, CE on its query set.
* :func:`finetune` — the graph-free variant used at evaluation time (fast, no meta-gradient).

Meta-gradient semantics (``theta`` = initial params, ``theta'`` = adapted):

* ``first_order=False`` (default): ``theta' = theta - lr * grad L(theta)`` with the inner gradient
  kept in the graph (``create_graph=True``), so ``d L_q(theta') / d theta`` is exact (Hessian terms
  included).
* ``first_order=True``: inner gradients are detached, so ``d theta' / d theta = I`` and the
  meta-gradient is the FOMAML one, ``grad L_q`` evaluated at ``theta'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from apimeta.episodes import Episode
from apimeta.errors import ConfigError

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
# float | scalar Tensor | {param name: float | Tensor} ; or a sequence of those, one per step
LR = float | Tensor | Mapping[str, float | Tensor]
LRSpec = LR | Sequence[LR]


def named_params(model: nn.Module, *, detach: bool = False) -> Params:
    """``{name: parameter}`` of every trainable parameter (``detach=True``: detached copies that
    require grad, i.e. fresh leaves for graph-free adaptation)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        out[name] = p.detach().requires_grad_(True) if detach else p
    return out


def functional_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``model(x)`` with ``params`` (and optional ``buffers``) substituted; (B, ...) -> (B, C).

    Parameters/buffers missing from the dicts fall back to the module's own tensors.
    """
    tensors = dict(params) if buffers is None else {**buffers, **params}
    return functional_call(model, tensors, (x,), strict=False)


def _lr_for_step(lr: LRSpec, step: int, steps: int) -> LR:
    if isinstance(lr, Sequence) and not isinstance(lr, str):
        if len(lr) != steps:
            raise ValueError(f"per-step lr needs {steps} entries, got {len(lr)}")
        return lr[step]
    return lr  # type: ignore[return-value]


def _lr_for_param(lr: LR, name: str) -> float | Tensor:
    if isinstance(lr, Mapping):
        if name not in lr:
            raise KeyError(f"per-parameter lr has no entry for {name!r}")
        return lr[name]
    return lr


def inner_adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor | None = None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    steps: int,
    lr: LRSpec,
    first_order: bool = False,
    create_graph: bool | None = None,
    buffers: Mapping[str, Tensor] | None = None,
) -> Params:
    """Adapt ``params`` with ``steps`` full-batch gradient steps of ``loss_fn(model(x), y)``.

    ``x``: (B, C, H, W) inputs; ``y``: whatever ``loss_fn`` takes as target ((B,) labels for CE,
    (B, n) teacher scores for KD; ``None`` calls ``loss_fn(logits, None)``). ``lr``: a float, a
    scalar tensor (learnable: gradients flow into it), a ``{name: lr}`` dict (per parameter; every
    adapted name needs an entry), or a sequence of those with one entry per step.
    ``create_graph`` defaults to ``not first_order`` (and is off when grad mode is off).
    Parameters that do not require grad are kept fixed. Returns the adapted params (new dict; the
    input dict and the module are not modified). Works under ``torch.no_grad`` (grad is enabled
    locally for the inner gradients).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    outer_grad = torch.is_grad_enabled()
    if create_graph is None:
        create_graph = (not first_order) and outer_grad
    if first_order:
        create_graph = False
    fast: Params = dict(params)
    names = [n for n, p in fast.items() if p.requires_grad]
    track = outer_grad or create_graph  # keep the adapted params connected to the init
    for step in range(steps):
        if not names:
            break
        with torch.enable_grad():
            logits = functional_forward(model, fast, x, buffers)
            loss = loss_fn(logits, y)
            grads = torch.autograd.grad(
                loss, [fast[n] for n in names], create_graph=create_graph, allow_unused=True
            )
        step_lr = _lr_for_step(lr, step, steps)
        new = dict(fast)
        with torch.set_grad_enabled(track):
            for n, g in zip(names, grads, strict=True):
                if g is None:
                    continue
                if not create_graph:
                    g = g.detach()
                upd = fast[n] - _lr_for_param(step_lr, n) * g
                # graph-free mode: a fresh leaf, so the next step can differentiate again
                new[n] = upd if track else upd.requires_grad_(True)
        fast = new
    return fast


def finetune(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: LRSpec,
    loss_fn: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
) -> Params:
    """Graph-free adaptation for evaluation: like :func:`inner_adapt` but every step's result is
    a fresh detached leaf, so no graph accumulates and nothing flows back to the init.

    ``params=None`` uses the model's own parameters. Returns detached adapted params.
    """
    src = named_params(model) if params is None else params
    leaves = {n: p.detach().requires_grad_(True) for n, p in src.items()}
    with torch.no_grad():
        fast = inner_adapt(
            model,
            leaves,
            x,
            y,
            loss_fn=loss_fn,
            steps=steps,
            lr=lr,
            first_order=True,
            buffers=buffers,
        )
    return {n: p.detach() for n, p in fast.items()}


@dataclass
class OuterResult:
    """``loss``: scalar query loss (differentiable w.r.t. the init); ``logits``: (N*Q, way);
    ``acc``: query accuracy in [0, 1], a 0-dim tensor on the episode's device (no host sync;
    ``accuracy`` is it as a python float); ``params``: the adapted params."""

    loss: Tensor
    logits: Tensor
    acc: Tensor
    params: Params

    @property
    def accuracy(self) -> float:
        return float(self.acc)


#: how the head starts every training inner loop (``train_head``): ``learned`` (the meta-learned
#: head, MAML), ``zero`` (the zeroing trick) or ``random`` (a fresh head per inner loop); with
#: zero or random the head is not meta-learned, only the features, as at meta-test with
#: ``eval.head`` zero or random
TRAIN_HEADS = ("learned", "zero", "random")


def head_name(model: nn.Module) -> str:
    """The qualified name of the model's classifier head (its last ``nn.Linear``)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear classifier head (nn.Linear)")
    return names[-1]


def linear_init(way: int, dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A (way, dim) weight and (way,) bias drawn U(-1/sqrt(dim), 1/sqrt(dim)), as
    ``nn.Linear``'s default init draws them (on the generator's device)."""
    bound = 1.0 / math.sqrt(dim)
    dev = generator.device
    w = (torch.rand(way, dim, generator=generator, device=dev) * 2 - 1) * bound
    b = (torch.rand(way, generator=generator, device=dev) * 2 - 1) * bound
    return w, b


def start_inner_head(
    model: nn.Module, params: Mapping[str, Tensor], mode: str, generator: torch.Generator
) -> Params:
    """``params`` with the head replaced as :data:`TRAIN_HEADS` ``mode`` says (a new dict; the
    new head is a leaf that requires grad, so the inner loop adapts it)."""
    if mode == "learned":
        return dict(params)
    if mode not in ("zero", "random"):
        raise ConfigError(f"train_head must be one of {', '.join(TRAIN_HEADS)}; got {mode!r}")
    name = head_name(model)
    w = params[f"{name}.weight"]
    if mode == "zero":
        new_w, new_b = torch.zeros_like(w), torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    else:
        new_w, new_b = linear_init(w.shape[0], w.shape[1], generator)
    return {
        **params,
        f"{name}.weight": new_w.to(w).requires_grad_(True),
        f"{name}.bias": new_b.to(w).requires_grad_(True),
    }


def maml_outer_loss(
    model: nn.Module,
    params: Mapping[str, Tensor] | None,
    episode: Episode,
    *,
    steps: int,
    lr: LRSpec,
    first_order: bool = False,
    inner_loss: LossFn = F.cross_entropy,
    outer_loss: LossFn = F.cross_entropy,
    buffers: Mapping[str, Tensor] | None = None,
) -> OuterResult:
    """MAML on one episode: adapt on (support_x, support_y), then ``outer_loss`` on the query set.

    ``params=None`` uses ``named_params(model)`` (the meta-parameters). Backpropagating
    ``result.loss`` gives the (second-order unless ``first_order``) meta-gradient into them.
    """
    theta = named_params(model) if params is None else params
    fast = inner_adapt(
        model,
        theta,
        episode.support_x,
        episode.support_y,
        loss_fn=inner_loss,
        steps=steps,
        lr=lr,
        first_order=first_order,
        buffers=buffers,
    )
    logits = functional_forward(model, fast, episode.query_x, buffers)
    loss = outer_loss(logits, episode.query_y)
    acc = (logits.detach().argmax(1) == episode.query_y).float().mean()
    return OuterResult(loss=loss, logits=logits, acc=acc, params=fast)


__all__ = [
    "TRAIN_HEADS",
    "LossFn",
    "OuterResult",
    "Params",
    "finetune",
    "functional_forward",
    "head_name",
    "inner_adapt",
    "linear_init",
    "maml_outer_loss",
    "named_params",
    "start_inner_head",
]
