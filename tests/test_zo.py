"""Zero-order gradient estimators: accuracy against true gradients, query accounting, bridges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.errors import ConfigError, InvalidQueryError
from apimeta.losses import recovery_ce
from apimeta.models import build_backbone
from apimeta.run_config import ZOConfig
from apimeta.zo import (
    ESTIMATORS,
    CentralEstimator,
    ForwardEstimator,
    LowresEstimator,
    build_estimator,
    zo_surrogate,
)

B, S = 8, 16


def _conv_api(seed: int = 0) -> tuple[LocalAPI, torch.nn.Module]:
    torch.manual_seed(seed)
    net = build_backbone(
        "conv4", num_classes=5, in_channels=3, image_size=S, width=8, bn="standard"
    ).eval()
    info = APIInfo("conv", "synthetic", (0, 1, 2, 3, 4), tuple("abcde"), 3, S)
    return LocalAPI(net, info, QueryLedger()), net


def _setup(seed: int = 0):
    api, net = _conv_api(seed)
    x = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(seed + 1))
    y = torch.arange(B) % 5
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(net(xg), y, reduction="sum").backward()

    def loss_fn(scores, idx):
        return recovery_ce(scores, y[idx], "logits")

    return api, x, xg.grad, loss_fn


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1), b.flatten(1)).mean())


def test_cosine_positive_and_grows_with_q():
    api, x, true_g, loss_fn = _setup()
    cos = {}
    for q in (5, 50, 200):
        vals = []
        for rep in range(3):
            est = ForwardEstimator(q=q, mu=0.005)
            res = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(10 + rep))
            vals.append(_cos(res.grad, true_g))
        cos[q] = sum(vals) / len(vals)
    # theory for unit-sphere directions: cos ~ sqrt(q / (q + d)), d = 768
    assert cos[5] > 0.03
    assert cos[50] > cos[5] + 0.08
    assert cos[200] > cos[50] + 0.1
    assert cos[200] > 0.35


def test_estimate_is_unbiased_in_projection():
    """<g_hat, g> / |g|^2 averages to ~1 for sphere (scale d) and Gaussian (scale 1) directions."""
    api, x, true_g, loss_fn = _setup()
    for directions in ("sphere", "gaussian"):
        est = ForwardEstimator(q=200, mu=1e-3, directions=directions)
        res = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(4))
        ratio = (res.grad * true_g).flatten(1).sum(1) / true_g.flatten(1).pow(2).sum(1)
        assert 0.8 < float(ratio.mean()) < 1.2, directions


def test_base_loss_matches_api_and_ledger_counts():
    api, x, _, loss_fn = _setup()
    for est, expected in (
        (ForwardEstimator(q=7), B * (1 + 7)),
        (CentralEstimator(q=7), B * 2 * 7 + B),
        (LowresEstimator(q=7, lowres=4), B * (1 + 7)),
    ):
        before = api.ledger.used
        res = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(0))
        assert res.queries == expected == est.cost(B)
        assert api.ledger.used - before == expected
        assert res.grad.shape == x.shape
        assert torch.allclose(res.base_loss, loss_fn(api.query(x), torch.arange(B)), atol=1e-6)
    # central without base values: exactly 2Bq queries
    est = CentralEstimator(q=3)
    before = api.ledger.used
    res = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(0), base=False)
    assert api.ledger.used - before == B * 6 == est.cost(B, base=False)
    assert res.base_loss is None


def test_chunking_bounds_batch_size_and_keeps_counts():
    api, x, _, loss_fn = _setup()
    sizes: list[int] = []

    def query(imgs):
        sizes.append(imgs.shape[0])
        return api.query(imgs)

    est = ForwardEstimator(q=10, chunks=5)
    res = est.estimate(x, query, loss_fn, torch.Generator().manual_seed(0))
    assert sizes == [B] + [2 * B] * 5 and res.queries == B * 11
    sizes.clear()
    est = CentralEstimator(q=10, max_images=20)  # 20 // (2*8) = 1 direction per chunk
    res = est.estimate(x, query, loss_fn, torch.Generator().manual_seed(0))
    assert max(sizes) <= 20 and sum(sizes) == res.queries == B * 21


def test_seeded_determinism():
    api, x, _, loss_fn = _setup()
    est = LowresEstimator(q=4, lowres=4)
    a = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(5)).grad
    b = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(5)).grad
    c = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(6)).grad
    assert torch.equal(a, b) and not torch.equal(a, c)


class _QuadAPI:
    """A 'curved' black box: score = 0.5 * sum h (x - c)^2 per image (loss = score)."""

    def __init__(self, c: torch.Tensor, h: float):
        self.c, self.h = c, h
        self.info = APIInfo("quad", "none", (0,), ("a",), 3, S)
        self.ledger = QueryLedger()

    def query(self, x):
        self.ledger.charge("quad", x.shape[0])
        n = x.shape[0]
        c = self.c.repeat(n // self.c.shape[0], 1, 1, 1)
        return (0.5 * self.h * (x - c).pow(2)).flatten(1).sum(1, keepdim=True)


def test_central_beats_forward_at_equal_queries_on_curved_function():
    g0 = torch.Generator().manual_seed(12345)
    x = 0.25 + 0.5 * torch.rand(B, 3, S, S, generator=g0)
    c = x + 1e-3 * torch.randn(x.shape, generator=g0)
    api = _QuadAPI(c, h=100.0)
    true_g = 100.0 * (x - c)

    def loss_fn(scores, idx):
        return scores[:, 0]

    fwd, cen = ForwardEstimator(q=20, mu=0.05), CentralEstimator(q=10, mu=0.05)
    assert fwd.cost(B) == B * 21 and cen.cost(B) == B * 21  # equal budgets
    cf = [
        _cos(fwd.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(s)).grad, true_g)
        for s in range(3)
    ]
    cc = [
        _cos(cen.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(s)).grad, true_g)
        for s in range(3)
    ]
    assert sum(cc) / 3 > 2 * sum(cf) / 3
    assert sum(cc) / 3 > 0.05


def test_perturbed_points_are_clamped_into_the_api_range():
    api, _, _, _ = _setup()
    x = torch.zeros(2, 3, S, S)
    x[1] = 1.0
    est = ForwardEstimator(q=3, mu=0.5)
    # LocalAPI validates [0, 1]: an unclamped perturbation would raise InvalidQueryError
    est.estimate(x, api.query, lambda s, i: s[:, 0], torch.Generator().manual_seed(0))
    with pytest.raises(InvalidQueryError):
        api.query(x - 0.5)


def test_surrogate_backprops_the_estimate():
    api, x, _, loss_fn = _setup()
    est = ForwardEstimator(q=4)
    w = torch.ones(1, requires_grad=True)  # a tiny "generator" so gradients reach a parameter
    res = est.estimate(x, api.query, loss_fn, torch.Generator().manual_seed(0))
    expected = (x * res.grad).sum() / B
    zo_surrogate(x * w, res.grad).backward()
    assert torch.allclose(w.grad, expected.view(1), rtol=1e-4)


def test_registry_config_and_errors():
    assert ESTIMATORS.names() == ["central", "forward", "lowres"]
    est = build_estimator(ZOConfig(estimator="lowres", q=3, lowres=4), max_images=100)
    assert isinstance(est, LowresEstimator) and est.r == 4 and est.max_images == 100
    assert est.scale(torch.zeros(1, 3, S, S)) == 3 * 16
    with pytest.raises(ConfigError, match="choose one of"):
        build_estimator(ZOConfig(estimator="nope"))
    with pytest.raises(ConfigError):
        ForwardEstimator(q=0)
    with pytest.raises(ConfigError):
        ForwardEstimator(directions="cube")


@pytest.mark.parametrize(
    ("estimator", "d_eff"),
    [
        (ForwardEstimator(q=10), 3 * 16 * 16),
        (CentralEstimator(q=10), 3 * 16 * 16),
        (LowresEstimator(q=10, lowres=4), 3 * 4 * 4),
    ],
    ids=["forward", "central", "lowres"],
)
def test_estimates_have_the_scale_of_the_true_gradient(estimator, d_eff):
    """Linear losses L_i = <a_i, x_i> with a_i ~ N(0, I): finite differences are exact and
    (u.a_i) ~ N(0, 1) for any unit direction u, so E[<g_i, a_i>] = d_eff (C*H*W, or C*r*r for
    lowres). Cosine checks ignore scale; this catches a lost factor (the 2 of the central
    difference, the C of d_eff). Mean over 400 samples: 1 +- about 0.02."""
    b, c, s = 400, 3, 16
    a = torch.randn(b, c * s * s, generator=torch.Generator().manual_seed(1))
    x = torch.full((b, c, s, s), 0.5)  # far from 0 and 1: no clamping

    def loss_fn(scores, idx):  # scores (n, B): the projections on every a_i
        return scores[torch.arange(len(idx)), idx]

    res = estimator.estimate(x, lambda z: z.flatten(1) @ a.T, loss_fn, torch.Generator())
    ratio = (res.grad.flatten(1) * a).sum(1) / d_eff
    assert 0.92 <= float(ratio.mean()) <= 1.08
