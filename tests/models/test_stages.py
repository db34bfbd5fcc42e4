"""Feature stages of the backbones and re-drawing the top ones (``eval.reinit``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from apimeta.errors import ConfigError
from apimeta.models import build_backbone
from apimeta.models.stages import feature_stages, redraw_stages_, redraw_top_stages


@pytest.mark.parametrize("name, n", [("conv4", 4), ("resnet10", 5), ("resnet12", 4)])
def test_stages_cover_every_feature_parameter_once_and_not_the_head(name, n):
    model = build_backbone(name, num_classes=5, width=8 if name == "conv4" else 0.125)
    stages = feature_stages(model)
    assert len(stages) == n
    in_stages = [id(p) for s in stages for p in s.parameters()]
    assert len(in_stages) == len(set(in_stages))  # no parameter in two stages
    head = {id(p) for p in model.net.classifier.parameters()}
    assert set(in_stages) | head == {id(p) for p in model.parameters()}
    assert not set(in_stages) & head


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_redraw_changes_only_the_top_stages_with_a_seeded_default_init():
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=8)
    with torch.no_grad():  # a "trained" model: every parameter away from its init
        for p in model.parameters():
            p.add_(0.5)
    before = _params(model)
    rng = torch.get_rng_state()
    out = redraw_top_stages(model, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # a copy
    after = _params(out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # blocks 2 and 3 of Conv4 are features.8-15: conv weight/bias and BN weight/bias
    assert changed == {f"net.features.{i}.{k}" for i in (8, 9, 12, 13) for k in ("weight", "bias")}
    assert torch.equal(after["net.features.9.weight"], torch.ones(8))  # BN default: 1, 0
    assert torch.equal(after["net.features.9.bias"], torch.zeros(8))
    w = after["net.features.8.weight"]  # Conv2d default: kaiming_uniform(a=sqrt(5))
    assert w.abs().max() <= 1 / (8 * 9) ** 0.5
    again = _params(redraw_top_stages(model, 2, seed=7))
    other = _params(redraw_top_stages(model, 2, seed=8))
    assert all(torch.equal(again[n], after[n]) for n in after)
    assert not torch.equal(other["net.features.8.weight"], w)
    assert redraw_top_stages(model, 0, seed=7) is model


@pytest.mark.parametrize("name", ["conv4", "resnet10"])
def test_redraw_in_place_keeps_the_tensors_and_draws_what_the_copy_draws(name):
    """``redraw_stages_`` (kd.forget_every) changes the same parameter tensors in place to the
    values ``redraw_top_stages`` gives a copy from the same seed; the rest is untouched."""
    model = build_backbone(name, num_classes=5, width=8 if name == "conv4" else 0.125)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    want = _params(redraw_top_stages(model, 2, seed=3))
    before = _params(model)
    ids = [id(p) for p in model.parameters()]
    rng = torch.get_rng_state()
    redraw_stages_(feature_stages(model)[-2:], seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert [id(p) for p in model.parameters()] == ids
    now = _params(model)
    assert all(torch.equal(now[n], want[n]) for n in want)
    assert any(not torch.equal(now[n], before[n]) for n in now)
    kept = {id(p) for s in feature_stages(model)[:-2] for p in s.parameters()}
    kept |= {id(p) for p in model.net.classifier.parameters()}
    for n, p in model.named_parameters():
        if id(p) in kept:
            assert torch.equal(now[n], before[n]), n


def test_redraw_refuses_more_stages_than_the_backbone_has():
    model = build_backbone("conv4", num_classes=5, width=8)
    with pytest.raises(ConfigError, match=r"eval\.reinit must be in 0\.\.4"):
        redraw_top_stages(model, 5, seed=0)
    with pytest.raises(ConfigError, match="declares no feature stages"):
        feature_stages(nn.Sequential(nn.Linear(2, 2)))


def test_stage_param_groups_partition_the_parameters_with_a_scale_per_named_stage():
    from apimeta.models.stages import stage_param_groups

    model = build_backbone("conv4", num_classes=5, width=8)
    stages = feature_stages(model)
    (one,) = stage_param_groups(model, [])
    assert one["lr_scale"] == 1.0 and len(one["params"]) == len(list(model.parameters()))
    groups = stage_param_groups(model, [2.0, 0.5])
    assert [g["lr_scale"] for g in groups] == [2.0, 0.5, 1.0]
    for g, stage in zip(groups[:2], stages[:2], strict=True):
        assert {id(p) for p in g["params"]} == {id(p) for p in stage.parameters()}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    with pytest.raises(ConfigError, match=r"names 5 stages; the backbone has 4"):
        stage_param_groups(model, [1.0] * 5)
    with pytest.raises(ConfigError, match=r"multipliers >= 0"):
        stage_param_groups(model, [-1.0])
