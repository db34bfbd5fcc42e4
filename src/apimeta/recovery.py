"""Data recovery from one black-box API (docs/design.md 4.2, 4.5; early stop of 8.5).

:func:`recover` inverts an API: it optimizes a generator's weights and latents so that augmented
generator outputs get a low per-sample loss from the API. It is built from parts:

* a **gradient source** (:class:`GradientSource`): :class:`ZOGradient` (zero-order finite
  differences through queries, :mod:`apimeta.zo`; the black-box default) or
  :class:`WhiteBoxGradient` (autograd through the API's own model: an upper bound, NOT black-box);
* an **objective** (:class:`Objective`): :class:`SupportCE` (cross-entropy to the target class)
  or :class:`Boundary` (CE minus the masked discrepancy to an adapted student, 4.5);
* a :class:`~apimeta.run_config.RecoveryConfig` (batch, iterations, generator size, iterate
  selection, early stop);
* optionally the **generator and latents** to train (a method with a persistent or shared
  generator passes its own; by default a fresh one is initialized from the RNG).

Output modes: :class:`SupportCE` works with ``logits``, ``probs`` and ``topk:K`` APIs (CE on the
logits, or on the log of the returned probability, floored at 1e-8; a target outside the top K
has a flat loss); :class:`Boundary` needs ``logits`` or ``probs``. ``label`` APIs are refused in
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
from apimeta.registry import Registry
from apimeta.run_config import RecoveryConfig
from apimeta.transforms import center_or_random_crop, crop_flip, resize
from apimeta.zo import ForwardEstimator, LossFn, QueryFn, ZOEstimator, zo_surrogate

log = logging.getLogger(__name__)

Progress = Callable[[int, dict[str, Any]], None]
"""progress(iteration, {"loss": mean true loss, "queries": used so far, "iters": total})."""

#: how the kept iterate is chosen (``recovery.best_iterate``): name -> score(iteration, mean true
#: loss, surrogate) where the lowest score wins (ties: the later iterate)
ITERATES: Registry[Callable[[int, float, float], float]] = Registry("best_iterate")
ITERATES.register("true_loss")(lambda it, loss, surrogate: loss)
ITERATES.register("surrogate")(lambda it, loss, surrogate: surrogate)
ITERATES.register("last")(lambda it, loss, surrogate: -float(it))


# ----------------------------------------------------------------------------- gradient sources


@dataclass
class Gradient:
    """One gradient estimate at x: ``grad`` (B, C, H, W) of the per-sample losses, the losses
    ``base_loss`` (B,) and API scores ``base_scores`` (B, K) at the unperturbed x. ``charged``:
    images the source billed to the ledger itself (not sent through ``query``)."""

    grad: Tensor
    base_loss: Tensor
    base_scores: Tensor
    charged: int = 0


class GradientSource:
    """Where the per-sample loss gradients at the augmented images come from."""

    white_box: bool = False

    def cost(self, batch: int) -> int:
        """Queries charged per recovery iteration on ``batch`` images."""
        raise NotImplementedError

    def score_kind(self, api: BlackBoxAPI) -> str:
        """The output kind the objective sees (the API's, or raw logits for white-box)."""
        return output_kind(api.info.output)

    def estimate(
        self, x: Tensor, api: BlackBoxAPI, query: QueryFn, loss_fn: LossFn, rng: torch.Generator
    ) -> Gradient:
        """The estimate at x (B, C, H, W); ``query`` sends images to ``api`` (and counts them)."""
        raise NotImplementedError


class ZOGradient(GradientSource):
    """Zero-order estimates through queries (black-box); ``estimator`` default: forward, q=10."""

    def __init__(self, estimator: ZOEstimator | None = None):
        self.estimator = estimator if estimator is not None else ForwardEstimator()

    def cost(self, batch: int) -> int:
        return self.estimator.cost(batch, base=True)

    def estimate(
        self, x: Tensor, api: BlackBoxAPI, query: QueryFn, loss_fn: LossFn, rng: torch.Generator
    ) -> Gradient:
        res = self.estimator.estimate(x, query, loss_fn, rng, base=True)
        assert res.base_loss is not None and res.base_scores is not None
        return Gradient(res.grad, res.base_loss, res.base_scores)


class WhiteBoxGradient(GradientSource):
    """True gradients through ``model``, the API's own module taking [0, 1] images (NOT
    black-box; an upper bound). Each iteration still charges B forward queries to the ledger."""

    white_box = True

    def __init__(self, model: nn.Module | None):
        if model is None:
            raise ConfigError(
                "white-box recovery needs the API's own nn.Module (white_box_model); "
                "black-box APIs cannot give true gradients"
            )
        self.model = model

    def cost(self, batch: int) -> int:
        return batch

    def score_kind(self, api: BlackBoxAPI) -> str:
        return "logits"

    def estimate(
        self, x: Tensor, api: BlackBoxAPI, query: QueryFn, loss_fn: LossFn, rng: torch.Generator
    ) -> Gradient:
        b = int(x.shape[0])
        api.ledger.charge(api.info.name, b)
        xg = x.detach().requires_grad_(True)
        scores = self.model(xg).float()
        losses = loss_fn(scores, torch.arange(b, device=x.device))
        (grad,) = torch.autograd.grad(losses.sum(), xg)
        return Gradient(grad, losses.detach(), scores.detach(), charged=b)


def gradient_source(
    estimator: ZOEstimator | None, api: BlackBoxAPI, white_box: bool
) -> GradientSource:
    """:class:`WhiteBoxGradient` through ``api``'s own model if ``white_box``, else ZO."""
    if not white_box:
        return ZOGradient(estimator)
    model = getattr(api, "white_box_model", None)
    if model is None:
        raise ConfigError(
            f"white-box recovery needs in-process APIs; {api.info.name!r} is "
            f"{type(api).__name__}. Use a local zoo directory or zo.enabled=true."
        )
    return WhiteBoxGradient(model())


# ----------------------------------------------------------------------------- objectives


class Objective:
    """The per-sample recovery loss of the API's scores for target labels."""

    mode: str = "support"

    def setup(self, kind: str, white_box: bool) -> None:
        """Check the objective works with scores of ``kind``; called before any query."""

    def prepare(self, x: Tensor) -> None:
        """Called once per iteration with the unperturbed augmented images x (B, C, H, W)."""

    def loss(self, scores: Tensor, targets: Tensor, idx: Tensor, kind: str) -> Tensor:
        """Per-sample losses (n,) of ``scores`` (n, K) for sample indices ``idx`` (n,)."""
        raise NotImplementedError


class SupportCE(Objective):
    """Cross-entropy to each image's target class (the support set S, docs/design.md 4.2)."""

    mode = "support"

    def loss(self, scores: Tensor, targets: Tensor, idx: Tensor, kind: str) -> Tensor:
        return recovery_ce(scores, targets, kind)


class Boundary(Objective):
    """``CE - adv * m_i * D(A(x), student(x_i))`` (docs/design.md 4.5): images the API labels
    as the target but the adapted ``student`` (callable x -> logits) does not agree with.

    The student is evaluated once per iteration at the unperturbed x and held fixed. ``D``:
    ``"l1"`` (the default in ZO) or ``"kl"`` (the default with white-box gradients).
    ``adv=0`` is exactly :class:`SupportCE`.
    """

    mode = "boundary"

    def __init__(
        self,
        student: Callable[[Tensor], Tensor] | None,
        adv: float = 1.0,
        discrepancy: str | None = None,
    ):
        if student is None:
            raise ConfigError("boundary recovery needs the adapted student (a callable)")
        self.student, self.adv, self.discrepancy = student, float(adv), discrepancy
        self._ref: Tensor | None = None

    def setup(self, kind: str, white_box: bool) -> None:
        if kind not in ("logits", "probs"):
            raise ConfigError(
                f"boundary recovery needs an API with logits or probs output, not {kind!r}; "
                "recover with the support objective (kd.adv=0) for this API."
            )
        if self.discrepancy is None:
            self.discrepancy = "kl" if white_box else "l1"

    def prepare(self, x: Tensor) -> None:
        with torch.no_grad():
            self._ref = self.student(x.detach()).detach().float()

    def loss(self, scores: Tensor, targets: Tensor, idx: Tensor, kind: str) -> Tensor:
        if self.adv == 0:
            return recovery_ce(scores, targets, kind)
        assert self._ref is not None and self.discrepancy is not None
        return boundary_objective(scores, targets, self._ref[idx], kind, self.adv, self.discrepancy)


# ----------------------------------------------------------------------------- recover


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
    ``generator``/``latents``: what was trained (the caller's, if it passed them; else this
    process's reused generator, which the next :func:`recover` re-initializes).
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
    generator: Generator | None = None
    latents: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _device_of(api: Any) -> torch.device:
    dev = getattr(api, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


_REUSED: dict[tuple, Generator] = {}
_COMPILED: dict[int, tuple[Generator, nn.Module]] = {}


def reused_generator(
    nz: int, ngf: int, image_size: int, channels: int, device: torch.device
) -> Generator:
    """This process's generator of that shape on ``device``, built once and reused by every
    :func:`recover` that is not given one (it re-initializes it in place, so results equal a
    new generator's; a compiled generator then compiles once per process)."""
    key = (nz, ngf, image_size, channels, str(device))
    if key not in _REUSED:
        with torch.random.fork_rng(devices=[]):  # construction must not move the global RNG
            _REUSED[key] = Generator(nz=nz, ngf=ngf, image_size=image_size, channels=channels)
        _REUSED[key].to(device)
    return _REUSED[key]


def compiled(gen: Generator) -> nn.Module:
    """``torch.compile(gen)``, compiled once per generator object (``recovery.compile``)."""
    hit = _COMPILED.get(id(gen))
    if hit is None or hit[0] is not gen:
        hit = _COMPILED[id(gen)] = (gen, torch.compile(gen))
    return hit[1]


def _subgenerator(rng: torch.Generator, device: torch.device | str) -> torch.Generator:
    seed = int(torch.randint(0, 2**62, (1,), generator=rng, device=rng.device))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def recover(
    api: BlackBoxAPI,
    cfg: RecoveryConfig | None = None,
    *,
    rng: torch.Generator,
    gradient: GradientSource | None = None,
    objective: Objective | None = None,
    generator: Generator | None = None,
    latents: Tensor | None = None,
    final_query: bool = True,
    aug_pad: int = 4,
    image_size: int | None = None,
    channels: int | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    regularizer: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Recovered:
    """Recover B = ``cfg.per_class`` x n_classes images from ``api`` (docs/design.md 4.2).

    Generator: ``generator`` if given (trained as it is), else a fresh one (init of 4.2 step 1,
    ``cfg.nz``/``cfg.ngf``); latents ``latents`` (B, nz) if given, else z ~ N(0, I). Adam
    (lr ``cfg.gen_lr``, betas (0.5, 0.999)) over both. Each iteration: x_hat = G(z);
    x = crop_flip(x_hat) (per image, seeded); the ``gradient`` source's estimate g of the
    ``objective``'s per-sample loss gradients at x; backward of S = (1/B) sum <x_i, g_i>; Adam
    step. The kept iterate is chosen by ``cfg.best_iterate`` (:data:`ITERATES`): ``true_loss``
    (lowest mean loss at the unperturbed x, no extra queries), ``surrogate`` (lowest S, the
    reference) or ``last``. ``cfg.early_stop_prob``: stop once every sample's target share
    exceeds it.

    Budget: before each iteration the ledger must afford the iteration (plus the B-image final
    query when ``final_query``); otherwise recovery stops and returns the kept iterate with
    ``budget_exhausted=True`` (a :class:`QueryBudgetExceeded` raised mid-iteration, e.g. by a
    ledger shared with other threads, is handled the same way; that iteration is discarded).

    ``image_size``/``channels``: the generator's output spec (default: the API's). Images are
    then mapped to the API's spec after crop_flip: a random crop when larger (API-MH: 32-px APIs
    see a random 32x32 crop of 84-px images), a bilinear resize when smaller, and
    ``match_channels`` for 1 <-> 3 channels; ``images`` stay at the generator's spec.
    ``rng``: all randomness (generator init, z, augmentation, ZO directions) derives from it.
    ``regularizer(x_hat, targets)``: a differentiable 0-dim loss of the generator's output
    (B, C, H, W) added to S before the backward; it costs no queries and does not change which
    iterate is kept (e.g. a within-class diversity term under the learner's own model).
    """
    cfg = cfg if cfg is not None else RecoveryConfig()
    score_of = ITERATES.get(cfg.best_iterate)
    if cfg.per_class < 1 or cfg.iters < 0:
        raise ConfigError(
            f"need recovery.per_class >= 1 and recovery.iters >= 0, got {cfg.per_class}, "
            f"{cfg.iters}"
        )
    source = gradient if gradient is not None else ZOGradient()
    objective = objective if objective is not None else SupportCE()
    info = api.info
    api_kind = output_kind(info.output)
    kind = source.score_kind(api)
    if kind == "label":
        recovery_ce(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), kind)  # raises
    objective.setup(kind, source.white_box)
    dev = torch.device(device) if device is not None else _device_of(api)

    n_cls = info.n_classes
    b = cfg.per_class * n_cls
    targets = torch.arange(b, device=dev) % n_cls
    init_g = _subgenerator(rng, "cpu")  # generator init and latents: the same on every device
    aug_g = _subgenerator(rng, dev)  # per-iteration draws stay on the run's device
    zo_g = _subgenerator(rng, dev)

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

    if generator is None:
        gen = reused_generator(cfg.nz, cfg.ngf, gen_size, gen_channels, dev)
        reset_parameters(gen, init_g)  # in place: the same weights as a new generator's
    else:
        gen = generator.to(dev)
    gen.train()
    forward = compiled(gen) if cfg.compile else gen
    if latents is None:
        z = torch.randn((b, gen.nz), generator=init_g).to(dev).requires_grad_(True)
    else:
        if tuple(latents.shape) != (b, gen.nz):
            raise ConfigError(f"latents must be ({b}, {gen.nz}), got {tuple(latents.shape)}")
        z = latents.to(dev).detach().requires_grad_(True)
    opt = torch.optim.Adam([*gen.parameters(), z], lr=cfg.gen_lr, betas=(0.5, 0.999))

    used = 0

    def query(x: Tensor) -> Tensor:
        nonlocal used
        out = api.query(x)
        used += int(x.shape[0])
        return out

    def loss_fn(scores: Tensor, idx: Tensor) -> Tensor:
        return objective.loss(scores, targets[idx], idx, kind)

    cost = source.cost(b)
    reserve = b if final_query else 0
    # the kept iterate is tracked on the device (no host sync per iteration): the score, the
    # iteration, the images and the scores of the best one so far (ties: the later iterate)
    best_score = torch.full((), float("inf"), device=dev)
    best_iter_t = torch.full((), -1, dtype=torch.long, device=dev)
    best_images: Tensor | None = None
    best_scores: Tensor | None = None
    losses: list[Tensor] = []
    exhausted = early = False
    for it in range(cfg.iters):
        if not api.ledger.can_afford(cost + reserve):
            exhausted = True
            log.info("recovery from %s stopped at iteration %d: query budget", info.name, it)
            break
        x_hat = forward(z)
        x = to_api(x_hat)
        objective.prepare(x)
        try:
            est = source.estimate(x.detach(), api, query, loss_fn, zo_g)
        except QueryBudgetExceeded:
            exhausted = True
            log.info("recovery from %s: budget exceeded mid-iteration %d", info.name, it)
            break
        used += est.charged
        surrogate = zo_surrogate(x, est.grad)
        total = surrogate if regularizer is None else surrogate + regularizer(x_hat, targets)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

        mean_loss = est.base_loss.detach().mean()
        losses.append(mean_loss)
        score = score_of(it, mean_loss, surrogate.detach())
        score = torch.as_tensor(score, dtype=best_score.dtype, device=dev)
        if best_images is None:  # the first iterate is always kept
            best_score, best_iter_t = score, torch.full_like(best_iter_t, it)
            best_images = x_hat.detach().clone()
            best_scores = est.base_scores.detach().clone()
        else:
            assert best_scores is not None
            better = score <= best_score
            best_score = torch.where(better, score, best_score)
            best_iter_t = torch.where(better, torch.full_like(best_iter_t, it), best_iter_t)
            best_images = torch.where(better, x_hat.detach(), best_images)
            best_scores = torch.where(better, est.base_scores.detach(), best_scores)
        if progress is not None:
            progress(it, {"loss": float(mean_loss), "queries": used, "iters": cfg.iters})
        if cfg.early_stop_prob is not None:
            share = target_prob(est.base_scores, targets, kind)
            if bool((share > cfg.early_stop_prob).all()):  # the one sync per iteration
                early = True
                break
    curve = torch.stack(losses).tolist() if losses else []
    best_iter = int(best_iter_t)
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
        mode=objective.mode,
        white_box=source.white_box,
        api_name=info.name,
        classes=tuple(info.classes),
        outputs_at=outputs_at,
        generator=gen,
        latents=z.detach(),
    )


__all__ = [
    "ITERATES",
    "Boundary",
    "Gradient",
    "GradientSource",
    "Objective",
    "Recovered",
    "SupportCE",
    "WhiteBoxGradient",
    "ZOGradient",
    "gradient_source",
    "recover",
]
