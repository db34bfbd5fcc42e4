"""KD losses and the recovery/boundary per-sample losses, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from apimeta.errors import ConfigError
from apimeta.losses import (
    KD_LOSSES,
    boundary_mask,
    boundary_objective,
    kd_kl,
    kd_neg_prob_dot,
    l1_discrepancy,
    recovery_ce,
    target_prob,
    teacher_probs,
)


def _logits(seed: int, b: int = 6, c: int = 5) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * 2


def test_kd_kl_hand_computed():
    s = torch.tensor([[0.0, 0.0]])  # p_s = (1/2, 1/2)
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_kl(s, t).item() == pytest.approx(expected, abs=1e-6)
    assert kd_kl(s, torch.tensor([[0.75, 0.25]]), teacher_is_probs=True).item() == pytest.approx(
        expected, abs=1e-6
    )
    assert kd_kl(t, t).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kd_kl_equals_torch_kl_div_reference(T):
    s, t = _logits(0), _logits(1)
    ref = F.kl_div(
        F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True
    ) * (T * T)
    assert torch.allclose(kd_kl(s, t, T=T), ref, atol=1e-6)
    # probabilities from a probs API give the same value (tempering p ** (1/T) is exact)
    assert torch.allclose(kd_kl(s, torch.softmax(t, 1), T=T, teacher_is_probs=True), ref, atol=1e-5)


def test_kd_kl_with_topk_zeros_and_gradient_flows_to_student_only():
    s = _logits(2).requires_grad_(True)
    t = torch.softmax(_logits(3), 1)
    top = t.topk(2, 1)
    tk = torch.zeros_like(t).scatter_(1, top.indices, top.values)
    loss = kd_kl(s, tk, teacher_is_probs=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    p = tk / tk.sum(1, keepdim=True)
    ref = (torch.xlogy(p, p) - p * F.log_softmax(s.detach(), 1)).sum() / s.shape[0]
    assert torch.allclose(loss, ref, atol=1e-6)


@pytest.mark.filterwarnings("ignore:reduction")
def test_neg_prob_dot_is_the_reference_kl_div_on_probabilities():
    s, t = _logits(4), _logits(5)
    p_s, p_t = torch.softmax(s, 1), torch.softmax(t, 1)
    ref = F.kl_div(p_s, p_t, reduction="mean")  # what the reference code calls
    assert torch.allclose(kd_neg_prob_dot(s, t), ref, atol=1e-7)
    b, c = s.shape
    const = (p_t * p_t.log()).sum() / (b * c)
    assert torch.allclose(kd_neg_prob_dot(s, t), const - (p_t * p_s).sum() / (b * c), atol=1e-7)
    # hand value: p_s = p_t = (1/2, 1/2): 1/(1*2) * 2 * 1/2 (log 1/2 - 1/2)
    z = torch.zeros(1, 2)
    assert kd_neg_prob_dot(z, z).item() == pytest.approx(0.5 * (math.log(0.5) - 0.5), abs=1e-6)


def test_registry_and_temperature_errors():
    assert KD_LOSSES.names() == ["kl", "neg_prob_dot"]
    assert KD_LOSSES.get("kl") is kd_kl
    with pytest.raises(ConfigError):
        kd_kl(_logits(0), _logits(1), T=0.0)
    p = teacher_probs(torch.tensor([[0.5, 0.5, 0.0]]), T=2.0, teacher_is_probs=True)
    assert torch.allclose(p, torch.tensor([[0.5, 0.5, 0.0]]))


def test_recovery_ce_per_output_kind():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    ce = recovery_ce(logits, y, "logits")
    assert ce[0].item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-6)
    assert ce[1].item() == pytest.approx(math.log(2.0), abs=1e-6)
    probs = torch.tensor([[0.8, 0.2], [1.0, 0.0]])
    ce = recovery_ce(probs, y, "probs")
    assert ce[0].item() == pytest.approx(-math.log(0.8), abs=1e-6)
    assert ce[1].item() == pytest.approx(-math.log(1e-8), rel=1e-5)  # floored
    with pytest.raises(ConfigError, match="label-only"):
        recovery_ce(probs, y, "label")
    assert torch.allclose(target_prob(probs, y, "probs"), torch.tensor([0.8, 0.0]))
    # top-2 of 4 classes: a hidden target gets the left-out mass shared by the hidden classes
    top2 = torch.tensor([[0.5, 0.3, 0.0, 0.0]])
    t = torch.tensor([2])
    assert target_prob(top2, t, "topk").item() == 0.0
    assert target_prob(top2, t, "topk", fill_hidden=True).item() == pytest.approx(0.1)
    assert recovery_ce(top2, t, "topk").item() == pytest.approx(-math.log(0.1), abs=1e-5)
    assert recovery_ce(top2, torch.tensor([1]), "topk").item() == pytest.approx(-math.log(0.3))
    assert torch.allclose(target_prob(logits, y, "logits")[1], torch.tensor(0.5))


def test_boundary_mask_and_objective_hand_computed():
    api = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    student = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # argmax 0 and 0
    y = torch.tensor([0, 1])
    mask = boundary_mask(api, student)
    assert mask.tolist() == [1.0, 0.0]  # sample 1: API says 1, student says 0
    assert l1_discrepancy(api, student).tolist() == [3.0, 5.0]  # 2+1+0 ; 2+2+1
    out = boundary_objective(api, y, student, "logits", adv=0.5)
    ce = F.cross_entropy(api, y, reduction="none")
    assert torch.allclose(out, ce - 0.5 * torch.tensor([3.0, 0.0]))
    # probs API: L1 between API probabilities and the student's softmax
    pa = torch.softmax(api, 1)
    out_p = boundary_objective(pa, y, student, "probs", adv=1.0)
    l1 = (pa[0] - torch.softmax(student[0], 0)).abs().sum()
    assert torch.allclose(out_p[0], -pa[0, 0].log() - l1, atol=1e-6)
    assert torch.allclose(out_p[1], -pa[1, 1].log(), atol=1e-6)  # masked out
    kl = boundary_objective(api, y, student, "logits", adv=1.0, discrepancy="kl")
    assert kl[0] < ce[0] and kl[1] == pytest.approx(ce[1].item())
    with pytest.raises(ConfigError, match="logits or probs"):
        boundary_objective(pa, y, student, "topk")


def test_nt_xent_hand_computed_and_prefers_matching_views():
    from apimeta.losses import nt_xent

    z = torch.eye(4)[:2]  # two orthogonal images, both views identical
    # each view: positive similarity 1/tau, two orthogonal negatives at 0, itself excluded
    expected = math.log(1 + 2 * math.exp(-1 / 0.2))
    assert nt_xent(z, z.clone(), tau=0.2).item() == pytest.approx(expected, rel=1e-6)
    swapped = nt_xent(z, z.flip(0), tau=0.2)  # each positive is the other image
    assert swapped.item() > 1 / 0.2
    z1 = torch.randn(8, 5, requires_grad=True)
    nt_xent(z1, torch.randn(8, 5)).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0


def test_union_ce_labels_the_union_column_of_the_api_top_class_where_it_is_sure():
    from apimeta.losses import union_ce

    union = _logits(3, b=4, c=6).requires_grad_(True)  # 6 union classes
    cols = torch.tensor([4, 1, 2])  # this API's 3 classes sit in union columns 4, 1, 2
    teacher = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0.1, 0, 0], [0, 0, 5.0]])  # row 2: unsure
    p_top = teacher.softmax(1).max(1).values
    assert p_top[2] < 0.5 < p_top[[0, 1, 3]].min()
    got = union_ce(union, teacher, cols, min_prob=0.5)
    want = F.cross_entropy(union[[0, 1, 3]], torch.tensor([4, 1, 2]))
    torch.testing.assert_close(got, want)
    # min_prob 0: every row counts; probabilities give the same labels as logits
    all_rows = F.cross_entropy(union, torch.tensor([4, 1, 4, 2]))
    torch.testing.assert_close(union_ce(union, teacher, cols), all_rows)
    torch.testing.assert_close(
        union_ce(union, teacher.softmax(1), cols, teacher_is_probs=True), all_rows
    )
    # unlike per-API KD, other APIs' columns (0, 3, 5) get a gradient too
    got.backward()
    assert union.grad is not None and union.grad[:, [0, 3, 5]].abs().sum() > 0
    # nothing sure enough: zero loss, zero gradient
    none = union_ce(union, teacher, cols, min_prob=0.999999)
    assert none.item() == 0.0


def test_vicreg_is_zero_for_equal_decorrelated_views_and_penalises_collapse():
    from apimeta.losses import vicreg

    b, d = 8, 4
    a = torch.randn(b, d, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(a - a.mean(0))  # orthonormal columns, each of zero mean
    z = q * math.sqrt(b - 1)  # zero mean, unit variance, zero covariance
    assert vicreg(z, z.clone()).item() == pytest.approx(0.0, abs=1e-3)
    # invariance: the views' mean squared distance adds as it is
    shifted = z + 0.5
    assert vicreg(z, shifted).item() == pytest.approx(0.25, abs=1e-3)
    # collapse: every image the same vector; std 0 -> the hinge (1 - sqrt(1e-4)) per view
    c = torch.ones(b, d, requires_grad=True)
    assert vicreg(c, c.detach()).item() == pytest.approx(0.99, abs=1e-4)
    # correlated dimensions: the covariance term, cov x sum of squared off-diagonals / d
    twin = torch.cat([z[:, :1], z[:, :1]], 1)
    off = 2 * 1.0**2  # the two dimensions' covariance, twice
    want = 0.5 * 2 * 0.04 * off / 2
    assert vicreg(twin, twin.clone()).item() == pytest.approx(want, rel=1e-3)
    z1 = torch.randn(8, 5, requires_grad=True)
    vicreg(z1, torch.randn(8, 5)).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
