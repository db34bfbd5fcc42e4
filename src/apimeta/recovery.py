"""Data recovery from one black-box API (method.md 4.2, 4.5; early stop of 8.5).

:func:`recover` inverts an API with a freshly initialized generator: it optimizes the generator
weights and latents so that augmented generator outputs get a low per-sample loss from the API,
estimating the loss gradient by zero-order finite differences (:mod:`apimeta.zo`), or, with
``white_box=True``, by autograd through the API's model (an upper bound, NOT black-box).

Output modes: ``support`` mode works with ``logits``, ``probs`` and ``topk:K`` APIs (CE on the
logits, or on the log of the returned probability, floored at 1e-8; a target outside the top K
has a flat loss). ``boundary`` mode needs ``logits`` or ``probs``. ``label`` APIs are refused in
black-box mode (the loss is piecewise constant, so finite differences carry no signal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from apimeta.apis.base import BlackBoxAPI
from apimeta.errors import ConfigError, QueryBudgetExceeded
from apimeta.losses import boundary_objective, output_kind, recovery_ce, target_prob
from apimeta.models.generator import Generator, reset_parameters
from apimeta.models.wrappers import match_channels
from apimeta.transforms import center_or_random_crop, crop_flip, resize
from apimeta.zo import ForwardEstimator, ZOEstimator

log = logging.getLogger(__name__)

MODES = ("support", "boundary")
BEST_ITERATE = ("true_loss", "surrogate", "last")

Progress = Callable[[int, dict[str, Any]], None]
"""progress(iteration, {"loss": mean true loss, "queries": used so far, "iters": total})."""


@dataclass
class Recovered:
    """The result of one recovery call.

    ``images`` (B, C, s, s) in [0, 1]: the kept iterate *before* augmentation, at the API's input
    spec (or the generator spec passed to :func:`recover`; the API then saw a center crop or
    resize of it). ``targets`` (B,) local labels (j mod n_classes). ``api_outputs`` (B, K): API scores
    for ``images`` (``outputs_at="images"``: one final query), or, when that query was skipped
    or unaffordable, the scores of the kept iterate's augmented view (``"augmented"``), or None.
    ``fidelity``: mean share the API assigns to each target class (softmax prob for logits);
    ``accuracy``: share of argmax == target. ``queries``: images sent during this call, final
    query included. ``loss_curve``: mean true loss per iteration. ``best_iter``: index of the
    kept iterate (-1 if no iteration ran: ``images`` is then the untrained G(z)).
    """

    images: Tensor
    targets: Tensor
    api_outputs: Tensor | None
    fidelity: float
    accuracy: float
    queries: int
    loss_curve: list[float]
    iters: int
    best_iter: int
    budget_exhausted: bool = False
    early_stopped: bool = False
    mode: str = "support"
    white_box: bool = False
    api_name: str = ""
    classes: tuple[int, ...] = ()
    outputs_at: str = "images"
    extra: dict[str, Any] = field(default_factory=dict)


def _device_of(api: Any) -> torch.device:
    dev = getattr(api, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _subgenerator(generator: torch.Generator, device: torch.device | str) -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def recover(
    api: BlackBoxAPI,
    *,
    generator: torch.Generator,
    n_per_class: int = 10,
    iters: int = 50,
    mode: str = "support",
    student: Callable[[Tensor], Tensor] | None = None,
    adv: float = 1.0,
    estimator: ZOEstimator | None = None,
    gen_lr: float = 1e-3,
    nz: int = 256,
    ngf: int = 64,
    best_iterate: str = "true_loss",
    early_stop_prob: float | None = None,
    white_box: bool = False,
    white_box_model: nn.Module | None = None,
    discrepancy: str | None = None,
    final_query: bool = True,
    aug_pad: int = 4,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Recovered:
    """Recover B = n_per_class x n_classes images from ``api`` (method.md 4.2).

    Fresh generator (init of 4.2 step 1) and z ~ N(0, I) (B, nz); Adam(lr=gen_lr, betas
    (0.5, 0.999)) over both. Each iteration: x_hat = G(z); x = crop_flip(x_hat) (per image,
    seeded); ZO estimate g of the per-sample loss gradients at x (base + perturbed queries);
    backward of S = (1/B) sum <x_i, g_i>; Adam step. The kept iterate is chosen by
    ``best_iterate``: ``true_loss`` (lowest mean loss at the unperturbed x, no extra queries),
    ``surrogate`` (lowest S, the reference) or ``last``.

    ``mode="boundary"``: loss CE - adv * m_i * D(A(x), student(x_i)) (method.md 4.5) with the
    ``student`` (callable x -> logits, the adapted meta-model) evaluated once per iteration at the
    unperturbed x and held fixed; D is L1 (``discrepancy="l1"``, default in ZO) or KL (default
    with ``white_box``). ``early_stop_prob``: stop once every sample's target share exceeds it.

    Budget: before each iteration the ledger must afford the iteration (plus the B-image final
    query when ``final_query``); otherwise recovery stops and returns the kept iterate with
    ``budget_exhausted=True`` (a :class:`QueryBudgetExceeded` raised mid-iteration, e.g. by a
    ledger shared with other threads, is handled the same way; that iteration is discarded).

    ``white_box=True`` (NOT black-box; an upper bound): uses the true gradient of the loss on
    ``white_box_model``'s raw logits (the API's own model, taking [0, 1] images); each iteration
    still charges B forward queries to ``api.ledger``; the final query goes through ``api``.
    ``image_size``/``channels``: the generator's output spec (default: the API's). Images are
    then mapped to the API's spec after crop_flip: a random crop when larger (API-MH: 32-px APIs
    see a random 32x32 crop of 84-px images), a bilinear resize when smaller, and
    ``match_channels`` for 1 <-> 3 channels; ``images`` stay at the generator's spec.
    ``generator``: all randomness (generator init, z, augmentation, ZO directions) derives from it.
    """
    if mode not in MODES:
        raise ConfigError(f"recovery mode must be one of {MODES}, got {mode!r}")
    if best_iterate not in BEST_ITERATE:
        raise ConfigError(f"best_iterate must be one of {BEST_ITERATE}, got {best_iterate!r}")
    if n_per_class < 1 or iters < 0:
        raise ConfigError(f"need n_per_class >= 1 and iters >= 0, got {n_per_class}, {iters}")
    if mode == "boundary" and student is None:
        raise ConfigError("boundary recovery needs the adapted student (student=callable)")
    if white_box and white_box_model is None:
        raise ConfigError(
            "white_box=True needs white_box_model (the API's own nn.Module); black-box APIs "
            "cannot give true gradients"
        )
    info = api.info
    api_kind = output_kind(info.output)
    kind = "logits" if white_box else api_kind
    if kind == "label":
        recovery_ce(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), kind)  # raises
    if mode == "boundary" and kind not in ("logits", "probs"):
        raise ConfigError(
            f"boundary recovery needs an API with logits or probs output; {info.name!r} returns "
            f"{info.output!r}. Use mode='support' (adv=0) for this API."
        )
    disc = discrepancy or ("kl" if white_box else "l1")
    est = estimator if estimator is not None else ForwardEstimator()
    dev = torch.device(device) if device is not None else _device_of(api)

    n_cls = info.n_classes
    b = n_per_class * n_cls
    targets = torch.arange(b, device=dev) % n_cls
    init_g = _subgenerator(generator, "cpu")
    aug_g = _subgenerator(generator, "cpu")
    zo_g = _subgenerator(generator, dev)

    gen_size = int(image_size or info.image_size)
    gen_channels = int(channels or info.channels)

    def to_api(x_hat: Tensor) -> Tensor:
        """Augment generator output and bring it to the API's input spec (differentiable)."""
        x = crop_flip(x_hat, aug_g, pad=aug_pad) if aug_pad > 0 else x_hat
        x = match_channels(x, info.channels)
        if gen_size > info.image_size:
            x = center_or_random_crop(x, info.image_size, aug_g)
        elif gen_size < info.image_size:
            x = resize(x, info.image_size).clamp(0.0, 1.0)
        return x

    def api_view(x_hat: Tensor) -> Tensor:
        """Kept images as the API sees them, without augmentation (for the final query)."""
        x = match_channels(x_hat, info.channels)
        if gen_size > info.image_size:
            return center_or_random_crop(x, info.image_size, None)
        return resize(x, info.image_size).clamp(0.0, 1.0)

    gen = Generator(nz=nz, ngf=ngf, image_size=gen_size, channels=gen_channels)
    reset_parameters(gen, init_g)
    gen = gen.to(dev).train()
    z = torch.randn((b, nz), generator=init_g).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([*gen.parameters(), z], lr=gen_lr, betas=(0.5, 0.999))

    used = 0

    def query(x: Tensor) -> Tensor:
        nonlocal used
        out = api.query(x)
        used += int(x.shape[0])
        return out

    student_ref: dict[str, Tensor] = {}

    def loss_fn(scores: Tensor, idx: Tensor) -> Tensor:
        y = targets[idx]
        if mode == "boundary" and adv != 0:
            return boundary_objective(scores, y, student_ref["s"][idx], kind, adv, disc)
        return recovery_ce(scores, y, kind)

    cost = b if white_box else est.cost(b, base=True)
    reserve = b if final_query else 0
    best_score = float("inf")
    best_images: Tensor | None = None
    best_scores: Tensor | None = None
    best_iter = -1
    curve: list[float] = []
    exhausted = early = False
    for it in range(iters):
        if not api.ledger.can_afford(cost + reserve):
            exhausted = True
            log.info("recovery from %s stopped at iteration %d: query budget", info.name, it)
            break
        x_hat = gen(z)
        x = to_api(x_hat)
        if mode == "boundary":
            with torch.no_grad():
                student_ref["s"] = student(x.detach()).detach().float()  # type: ignore[misc]
        try:
            if white_box:
                api.ledger.charge(info.name, b)
                used += b
                xg = x.detach().requires_grad_(True)
                scores_wb = white_box_model(xg).float()  # type: ignore[misc]
                losses = loss_fn(scores_wb, torch.arange(b, device=dev))
                (grad,) = torch.autograd.grad(losses.sum(), xg)
                base_loss, base_scores = losses.detach(), scores_wb.detach()
            else:
                res = est.estimate(x.detach(), query, loss_fn, zo_g, base=True)
                assert res.base_loss is not None and res.base_scores is not None
                grad, base_loss, base_scores = res.grad, res.base_loss, res.base_scores
        except QueryBudgetExceeded:
            exhausted = True
            log.info("recovery from %s: budget exceeded mid-iteration %d", info.name, it)
            break
        surrogate = (x * grad.detach()).sum() / b
        opt.zero_grad(set_to_none=True)
        surrogate.backward()
        opt.step()

        mean_loss = float(base_loss.mean())
        curve.append(mean_loss)
        score = {
            "true_loss": mean_loss,
            "surrogate": float(surrogate.detach()),
            "last": -float(it),
        }[best_iterate]
        if score <= best_score or best_images is None:
            best_score, best_iter = score, it
            best_images = x_hat.detach().clone()
            best_scores = base_scores.detach().clone()
        if progress is not None:
            progress(it, {"loss": mean_loss, "queries": used, "iters": iters})
        if early_stop_prob is not None:
            share = target_prob(base_scores, targets, kind)
            if bool((share > early_stop_prob).all()):
                early = True
                break
    n_run = len(curve)

    if best_images is None:  # no iteration ran: return the untrained generator's output
        with torch.no_grad():  # train-mode BN, as during recovery
            best_images = gen(z).detach().clone()

    outputs: Tensor | None = None
    outputs_at = "none"
    out_kind = api_kind
    if final_query and api.ledger.can_afford(b):
        try:
            outputs = query(api_view(best_images))
            outputs_at = "images"
        except QueryBudgetExceeded:
            outputs = None
    if outputs is None and best_scores is not None:
        outputs, outputs_at = best_scores, "augmented"
        out_kind = kind
    if outputs is not None:
        fidelity = float(target_prob(outputs, targets, out_kind).mean())
        accuracy = float((outputs.argmax(1) == targets).float().mean())
    else:
        fidelity = accuracy = float("nan")
    log.debug(
        "recovered %d images from %s: fidelity %.3f, %d queries, %d iters",
        b,
        info.name,
        fidelity,
        used,
        n_run,
    )
    return Recovered(
        images=best_images,
        targets=targets,
        api_outputs=outputs,
        fidelity=fidelity,
        accuracy=accuracy,
        queries=used,
        loss_curve=curve,
        iters=n_run,
        best_iter=best_iter,
        budget_exhausted=exhausted,
        early_stopped=early,
        mode=mode,
        white_box=white_box,
        api_name=info.name,
        classes=tuple(info.classes),
        outputs_at=outputs_at,
    )


__all__ = ["BEST_ITERATE", "MODES", "Recovered", "recover"]
