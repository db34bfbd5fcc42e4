"""Loss functions of BiDf-MKD (docs/design.md sections 4.2, 4.5 and 5).

* KD losses (registry :data:`KD_LOSSES`), signature
  ``fn(student_logits (B, C), teacher_scores (B, C), T=1.0, teacher_is_probs=False) -> scalar``:
  ``kl`` (ours: proper KL(p_t || p_s) with temperature) and ``neg_prob_dot`` (the reference form).
* Per-sample recovery losses on API scores (differentiable, so the white-box path can use them):
  :func:`recovery_ce` and the boundary objective :func:`boundary_objective` with its mask and
  discrepancy helpers.
* :func:`nt_xent`: SimCLR's contrastive loss between two augmented views (no API involved).
* :func:`union_ce`: a cross-entropy over a head of *every* API's classes, the API's top class
  as the label where the API is sure enough.

Teacher scores come from an API in its output mode: ``logits`` are raw logits; ``probs`` and
``topk:K`` are probabilities (top-k: zeros outside the top K); ``label`` is a one-hot vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from apimeta.apis.base import parse_output_mode
from apimeta.errors import ConfigError
from apimeta.registry import Registry

PROB_EPS = 1e-8  # floor for log-probabilities taken from probability outputs (probs, topk)

KDLoss = Callable[..., Tensor]
KD_LOSSES: Registry[KDLoss] = Registry("KD loss")


def teacher_probs(teacher_scores: Tensor, T: float = 1.0, teacher_is_probs: bool = False) -> Tensor:
    """Teacher distribution p_t^T (B, C) from logits or probabilities.

    Logits: ``softmax(logits / T)``. Probabilities (``probs``/``topk``/one-hot outputs) are used
    directly at T = 1; for T != 1 they are tempered exactly as logits would be, since
    ``softmax(l / T)`` is proportional to ``softmax(l) ** (1 / T)`` (zeros stay zero).
    """
    if not teacher_is_probs:
        return torch.softmax(teacher_scores / T, dim=1)
    p = teacher_scores.clamp_min(0.0)
    if T != 1.0:
        p = p.pow(1.0 / T)
    return p / p.sum(1, keepdim=True).clamp_min(PROB_EPS)


@KD_LOSSES.register("kl")
def kd_kl(
    student_logits: Tensor, teacher_scores: Tensor, T: float = 1.0, teacher_is_probs: bool = False
) -> Tensor:
    """Proper KD: ``T^2 / B * sum_b KL(p_t^T || p_s^T)`` (docs/design.md 5, ours). Scalar.

    ``student_logits`` (B, C) raw logits; ``teacher_scores`` (B, C) logits or, with
    ``teacher_is_probs``, probabilities. Terms with p_t = 0 contribute 0 (``0 log 0 = 0``).
    """
    if T <= 0:
        raise ConfigError(f"KD temperature must be > 0, got {T}")
    p_t = teacher_probs(teacher_scores.detach(), T, teacher_is_probs)
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    kl = torch.xlogy(p_t, p_t) - p_t * log_p_s
    return kl.sum() / student_logits.shape[0] * (T * T)


@KD_LOSSES.register("neg_prob_dot")
def kd_neg_prob_dot(
    student_logits: Tensor, teacher_scores: Tensor, T: float = 1.0, teacher_is_probs: bool = False
) -> Tensor:
    """The reference "KD": ``kl_div(p_s, p_t, reduction="mean")`` on student *probabilities*.

    Computes ``1/(B C) sum_{b,c} p_t (log p_t - p_s) = const - mean_b <p_t, p_s> / C``
    (docs/design.md 5, section 9 item 1). Not a KL divergence; gradient w.r.t. p_s is -p_t/(B C).
    ``T`` tempers both distributions (the reference uses T = 1). Scalar.
    """
    if T <= 0:
        raise ConfigError(f"KD temperature must be > 0, got {T}")
    p_t = teacher_probs(teacher_scores.detach(), T, teacher_is_probs)
    p_s = torch.softmax(student_logits / T, dim=1)
    return (torch.xlogy(p_t, p_t) - p_t * p_s).mean()


def kd_loss(name: str) -> KDLoss:
    """The KD loss registered under ``name`` (``kl`` or ``neg_prob_dot``)."""
    return KD_LOSSES.get(name)


# ---------------------------------------------------------------- per-sample recovery losses


def output_kind(output: str) -> str:
    """``"logits"`` / ``"probs"`` / ``"topk"`` / ``"label"`` from an API output mode string."""
    return parse_output_mode(output)[0]


def target_prob(scores: Tensor, targets: Tensor, kind: str, fill_hidden: bool = False) -> Tensor:
    """The share (B,) an API output assigns to each target class.

    ``logits``: softmax probability; ``probs``/``topk``: the probability itself; ``label``: 1.0
    if the label is the target, else 0.0. A target hidden by a ``topk`` output counts 0, or, with
    ``fill_hidden``, the mass the API left out shared evenly among the hidden classes,
    ``(1 - sum(visible)) / n_hidden`` (the best guess the output allows).
    """
    p = torch.softmax(scores, dim=1) if kind == "logits" else scores
    out = p.gather(1, targets.view(-1, 1)).squeeze(1)
    if fill_hidden and kind == "topk":
        hidden = (p <= 0).sum(1).clamp_min(1).to(p.dtype)
        rest = (1.0 - p.sum(1)).clamp_min(0.0) / hidden
        out = torch.where(out > 0, out, rest)
    return out


def recovery_ce(scores: Tensor, targets: Tensor, kind: str) -> Tensor:
    """Per-sample CE(A(x), y) (B,) for the recovery objective (docs/design.md 4.2).

    ``logits``: ``-log_softmax(scores)[y]``. ``probs``/``topk``: ``-log max(p_y, 1e-8)``; for a
    target outside the top K, p_y is the left-out mass shared evenly among the hidden classes
    (:func:`target_prob` with ``fill_hidden``), so pushing the visible classes down still lowers
    the loss. ``label`` is refused: a one-hot output makes the loss piecewise
    constant, so finite differences at radius mu are zero almost everywhere.
    """
    if kind == "logits":
        return F.cross_entropy(scores, targets, reduction="none")
    if kind in ("probs", "topk"):
        return -target_prob(scores, targets, kind, fill_hidden=True).clamp_min(PROB_EPS).log()
    raise ConfigError(
        f"recovery needs API outputs with graded scores (logits, probs or topk:K), got {kind!r}: "
        "a label-only API gives a piecewise-constant loss whose zero-order gradient estimate is "
        "zero almost everywhere. Use an API with logits/probs/topk output."
    )


def boundary_mask(api_scores: Tensor, student_logits: Tensor) -> Tensor:
    """m_i = 1[argmax A(x) == argmax f(x_i)] as float (B,) (docs/design.md 4.5).

    ``student_logits`` is the fixed student output at the *unperturbed* x_i; ``api_scores`` may
    be at a perturbed point. Argmax is the same for logits and their softmax.
    """
    return (api_scores.argmax(1) == student_logits.argmax(1)).to(api_scores.dtype)


def student_reference(student_logits: Tensor, kind: str) -> Tensor:
    """The student output in the API's output space: logits as-is, else softmax probabilities."""
    if kind == "logits":
        return student_logits
    if kind == "probs":
        return torch.softmax(student_logits, dim=1)
    raise ConfigError(
        f"the boundary objective compares API and student outputs and needs logits or probs, got "
        f"{kind!r} (top-k and label outputs hide the values it measures). Recover the query set "
        "in 'support' mode (adv=0) for such APIs."
    )


def l1_discrepancy(api_scores: Tensor, student_ref: Tensor) -> Tensor:
    """||A(x) - f(x_i)||_1 per sample (B,) (reference ZO branch; both in the same space)."""
    return (api_scores - student_ref).abs().sum(1)


def kl_discrepancy(api_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(softmax A(x) || softmax f(x_i)) per sample (B,) (ours, white-box variant of 4.5)."""
    log_p_a = F.log_softmax(api_logits, dim=1)
    log_p_s = F.log_softmax(student_logits, dim=1)
    return (log_p_a.exp() * (log_p_a - log_p_s)).sum(1)


def boundary_objective(
    api_scores: Tensor,
    targets: Tensor,
    student_logits: Tensor,
    kind: str,
    adv: float = 1.0,
    discrepancy: str = "l1",
) -> Tensor:
    """Per-sample boundary loss (B,) of docs/design.md 4.5.

    ``L_i = CE(A(x), y_i) - adv * m_i(x) * D(A(x), f(x_i))`` with ``student_logits`` = f(x_i)
    fixed (computed once at the unperturbed point). ``kind``: ``logits`` or ``probs`` (others
    raise). ``discrepancy``: ``l1`` (L1 on raw logits, or on probabilities for probs APIs) or
    ``kl`` (needs logits).
    """
    ce = recovery_ce(api_scores, targets, kind)
    ref = student_reference(student_logits, kind)
    mask = boundary_mask(api_scores, student_logits)
    if discrepancy == "l1":
        disc = l1_discrepancy(api_scores, ref)
    elif discrepancy == "kl":
        if kind != "logits":
            raise ConfigError("the KL boundary discrepancy needs logits; use discrepancy='l1'")
        disc = kl_discrepancy(api_scores, student_logits)
    else:
        raise ConfigError(f"discrepancy must be 'l1' or 'kl', got {discrepancy!r}")
    return ce - adv * mask * disc


def nt_xent(z1: Tensor, z2: Tensor, tau: float = 0.2) -> Tensor:
    """SimCLR's contrastive loss (NT-Xent) for projections (B, D) of two views of B images: each
    view's positive is the other view of its image, the 2B - 2 other views are negatives."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T / tau).fill_diagonal_(float("-inf"))  # a view is not its own positive
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)


def vicreg(z1: Tensor, z2: Tensor, var: float = 1.0, cov: float = 0.04) -> Tensor:
    """VICReg's loss for projections (B, D) of two views of B images (B >= 2), no negatives:
    the views' mean squared distance (invariance), plus ``var`` x the hinge of each dimension's
    standard deviation below 1 (variance: no collapse), plus ``cov`` x the squared off-diagonal
    covariances / D (decorrelated dimensions), each view's terms averaged. VICReg's weights 25 :
    25 : 1 divided by 25, so the loss starts near NT-Xent's scale."""
    d = z1.shape[1]
    loss = F.mse_loss(z1, z2)
    for z in (z1, z2):
        z = z - z.mean(0)
        std = torch.sqrt(z.var(0) + 1e-4)
        c = (z.T @ z) / (z.shape[0] - 1)
        off = c.pow(2).sum() - c.diagonal().pow(2).sum()
        loss = loss + 0.5 * (var * F.relu(1.0 - std).mean() + cov * off / d)
    return loss


#: the kd.contrastive objectives between two views' projections (kd.contrastive_loss)
CONTRASTIVE_LOSSES = ("nt-xent", "vicreg")


def union_ce(
    union_logits: Tensor,
    teacher_scores: Tensor,
    columns: Tensor,
    min_prob: float = 0.0,
    teacher_is_probs: bool = False,
) -> Tensor:
    """Cross-entropy over the whole union head with the API's top class as a hard label.

    ``union_logits`` (B, U) are the student's logits over the union of all APIs' classes,
    ``teacher_scores`` (B, C) one API's outputs, ``columns`` (C,) the union columns of its
    classes. A row counts only where the API's top probability is above ``min_prob``; the mean
    is over the rows that count (0 when none does; no host sync). Unlike per-API KD, which
    only ever contrasts one API's own classes, this also pushes down every other API's classes.
    """
    p_top, top = teacher_probs(teacher_scores, 1.0, teacher_is_probs).max(1)
    keep = (p_top > min_prob).to(union_logits.dtype)
    ce = F.cross_entropy(union_logits, columns.to(union_logits.device)[top], reduction="none")
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


__all__ = [
    "KD_LOSSES",
    "PROB_EPS",
    "boundary_mask",
    "boundary_objective",
    "kd_kl",
    "kd_loss",
    "kd_neg_prob_dot",
    "kl_discrepancy",
    "l1_discrepancy",
    "nt_xent",
    "output_kind",
    "recovery_ce",
    "student_reference",
    "target_prob",
    "teacher_probs",
    "union_ce",
]
