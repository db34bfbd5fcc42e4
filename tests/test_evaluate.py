"""Few-shot evaluator: fixed seeded tasks, CI formula, transductive vs non-transductive BN."""

from __future__ import annotations

import math

import pytest
import torch

from apimeta.data import load_dataset
from apimeta.errors import ConfigError
from apimeta.evaluate import (
    ci95,
    evaluate,
    format_result,
    predict_non_transductive,
    summary_score,
    task_list,
)
from apimeta.maml import named_params
from apimeta.models import build_backbone


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_classes=(6, 6, 6), per_class=8, image_size=32)


def _model(seed: int, width: int = 8):
    torch.manual_seed(seed)
    return build_backbone("conv4", num_classes=5, image_size=32, width=width)


def _fingerprint(ep):
    return (ep.class_ids, float(ep.support_x.sum()), float(ep.query_x.sum()))


def test_every_init_sees_identical_episodes(data):
    seen: dict[int, list] = {0: [], 1: []}

    def factory_for(key):
        def factory(split, way, shot, query, generator):
            sampler = data.sampler(split, way, shot, query, generator)
            orig = sampler.sample

            def sample():
                ep = orig()
                seen[key].append(_fingerprint(ep))
                return ep

            sampler.sample = sample
            return sampler

        return factory

    kw = dict(shots=(1, 2), query=3, tasks=4, steps=1, seed=7)
    evaluate(_model(0), factory_for(0), **kw)
    evaluate(_model(1, width=4), factory_for(1), **kw)
    assert len(seen[0]) == 8 and seen[0] == seen[1]
    # the 1-shot and 2-shot lists are different draws; a new seed gives new tasks
    assert seen[0][:4] != seen[0][4:]
    other = [_fingerprint(e) for e in task_list(data, shot=1, query=3, tasks=4, seed=8)]
    assert other != seen[0][:4]
    again = [_fingerprint(e) for e in task_list(data, shot=1, query=3, tasks=4, seed=7)]
    assert again == seen[0][:4]


def test_ci95_uses_population_std():
    accs = [50.0, 60.0, 70.0, 80.0]
    mean, ci, std = ci95(accs)
    pop = math.sqrt(sum((a - 65.0) ** 2 for a in accs) / 4)
    assert mean == pytest.approx(65.0)
    assert std == pytest.approx(pop)
    assert ci == pytest.approx(1.96 * pop / 2.0)
    assert ci95([42.0]) == (42.0, 0.0, 0.0)


def test_scoring_with_a_constant_classifier_is_exact(data):
    model = _model(0)
    with torch.no_grad():
        model.net.classifier.weight.zero_()
        model.net.classifier.bias.zero_()
    res = evaluate(model, data, shots=(1,), query=3, tasks=5, steps=0, keep_accs=True)
    r = res["1-shot"]
    # all logits equal -> argmax picks class 0 -> accuracy = 1/way on every task
    assert r["accs"] == [20.0] * 5 and r["mean"] == 20.0 and r["ci95"] == 0.0 and r["n"] == 5
    assert summary_score(res) == 20.0
    assert format_result(res) == "1-shot 20.00 ± 0.00"


def test_evaluate_leaves_the_model_untouched(data):
    model = _model(0).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate(model, data, shots=(1, 2), query=3, tasks=3, steps=2, lr=0.1, split="val")
    assert set(res) == {"1-shot", "2-shot"}
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    for r in res.values():
        assert 0.0 <= r["mean"] <= 100.0 and r["n"] == 3


def test_adaptation_changes_the_result(data):
    model = _model(3)
    kw = dict(shots=(2,), query=3, tasks=4, keep_accs=True)
    a = evaluate(model, data, steps=0, **kw)["2-shot"]["accs"]
    b = evaluate(model, data, steps=5, lr=0.5, **kw)["2-shot"]["accs"]
    assert a != b


def test_non_transductive_prediction_ignores_other_queries():
    model = _model(0).eval()
    params = {k: v.detach() for k, v in named_params(model).items()}
    g = torch.Generator().manual_seed(0)
    support = torch.rand(5, 3, 32, 32, generator=g)
    query = torch.rand(4, 3, 32, 32, generator=g)
    other = query.clone()
    other[1:] = torch.rand(3, 3, 32, 32, generator=g)
    nt_a = predict_non_transductive(model, params, support, query)
    nt_b = predict_non_transductive(model, params, support, other)
    torch.testing.assert_close(nt_a[0], nt_b[0])  # query 0 only sees support + itself
    expected = model(torch.cat([support, query[:1]]))[-1]
    torch.testing.assert_close(nt_a[0], expected.detach())
    with torch.no_grad():  # transductive BN: query 0's logits depend on the other queries
        assert not torch.allclose(model(query)[0], model(other)[0])


def test_transductive_and_non_transductive_both_run(data):
    model = _model(0)
    kw = dict(shots=(1,), query=3, tasks=3, steps=1, keep_accs=True)
    t = evaluate(model, data, transductive=True, **kw)["1-shot"]
    n = evaluate(model, data, transductive=False, **kw)["1-shot"]
    assert t["n"] == n["n"] == 3
    assert all(0.0 <= a <= 100.0 for a in t["accs"] + n["accs"])


def test_bad_arguments(data):
    with pytest.raises(ConfigError):
        evaluate(_model(0), data, tasks=0)
    with pytest.raises(ConfigError):
        evaluate(_model(0), data, shots=())


def test_head_options_on_separable_data_with_zero_steps():
    """Query images equal to the support images: a prototype head (Proto-MAML) and the nearest
    centroid are right with no fine-tuning; a zero head predicts class 0 for everything."""
    from apimeta.episodes import Episode
    from apimeta.evaluate import adapt_and_score, start_head

    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=8, bn="transductive")
    g = torch.Generator().manual_seed(3)
    sx = torch.rand(5, 3, 32, 32, generator=g)
    sy = torch.arange(5)
    ep = Episode(sx, sy, sx.repeat(3, 1, 1, 1), sy.repeat(3), (10, 11, 12, 13, 14))
    init = {n: p.detach() for n, p in named_params(model).items()}
    for head in ("proto", "ncc"):
        assert adapt_and_score(model, init, ep, steps=0, head=head) == 1.0
    assert adapt_and_score(model, init, ep, steps=0, head="zero") == 0.2
    proto = start_head(model, init, ep, "proto")
    changed = [n for n in init if not torch.equal(init[n], proto[n])]
    assert len(changed) == 2 and all("classifier" in n for n in changed)  # only the head
    with pytest.raises(ConfigError, match=r"eval\.head must be one of"):
        start_head(model, init, ep, "cosine")


def test_random_head_is_fresh_the_same_per_task_and_independent_of_the_init():
    """``random``: only the head changes, drawn within nn.Linear's init bound; the same task
    gives the same head whatever the init (paired comparisons), another task another head."""
    from apimeta.episodes import Episode
    from apimeta.evaluate import start_head

    torch.manual_seed(0)
    a = build_backbone("conv4", num_classes=5, width=8, bn="transductive")
    torch.manual_seed(1)
    b = build_backbone("conv4", num_classes=5, width=8, bn="transductive")
    sx, sy = torch.rand(5, 3, 32, 32), torch.arange(5)
    ep = Episode(sx, sy, sx, sy, (10, 11, 12, 13, 14))
    other = Episode(sx, sy, sx, sy, (10, 11, 12, 13, 15))
    pa = {n: p.detach() for n, p in named_params(a).items()}
    pb = {n: p.detach() for n, p in named_params(b).items()}
    ha, hb = start_head(a, pa, ep, "random"), start_head(b, pb, ep, "random")
    changed = [n for n in pa if not torch.equal(pa[n], ha[n])]
    assert changed == ["net.classifier.weight", "net.classifier.bias"]
    w = ha["net.classifier.weight"]
    assert w.abs().max() <= 1 / w.shape[1] ** 0.5 and w.std() > 0.3 / w.shape[1] ** 0.5
    assert all(torch.equal(ha[n], hb[n]) for n in changed)
    assert not torch.equal(start_head(a, pa, other, "random")[changed[0]], w)


# ----------------------------------------------------------------- the protocol chosen on meta-val
def test_parse_grid_reads_keys_and_refuses_bad_ones():
    from apimeta.evaluate import parse_grid

    grid = parse_grid(["lr=0.01, 0.1", "steps=10,30", "head=learned,ncc", "reinit=0,2"])
    assert grid == {
        "lr": [0.01, 0.1], "steps": [10, 30], "head": ["learned", "ncc"], "reinit": [0, 2]
    }  # fmt: skip
    assert parse_grid([]) == {}
    for bad in (
        ["momentum=0.9"],  # unknown key
        ["lr"],  # no values
        ["lr=fast"],  # not a float
        ["lr=0"],  # must be > 0
        ["lr=0.1,0.1"],  # repeated value
        ["steps=-1"],
        ["head=cosine"],  # not a head
        ["reinit=-1"],
        ["reinit=1.5"],
        ["lr=0.1", "lr=0.2"],  # key twice
    ):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_grid_settings_is_the_product_with_ncc_once():
    from apimeta.evaluate import grid_settings

    got = grid_settings({"lr": [0.01, 0.1], "head": ["learned", "ncc"]})
    assert got == [{"lr": 0.01, "head": "learned"}, {"head": "ncc"}, {"lr": 0.1, "head": "learned"}]
    got = grid_settings({"lr": [0.01, 0.1], "head": ["ncc"], "reinit": [0, 2]})
    assert got == [{"head": "ncc", "reinit": 0}, {"head": "ncc", "reinit": 2}]  # reinit matters


def test_test_lr_defaults_to_inner_lr_and_overrides_it(monkeypatch, data):
    import apimeta.evaluate as ev
    from apimeta.run_config import RunConfig

    seen = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: seen.append(k["lr"]) or {})
    cfg = RunConfig(inner_lr=0.02)
    ev.evaluate_with_config(_model(0), data, cfg, split="val", shots=(1,), tasks=1)
    ev.evaluate_with_config(
        _model(0), data, ev.with_protocol(cfg, {"lr": 0.3}), split="val", shots=(1,), tasks=1
    )
    assert seen == [0.02, 0.3]


def test_tune_protocol_selects_on_meta_val_and_tests_only_the_winner(monkeypatch, data):
    """Meta-val prefers lr 0.1; meta-test would prefer 0.3. The choice must be 0.1, scored once
    on meta-test; meta-val is scored with eval.tasks tasks and the test with `tasks`."""
    import apimeta.evaluate as ev
    from apimeta.run_config import RunConfig

    score = {("val", 0.01): 40.0, ("val", 0.1): 50.0, ("val", 0.3): 45.0,
             ("test", 0.01): 1.0, ("test", 0.1): 2.0, ("test", 0.3): 99.0}  # fmt: skip
    calls = []

    def fake(model, dataset, cfg, *, split, shots, tasks, keep_accs=False, **kw):
        lr = ev.finetune_lr(cfg)
        calls.append((split, lr, tasks))
        m = score[(split, lr)] + shots[0]  # per shot, so the two shots are told apart
        return {f"{shots[0]}-shot": {"mean": m, "ci95": 0.0, "std": 0.0, "n": tasks, "accs": [m]}}

    monkeypatch.setattr(ev, "evaluate_with_config", fake)
    cfg = RunConfig()
    cfg.eval.tasks = 7
    got = ev.tune_protocol(_model(0), data, cfg, {"lr": [0.01, 0.1, 0.3]}, shots=(1, 5), tasks=11)
    assert [got[k]["setting"] for k in ("1-shot", "5-shot")] == [{"lr": 0.1}] * 2
    assert got["1-shot"]["mean"] == 3.0 and got["5-shot"]["mean"] == 7.0
    assert got["1-shot"]["val"] == {"lr=0.01": 41.0, "lr=0.1": 51.0, "lr=0.3": 46.0}
    tests = [c for c in calls if c[0] == "test"]
    assert tests == [("test", 0.1, 11), ("test", 0.1, 11)]
    assert {c[2] for c in calls if c[0] == "val"} == {7}


def test_tune_protocol_on_real_episodes_matches_evaluate(data):
    """The returned meta-test result is exactly `evaluate` with the chosen setting."""
    from apimeta.evaluate import tune_protocol
    from apimeta.run_config import RunConfig

    cfg = RunConfig(way=3, query=2)
    cfg.eval.tasks = 3
    model = _model(1)
    got = tune_protocol(model, data, cfg, {"lr": [0.01, 0.5]}, shots=(1,), tasks=4)["1-shot"]
    lr = got["setting"]["lr"]
    assert got["val"][f"lr={lr}"] == max(got["val"].values())
    ref = evaluate(model, data, split="test", way=3, shots=(1,), query=2, tasks=4, lr=lr,
                   keep_accs=True)["1-shot"]  # fmt: skip
    assert got["accs"] == ref["accs"] and got["mean"] == ref["mean"]


def test_reinit_evaluates_the_init_with_fresh_top_stages_the_same_for_every_init(data):
    """``reinit=k``: two inits that differ only in their top k stages score the same (the
    stages are re-drawn from one seed); re-drawing fewer or more stages than that changes the
    scores; the model itself is never modified."""
    a, b = _model(0), _model(1)
    with torch.no_grad():  # b = a with other top two stages (the head is kept, too)
        for i in (0, 1, 4, 5):
            b.net.features[i].load_state_dict(a.net.features[i].state_dict())
        b.net.classifier.load_state_dict(a.net.classifier.state_dict())
    before = {n: p.detach().clone() for n, p in b.named_parameters()}
    kw = dict(split="test", shots=(1,), query=3, tasks=6, steps=2, lr=0.1, keep_accs=True)
    ra, rb = evaluate(a, data, reinit=2, **kw), evaluate(b, data, reinit=2, **kw)
    assert ra["1-shot"]["accs"] == rb["1-shot"]["accs"]
    assert all(torch.equal(p, before[n]) for n, p in b.named_parameters())
    kept = evaluate(b, data, reinit=0, **kw)["1-shot"]["accs"]
    assert kept != ra["1-shot"]["accs"]
    assert evaluate(b, data, reinit=3, **kw)["1-shot"]["accs"] != ra["1-shot"]["accs"]
    with pytest.raises(ConfigError, match=r"eval\.reinit"):
        evaluate(a, data, reinit=9, **kw)


def test_check_grid_converts_config_values_and_refuses_bad_ones():
    """``eval.tune`` comes from YAML: numbers may arrive as strings or ints, a lone value as a
    scalar; the checks are parse_grid's, with the config key named."""
    from apimeta.evaluate import check_grid

    got = check_grid({"lr": ["0.1", 1], "head": "random", "reinit": [0, 2]})
    assert got == {"lr": [0.1, 1.0], "head": ["random"], "reinit": [0, 2]}
    assert check_grid({}) == {}
    for bad in ({"momentum": [0.9]}, {"lr": []}, {"lr": ["fast"]}, {"head": ["cosine"]},
                {"reinit": [2, 2]}, {"lr": [None]}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"eval\.tune"):
            check_grid(bad)


def test_meta_test_uses_the_run_protocol_or_the_grid_chosen_on_meta_val(data):
    """Without ``eval.tune`` a run's meta-test is ``evaluate_with_config``; with it, the per-shot
    choice of ``tune_protocol`` over that grid (each result names its setting)."""
    from apimeta.evaluate import evaluate_with_config, meta_test, tune_protocol
    from apimeta.run_config import RunConfig

    cfg = RunConfig(way=5, query=2)
    cfg.eval.tasks = 3
    model = _model(2)
    plain = meta_test(model, data, cfg, shots=(1,), tasks=4)
    ref = evaluate_with_config(model, data, cfg, split="test", shots=(1,), tasks=4, keep_accs=True)
    assert plain == ref and "setting" not in plain["1-shot"]
    cfg.eval.tune = {"head": ["learned", "random"], "lr": ["0.01", 0.5]}
    tuned = meta_test(model, data, cfg, shots=(1, 2), tasks=4)
    grid = {"head": ["learned", "random"], "lr": [0.01, 0.5]}
    assert tuned == tune_protocol(model, data, cfg, grid, shots=(1, 2), tasks=4)
    assert {tuple(sorted(r["setting"])) for r in tuned.values()} == {("head", "lr")}
    assert len(tuned["2-shot"]["val"]) == 4 and len(tuned["2-shot"]["accs"]) == 4
