"""MAML core: functional forward, second/first-order meta-gradients, lr variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apimeta.episodes import Episode
from apimeta.maml import finetune, functional_forward, inner_adapt, maml_outer_loss, named_params
from apimeta.models import build_backbone


def _half_sse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - y) ** 2).sum()


def _linear_problem(steps: int):
    g = torch.Generator().manual_seed(0)
    d = 4
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    xs = torch.randn(6, d, generator=g, dtype=torch.float64)
    ys = torch.randn(6, generator=g, dtype=torch.float64)
    xq = torch.randn(5, d, generator=g, dtype=torch.float64)
    yq = torch.randn(5, generator=g, dtype=torch.float64)
    a = 0.05
    # closed form: w_{k+1} = (I - a A) w_k + a b with A = Xs^T Xs, b = Xs^T ys
    w = model.weight.detach().flatten()
    m = torch.eye(d, dtype=torch.float64) - a * xs.T @ xs
    for _ in range(steps):
        w = m @ w + a * xs.T @ ys
    gq = xq.T @ (xq @ w - yq)  # grad of the query loss at the adapted weights
    second = torch.linalg.matrix_power(m, steps).T @ gq
    return model, (xs, ys, xq, yq), a, w, second, gq


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_meta_gradient_matches_closed_form(steps):
    model, (xs, ys, xq, yq), a, w_ref, second, _ = _linear_problem(steps)
    fast = inner_adapt(model, named_params(model), xs, ys, loss_fn=_half_sse, steps=steps, lr=a)
    torch.testing.assert_close(fast["weight"].flatten(), w_ref)
    _half_sse(functional_forward(model, fast, xq), yq).backward()
    torch.testing.assert_close(model.weight.grad.flatten(), second)


def test_first_order_meta_gradient_is_query_grad_at_adapted_weights():
    model, (xs, ys, xq, yq), a, w_ref, second, gq = _linear_problem(3)
    fast = inner_adapt(
        model, named_params(model), xs, ys, loss_fn=_half_sse, steps=3, lr=a, first_order=True
    )
    torch.testing.assert_close(fast["weight"].flatten(), w_ref)
    _half_sse(functional_forward(model, fast, xq), yq).backward()
    torch.testing.assert_close(model.weight.grad.flatten(), gq)
    assert (model.weight.grad.flatten() - second).abs().max() > 1e-3


def test_per_param_and_per_step_lr():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    p0 = named_params(model)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), list(p0.values()))
    lrs = {"weight": 0.1, "bias": 0.0}
    fast = inner_adapt(model, p0, x, y, steps=1, lr=lrs)
    torch.testing.assert_close(fast["weight"], p0["weight"] - 0.1 * g[0])
    torch.testing.assert_close(fast["bias"], p0["bias"])
    # per-step: [0.1, 0.0] equals one step at 0.1
    two = inner_adapt(model, p0, x, y, steps=2, lr=[0.1, 0.0])
    torch.testing.assert_close(two["weight"], fast["weight"] - 0.0)
    with pytest.raises(ValueError, match="per-step lr"):
        inner_adapt(model, p0, x, y, steps=3, lr=[0.1, 0.0])


def test_learnable_lr_receives_gradient():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    lr = torch.tensor(0.1, requires_grad=True)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    fast = inner_adapt(model, named_params(model), x, y, steps=2, lr=lr)
    F.cross_entropy(functional_forward(model, fast, x), y).backward()
    assert lr.grad is not None and lr.grad.abs() > 0


@pytest.mark.parametrize("bn", ["transductive", "standard"])
def test_functional_forward_equals_module_forward(bn):
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, image_size=32, bn=bn, width=8).eval()
    if bn == "standard":  # non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.rand(16, 3, 32, 32))
        model.eval()
    x = torch.rand(7, 3, 32, 32)
    torch.testing.assert_close(functional_forward(model, named_params(model), x), model(x))


def _episode(gen_seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(gen_seed)
    ar = torch.arange(3)
    return Episode(
        torch.rand(3, 3, 32, 32, generator=g),
        ar,
        torch.rand(6, 3, 32, 32, generator=g),
        ar.repeat_interleave(2),
        (0, 1, 2),
    )


def test_outer_loss_backprops_into_every_parameter_and_leaves_module_untouched():
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=3, image_size=32, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = maml_outer_loss(model, None, _episode(), steps=2, lr=0.1)
    res.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert 0.0 <= res.accuracy <= 1.0 and res.logits.shape == (6, 3)
    assert any(not torch.equal(res.params[n], p) for n, p in named_params(model).items())


def test_graph_free_adaptation_matches_differentiable_one():
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=3, image_size=32, width=8)
    ep = _episode(1)
    ref = inner_adapt(model, named_params(model), ep.support_x, ep.support_y, steps=3, lr=0.05)
    fast = finetune(model, None, ep.support_x, ep.support_y, steps=3, lr=0.05)
    with torch.no_grad():
        nograd = inner_adapt(
            model, named_params(model, detach=True), ep.support_x, ep.support_y, steps=3, lr=0.05
        )
    for n in ref:
        torch.testing.assert_close(fast[n], ref[n].detach())
        torch.testing.assert_close(nograd[n].detach(), ref[n].detach())
        assert not fast[n].requires_grad


# ----------------------------------------------------------------- train_head (the head trick)
def _tiny_episode(seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, 3, 32, 32, generator=g)
    y = torch.arange(5).repeat(2)
    return Episode(x[:5], y[:5], x[5:], y[5:], (0, 1, 2, 3, 4))


def test_start_inner_head_replaces_only_the_head():
    from apimeta.errors import ConfigError
    from apimeta.maml import start_inner_head

    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=8, bn="transductive")
    params = named_params(model)
    g = torch.Generator().manual_seed(1)
    assert start_inner_head(model, params, "learned", g) == params
    zero = start_inner_head(model, params, "zero", g)
    assert torch.count_nonzero(zero["net.classifier.weight"]) == 0
    first = start_inner_head(model, params, "random", g)["net.classifier.weight"]
    second = start_inner_head(model, params, "random", g)["net.classifier.weight"]
    assert first.abs().max() <= first.shape[1] ** -0.5 and not torch.equal(first, second)
    assert first.requires_grad and first.is_leaf  # the inner loop adapts it
    assert all(zero[n] is params[n] for n in params if "classifier" not in n)
    with pytest.raises(ConfigError, match="train_head must be one of"):
        start_inner_head(model, params, "proto", g)


@pytest.mark.parametrize("mode", ["zero", "random"])
def test_a_fresh_inner_head_is_adapted_but_not_meta_learned(mode):
    """With a zero or random start the inner loop adapts the head (the query loss depends on
    it), and the meta-gradient reaches the features only: the model's own head gets none."""
    from apimeta.maml import start_inner_head

    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=8, bn="transductive")
    start = start_inner_head(model, named_params(model), mode, torch.Generator().manual_seed(2))
    out = maml_outer_loss(model, start, _tiny_episode(), steps=2, lr=0.1)
    assert not torch.equal(out.params["net.classifier.weight"], start["net.classifier.weight"])
    out.loss.backward()
    assert model.net.classifier.weight.grad is None and model.net.classifier.bias.grad is None
    assert model.net.features[0].weight.grad.abs().sum() > 0
