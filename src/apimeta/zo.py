"""Zero-order (ZO) gradient estimation through a black-box API (docs/design.md 4.3 and 8.5).

An estimator approximates the per-sample gradients g_i = dL_i/dx_i of a loss that depends on x
only through API queries, using random directions u_ij and finite differences:

* ``forward``: ``g_i = (d/q) sum_j (L_i(x_i + mu u_ij) - L_i(x_i)) / mu * u_ij``; B(1+q) queries.
* ``central`` (antithetic): ``g_i = (d/(2 q mu)) sum_j (L_i(x_i+mu u_ij) - L_i(x_i-mu u_ij)) u_ij``;
  2Bq queries, plus B for the base values (needed by recovery for scoring and the mask).
* ``lowres`` (subspace): forward differences along directions drawn on a C x r x r grid,
  bilinearly upsampled and renormalized, with d_eff = C r^2 in place of d.

Directions: ``sphere`` (uniform on the unit sphere, scale d) or ``gaussian`` (N(0, I), scale 1,
since E[u u^T] = I). They are drawn with the caller's ``torch.Generator``; to draw them where the
data lives (ours, docs/design.md section 9 item 4) pass a generator on ``x.device``; a CPU generator
with CUDA data reproduces the reference's draw-then-copy behaviour.

**Space and clamping.** The paper perturbs the augmented, *normalized* image. Our APIs take
images in [0, 1] and normalize inside, so we perturb the augmented image in [0, 1] space (mu is
in [0, 1] units; normalized-space mu corresponds to mu * std) and **clamp** perturbed points to
[0, 1] to honour the API contract. Clamping only changes pixels within mu*|u_k| (about 1e-4 for
unit directions at 32 px) of 0 or 1. For such a pixel the clamped difference keeps the sign of
the one-sided derivative and halves its expected size (a projected-gradient-like estimate),
whereas reflecting would flip half the samples and cancel it in expectation; the affected
pixels are saturated sigmoid outputs (and the crop's zero padding, which carries no gradient to
the generator), so the bias is negligible. The estimator reports the queries it used; every
perturbed image goes through ``query`` (the API, hence its ledger).

Train through it with :func:`zo_surrogate` (``S = (1/B) sum_i <x_i, stopgrad(g_i)>``,
docs/design.md 4.2 step 4), as :func:`apimeta.recovery.recover` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from apimeta.errors import ConfigError
from apimeta.registry import Registry

QueryFn = Callable[[Tensor], Tensor]
"""(n, C, H, W) images in [0, 1] -> (n, K) API scores; must charge the API's ledger."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""(scores (n, K), sample index idx (n,) in [0, B)) -> per-sample losses (n,)."""

DIRECTIONS = ("sphere", "gaussian")

#: estimator name (``zo.estimator``) -> class
ESTIMATORS: Registry[Callable[..., ZOEstimator]] = Registry("ZO estimator")


@dataclass
class ZOResult:
    """One estimate. ``grad`` (B, C, H, W); ``base_loss`` (B,) L_i(x_i) at the unperturbed points
    (None if not computed); ``base_scores`` (B, K) API outputs there; ``queries`` images sent."""

    grad: Tensor
    base_loss: Tensor | None
    base_scores: Tensor | None
    queries: int


class ZOEstimator:
    """Finite-difference gradient estimator; subclasses fix the difference scheme and space.

    ``q`` directions per sample, radius ``mu`` (in [0, 1] image units), ``directions`` in
    ``sphere``/``gaussian``. Perturbed queries are sent in groups of directions: ``chunks``
    groups (docs/design.md ``zo.chunks``) and, if ``max_images`` is set, never more than that many
    images per API call, so direction memory is at most ~2 x max_images x d floats.
    """

    name = "base"
    central = False

    def __init__(
        self,
        q: int = 10,
        mu: float = 0.005,
        directions: str = "sphere",
        chunks: int = 1,
        max_images: int | None = None,
    ):
        if q < 1:
            raise ConfigError(f"zo.q must be >= 1, got {q}")
        if mu <= 0:
            raise ConfigError(f"zo.mu must be > 0, got {mu}")
        if chunks < 1:
            raise ConfigError(f"zo.chunks must be >= 1, got {chunks}")
        if directions not in DIRECTIONS:
            raise ConfigError(f"zo.directions must be one of {DIRECTIONS}, got {directions!r}")
        if max_images is not None and max_images < 1:
            raise ConfigError(f"max_images must be >= 1 or None, got {max_images}")
        self.q, self.mu, self.directions = int(q), float(mu), directions
        self.chunks, self.max_images = int(chunks), max_images

    # ---------------------------------------------------------------- accounting
    def cost(self, batch: int, base: bool = True) -> int:
        """Queries one :meth:`estimate` call on ``batch`` samples sends."""
        per_dir = 2 if self.central else 1
        return batch * per_dir * self.q + (batch if (base or not self.central) else 0)

    def scale(self, x: Tensor) -> float:
        """The dimension factor: d = C*H*W for sphere directions, 1 for Gaussian ones."""
        return float(x[0].numel()) if self.directions == "sphere" else 1.0

    def sample_directions(self, n: int, x: Tensor, generator: torch.Generator) -> Tensor:
        """``n`` directions per sample: (n, B, C, H, W) on x's device."""
        b = x.shape[0]
        u = torch.randn((n, b, *x.shape[1:]), generator=generator, device=generator.device)
        u = u.to(x.device, x.dtype)
        if self.directions == "sphere":
            u = u / u.flatten(2).norm(dim=2).clamp_min(1e-12).view(n, b, 1, 1, 1)
        return u

    def _dirs_per_chunk(self, batch: int) -> int:
        per = math.ceil(self.q / self.chunks)
        if self.max_images is not None:
            per = min(per, max(1, self.max_images // (batch * (2 if self.central else 1))))
        return max(1, per)

    # ---------------------------------------------------------------- estimation
    def estimate(
        self,
        x: Tensor,
        query: QueryFn,
        loss_fn: LossFn,
        generator: torch.Generator,
        base: bool = True,
    ) -> ZOResult:
        """Estimate g_i = dL_i/dx_i for x (B, C, H, W) in [0, 1] (detached; no autograd).

        ``query`` sends images to the API (charging its ledger); ``loss_fn(scores, idx)`` gives
        the per-sample loss of sample ``idx`` from its scores. ``base`` (central only) also
        queries the unperturbed points; forward differences always need them.
        """
        x = x.detach()
        b = x.shape[0]
        used = 0

        def send(imgs: Tensor) -> Tensor:
            nonlocal used
            step = self.max_images or imgs.shape[0]
            outs = []
            for part in imgs.split(step):
                outs.append(query(part))
                used += part.shape[0]
            return torch.cat(outs)

        ar = torch.arange(b, device=x.device)
        base_loss = base_scores = None
        if base or not self.central:
            base_scores = send(x)
            base_loss = loss_fn(base_scores, ar).detach().to(x.dtype)

        grad = torch.zeros_like(x)
        per = self._dirs_per_chunk(b)
        done = 0
        while done < self.q:
            n = min(per, self.q - done)
            u = self.sample_directions(n, x, generator)
            idx = ar.repeat(n)
            shape = (n * b, *x.shape[1:])
            xp = (x.unsqueeze(0) + self.mu * u).clamp_(0.0, 1.0).view(shape)
            lp = loss_fn(send(xp), idx).detach().to(x.dtype).view(n, b)
            del xp
            if self.central:
                xm = (x.unsqueeze(0) - self.mu * u).clamp_(0.0, 1.0).view(shape)
                lm = loss_fn(send(xm), idx).detach().to(x.dtype).view(n, b)
                del xm
                coef = (lp - lm) / (2.0 * self.mu)
            else:
                assert base_loss is not None
                coef = (lp - base_loss.unsqueeze(0)) / self.mu
            grad += torch.einsum("nb,nbchw->bchw", coef, u)
            done += n
        grad *= self.scale(x) / self.q
        return ZOResult(grad=grad, base_loss=base_loss, base_scores=base_scores, queries=used)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(q={self.q}, mu={self.mu}, directions={self.directions!r}, "
            f"chunks={self.chunks}, max_images={self.max_images})"
        )


@ESTIMATORS.register("forward")
class ForwardEstimator(ZOEstimator):
    """Forward differences (docs/design.md 4.3, the paper's estimator). B(1+q) queries."""

    name = "forward"


@ESTIMATORS.register("central")
class CentralEstimator(ZOEstimator):
    """Antithetic central differences (docs/design.md 8.5). 2Bq queries (+B base)."""

    name = "central"
    central = True


@ESTIMATORS.register("lowres")
class LowresEstimator(ZOEstimator):
    """Forward differences along low-frequency directions (docs/design.md 8.5).

    Directions: N(0, I) on a C x r x r grid, bilinear upsampling to H x W, renormalized to unit
    L2 norm; the scale is d_eff = C r^2. (After renormalization ``sphere`` and ``gaussian``
    low-res draws give the same directions, so ``directions`` does not matter here.)
    """

    name = "lowres"

    def __init__(self, q: int = 10, mu: float = 0.005, lowres: int = 8, **kw: object):
        super().__init__(q=q, mu=mu, **kw)  # type: ignore[arg-type]
        if lowres < 1:
            raise ConfigError(f"zo.lowres must be >= 1, got {lowres}")
        self.r = int(lowres)

    def scale(self, x: Tensor) -> float:
        return float(x.shape[1] * self.r * self.r)

    def sample_directions(self, n: int, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        v = torch.randn((n * b, c, self.r, self.r), generator=generator, device=generator.device)
        v = v.to(x.device, x.dtype)
        u = F.interpolate(v, size=(h, w), mode="bilinear", align_corners=False)
        u = u / u.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return u.view(n, b, c, h, w)


def build_estimator(cfg: object, max_images: int | None = None) -> ZOEstimator:
    """An estimator from a :class:`~apimeta.run_config.ZOConfig` (or anything with its fields)."""
    name = cfg.estimator  # type: ignore[attr-defined]
    kw: dict = dict(
        q=cfg.q,  # type: ignore[attr-defined]
        mu=cfg.mu,  # type: ignore[attr-defined]
        directions=cfg.directions,  # type: ignore[attr-defined]
        chunks=cfg.chunks,  # type: ignore[attr-defined]
        max_images=max_images,
    )
    if name == "lowres":
        kw["lowres"] = cfg.lowres  # type: ignore[attr-defined]
    return ESTIMATORS.get(name)(**kw)


# -------------------------------------------------------------------- autograd bridge


def zo_surrogate(x: Tensor, grad: Tensor) -> Tensor:
    """``S = (1/B) sum_i <x_i, stopgrad(g_i)>``: its gradient w.r.t. x is g / B. Scalar."""
    return (x * grad.detach()).sum() / x.shape[0]


__all__ = [
    "DIRECTIONS",
    "ESTIMATORS",
    "CentralEstimator",
    "ForwardEstimator",
    "LossFn",
    "LowresEstimator",
    "QueryFn",
    "ZOEstimator",
    "ZOResult",
    "build_estimator",
    "zo_surrogate",
]
