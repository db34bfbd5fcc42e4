"""Method variants of ``apimeta bench``: what each one changes in the resolved config."""

from __future__ import annotations

import pytest

from apimeta.bench import VARIANTS, base_config, config_diff, variant, with_defaults
from apimeta.config import from_dict, merge, to_dict
from apimeta.errors import ConfigError
from apimeta.run_config import RunConfig

CPU = base_config("cpu", [])  # early stop is on in this preset


def _resolved(name: str) -> RunConfig:
    method, overrides = variant(name)
    return from_dict(RunConfig, merge(merge(CPU, {"method": method}), overrides))


def test_white_box_variant_uses_true_gradients_without_early_stop():
    assert _resolved("bidf-mkd").recovery.early_stop_prob is not None
    cfg = _resolved("bidf-mkd:white-box")
    assert cfg.method == "bidf-mkd" and cfg.zo.enabled is False
    assert cfg.recovery.early_stop_prob is None


def _changes(base: dict, other: dict) -> dict:
    """The entries of ``other`` whose values differ from ``base``'s (the same keys)."""
    return {k: other[k] for k in base if base[k] != other[k]}


def test_ablations_change_exactly_one_component():
    base = to_dict(_resolved("bidf-mkd"))
    for name, changed in [
        ("bidf-mkd:no-boundary", {"kd"}),
        ("bidf-mkd:no-memory", {"memory"}),
        ("bidf-mkd:diverse-memory", {"memory"}),
        ("bidf-mkd:scheduled", {"events"}),
        ("bidf-mkd:augmented-memory", {"memory"}),
        ("bidf-mkd:ema", {"ema"}),
        ("bidf-mkd:cosine-lr", {"outer_lr_schedule"}),
        ("bidf-mkd:diverse-recovery", {"recovery"}),
        ("bidf-mkd:diverse-pixels", {"recovery"}),
        ("bidf-mkd:large-inner-lr", {"inner_lr"}),
        ("bidf-mkd:random-head", {"train_head", "eval"}),  # the head, in training and testing
    ]:
        got = to_dict(_resolved(name))
        assert {k for k in base if base[k] != got[k]} == changed, name
    leaves, bbkd = to_dict(_resolved("bbkd:dead-leaves")), to_dict(_resolved("bbkd"))
    assert {k for k in bbkd if bbkd[k] != leaves[k]} == {"recovery", "events"}
    assert _resolved("bbkd:dead-leaves").recovery.source == "dead-leaves"
    contrastive = to_dict(_resolved("bbkd:contrastive-leaves"))
    # the measured run: its loss, its meta-test protocol, its length and budget
    assert {k for k in leaves if leaves[k] != contrastive[k]} == {
        "kd",
        "eval",
        "episodes",
        "query_budget",
    }
    resolved = _resolved("bbkd:contrastive-leaves")
    assert resolved.kd.contrastive == 1.0
    assert (resolved.eval.reinit, resolved.eval.test_lr) == (2, 0.1)
    assert (resolved.episodes, resolved.query_budget, resolved.eval.every) == (4000, 50_000, 0.5)
    assert {k for k in leaves["eval"] if leaves["eval"][k] != contrastive["eval"][k]} == {
        "reinit",
        "test_lr",
        "every",
        "tune",
    }
    assert resolved.eval.tune == {"head": ["learned", "random"]}  # chosen per shot on meta-val
    union = to_dict(_resolved("bbkd:union-leaves"))  # contrastive-leaves + the union CE
    assert {k for k in contrastive if contrastive[k] != union[k]} == {"kd"}
    assert {k for k in union["kd"] if union["kd"][k] != contrastive["kd"][k]} == {
        "union_ce",
        "union_ce_min_prob",
    }
    assert (union["kd"]["union_ce"], union["kd"]["union_ce_min_prob"]) == (1.0, 0.8)
    # union-leaves on other procedural candidates: only recovery.source differs
    for row, source in (("union-strokes", "strokes"), ("union-ink", "ink-strokes"),
                        ("union-leaves-ink", "leaves-ink")):  # fmt: skip
        other = to_dict(_resolved(f"bbkd:{row}"))
        assert {k for k in union if union[k] != other[k]} == {"recovery"}, row
        rec, rec0 = other["recovery"], union["recovery"]
        assert {k for k in rec0 if rec0[k] != rec[k]} == {"source"}, row
        assert rec["source"] == source
    # the control without the APIs' answers: union-leaves-ink with the per-API KD and union CE off
    li, ssl = to_dict(_resolved("bbkd:union-leaves-ink")), to_dict(_resolved("bbkd:ssl-leaves-ink"))
    assert {k for k in li if li[k] != ssl[k]} == {"kd"}
    assert _changes(li["kd"], ssl["kd"]) == {
        "distill": 0.0,
        "union_ce": 0.0,
    }
    colour = to_dict(_resolved("bbkd:colour-leaves-ink"))  # only the views' colour distortion
    assert {k for k in li if li[k] != colour[k]} == {"kd"}
    assert {k for k in li["kd"] if li["kd"][k] != colour["kd"][k]} == {"contrastive_colour"}
    assert colour["kd"]["contrastive_colour"] is True
    lr3 = to_dict(_resolved("bbkd:colour-leaves-ink-lr3"))  # only Adam's outer lr
    assert {k for k in colour if colour[k] != lr3[k]} == {"outer_lr"}
    assert (colour["outer_lr"], lr3["outer_lr"]) == (0.001, 0.003)
    lr5 = to_dict(_resolved("bbkd:colour-leaves-ink-lr5"))
    assert _changes(colour, lr5) == {"outer_lr": 0.005}
    cosine = to_dict(_resolved("bbkd:cosine-leaves-ink-lr5"))  # only the cosine union head
    assert {k for k in lr5 if lr5[k] != cosine[k]} == {"kd"}
    assert _changes(lr5["kd"], cosine["kd"]) == {"cosine_head": 10.0}
    ssl5 = to_dict(_resolved("bbkd:ssl-leaves-ink-lr5"))  # the control at lr 0.005
    assert _changes(ssl, ssl5) == {"outer_lr": 0.005}
    forget = to_dict(_resolved("bbkd:forget-leaves-ink-lr5"))  # only later-layer forgetting
    assert {k for k in lr5 if lr5[k] != forget[k]} == {"kd"}
    assert _changes(lr5["kd"], forget["kd"]) == {"forget_every": 0.1}
    assert forget["kd"]["forget_stages"] == 2
    for row, change in {
        "bbkd:forget1-leaves-ink-lr5": {"forget_stages": 1},  # only the top stage
        "bbkd:forget-slow-leaves-ink-lr5": {"forget_every": 0.2},  # half as often
        "bbkd:forget-fast-leaves-ink-lr5": {"forget_every": 0.05},  # twice as often
    }.items():
        other = to_dict(_resolved(row))
        assert {k for k in forget if forget[k] != other[k]} == {"kd"}
        assert _changes(forget["kd"], other["kd"]) == change
    freeze = to_dict(_resolved("bbkd:freeze-leaves-ink-lr5"))  # only the frozen top stages
    assert {k for k in lr5 if lr5[k] != freeze[k]} == {"kd"}
    assert _changes(lr5["kd"], freeze["kd"]) == {"freeze_stages": 2}
    assert freeze["kd"]["freeze_draw"] == "eval"
    run_draw = to_dict(_resolved("bbkd:freeze-run-leaves-ink-lr5"))  # only the draw's seed
    assert _changes(freeze["kd"], run_draw["kd"]) == {"freeze_draw": "run"}
    answers2 = to_dict(_resolved("bbkd:answers2-leaves-ink-lr5"))  # only the answers' weight
    assert {k for k in lr5 if lr5[k] != answers2[k]} == {"kd"}
    assert _changes(lr5["kd"], answers2["kd"]) == {
        "distill": 2.0,
        "union_ce": 2.0,
    }
    lr8 = to_dict(_resolved("bbkd:colour-leaves-ink-lr8"))  # only the outer lr
    assert _changes(lr5, lr8) == {"outer_lr": 0.008}
    wd = to_dict(_resolved("bbkd:wd-leaves-ink-lr5"))  # only AdamW's weight decay
    assert _changes(lr5, wd) == {"outer_wd": 0.05}
    low = to_dict(_resolved("bbkd:low-leaves-ink-lr5"))  # only the low stage's NT-Xent
    assert {k for k in lr5 if lr5[k] != low[k]} == {"kd"}
    assert _changes(lr5["kd"], low["kd"]) == {"contrastive_low": 1.0}
    again = to_dict(_resolved("bbkd:again-leaves-ink-lr5"))  # one more generation, 2x updates
    assert _changes(lr5, again).keys() == {"episodes", "kd"}
    assert again["episodes"] == 2 * lr5["episodes"]
    assert _changes(lr5["kd"], again["kd"]) == {"born_again": 1}
    mixup = to_dict(_resolved("bbkd:mixup-leaves-ink-lr5"))  # only manifold mixup of the KD
    assert {k for k in lr5 if lr5[k] != mixup[k]} == {"kd"}
    assert _changes(lr5["kd"], mixup["kd"]) == {"manifold_mixup": 2.0}
    vicreg = to_dict(_resolved("bbkd:vicreg-leaves-ink-lr5"))  # only the views' objective
    assert {k for k in lr5 if lr5[k] != vicreg[k]} == {"kd"}
    assert _changes(lr5["kd"], vicreg["kd"]) == {"contrastive_loss": "vicreg"}
    vicreg5 = to_dict(_resolved("bbkd:vicreg5-leaves-ink-lr5"))  # and its weight
    assert _changes(vicreg["kd"], vicreg5["kd"]) == {"contrastive": 5.0}
    vicreg25 = to_dict(_resolved("bbkd:vicreg25-leaves-ink-lr5"))  # VICReg's own weights
    assert _changes(vicreg["kd"], vicreg25["kd"]) == {"contrastive": 25.0}
    lowlr = to_dict(_resolved("bbkd:lowlr-leaves-ink-lr5"))  # only the low stages' outer lr
    assert _changes(lr5, lowlr) == {"outer_lr_stages": [2.0, 2.0]}
    zoo, zoo3 = to_dict(_resolved("maml-zoo")), to_dict(_resolved("maml-zoo:lr3"))
    assert _changes(zoo, zoo3) == {"outer_lr": 0.003}
    zoo5 = to_dict(_resolved("maml-zoo:lr5"))
    assert _changes(zoo, zoo5) == {"outer_lr": 0.005}
    kd, kd0 = to_dict(_resolved("bidf-mkd:no-boundary"))["kd"], base["kd"]
    assert {k for k in kd if kd[k] != kd0[k]} == {"adv"}
    mem = _resolved("bidf-mkd:diverse-memory").memory
    assert mem.enabled and mem.min_classes == 10 and mem.filter_query


def test_every_variant_resolves_and_unknown_ones_are_refused():
    for name in VARIANTS:
        _resolved(name)
    with pytest.raises(ConfigError, match="unknown method variant"):
        variant("bidf-mkd:nope")


def test_keys_added_after_a_run_was_trained_are_no_difference():
    now = to_dict(_resolved("bidf-mkd"))
    old = to_dict(_resolved("bidf-mkd"))
    del (
        old["memory"]["min_classes"],
        old["recovery"]["early_stop_prob"],
    )  # as stored before they existed
    old["kd"]["adv_start"] = 75
    assert set(config_diff(old, now)) == {
        "kd.adv_start",
        "recovery.early_stop_prob",
        "memory.min_classes",
    }
    filled = with_defaults(old)
    assert filled["memory"]["min_classes"] == 0
    # early_stop_prob's default (None) is not the cpu preset's 0.8: that difference is real
    assert config_diff(filled, now) == {
        "kd.adv_start": [75, now["kd"]["adv_start"]],
        "recovery.early_stop_prob": [None, now["recovery"]["early_stop_prob"]],
    }


def test_event_counts_print_whole_or_as_a_short_mean():
    from apimeta.bench import _count

    assert [_count(v) for v in (0, 15, 26.0, 4 / 3, 2.5, 100)] == [
        "0",
        "15",
        "26",
        "1.33",
        "2.5",
        "100",
    ]


def test_protocol_key_names_reinit_only_when_set():
    """A run config with ``eval.reinit`` is tuned apart from one without; caches written before
    the option (no ``reinit`` key) still match a config that leaves it at 0."""
    import dataclasses

    from apimeta.bench import _protocol_key
    from apimeta.run_config import RunConfig

    cfg = RunConfig()
    assert "reinit" not in _protocol_key(cfg)
    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, reinit=2))
    assert _protocol_key(other) == {**_protocol_key(cfg), "reinit": 2}


def test_a_bench_row_is_base_then_variant_then_sets_then_scenario(tmp_path):
    """--set wins over a variant's own length and budget; the scenario and the row name the zoo,
    the datasets and the method whatever the preset or --set say."""
    from apimeta.bench import ZooScenario, row_config

    assert CPU["method"] == "bbkd:colour-leaves-ink-lr5"  # the preset's variant, not expanded
    scen = ZooScenario("SS", "zoos/z", "emoji")
    kw = {"shots": (1, 5), "tasks": 7}
    own = row_config(CPU, scen, "bbkd:union-leaves-ink", tmp_path, **kw)
    assert (own.method, own.episodes, own.query_budget) == ("bbkd", 4000, 50_000)
    assert own.eval.test_tasks == 7 and own.zoo == "zoos/z" and own.out == str(tmp_path)
    sets = ["episodes=12", "query_budget=900", "zoo=elsewhere", "method=maml-real"]
    cfg = row_config(CPU, scen, "bbkd:union-leaves-ink", tmp_path, sets=sets, seed=5, **kw)
    assert (cfg.method, cfg.episodes, cfg.query_budget, cfg.zoo) == ("bbkd", 12, 900, "zoos/z")
    assert cfg.seed == 5 and cfg.kd.contrastive == 1.0
    # another row of the same base gets none of the preset's variant
    paper = row_config(CPU, scen, "bidf-mkd", tmp_path, **kw)
    assert paper.method == "bidf-mkd" and paper.kd.contrastive == 0.0
    assert paper.recovery.source == "generator" and paper.query_budget == 5_000_000


def test_a_row_that_cannot_start_is_refused_before_any_row_trains(tmp_path):
    """bbkd:public-union without --set recovery.folder: the bench stops at once (nothing is
    written), not after training the rows before it; with the folder set every row accepts it."""
    from apimeta.bench import Cell, ZooScenario, row_config, run_cells

    scen = ZooScenario("SS", str(tmp_path / "no-zoo"), "emoji")
    cells = [Cell(scen, "random", None), Cell(scen, "bbkd:public-union", None)]
    with pytest.raises(ConfigError, match=r"recovery\.folder=PATH"):
        run_cells(CPU, cells, tmp_path / "out", shots=(1,), tasks=2)
    assert not (tmp_path / "out").exists()
    sets = [f"recovery.folder={tmp_path}"]
    public = row_config(CPU, scen, "bbkd:public-union", tmp_path, shots=(1,), tasks=2, sets=sets)
    assert (public.recovery.source, public.kd.union_ce) == ("folder", 1.0)
    random = row_config(CPU, scen, "random", tmp_path, shots=(1,), tasks=2, sets=sets)
    assert random.recovery.source == "generator"  # the folder is read only by its source


def test_a_reused_run_differs_only_in_what_its_method_reads(tmp_path):
    from apimeta.bench import ZooScenario, reuse_diff, row_config

    scen = ZooScenario("SS", "zoos/z", "emoji")
    kw = {"shots": (1,), "tasks": 2}
    folder = [f"recovery.folder={tmp_path}"]
    for name in ("bbkd:contrastive-leaves", "bbkd:public-union"):
        trained = to_dict(row_config(CPU, scen, name, tmp_path, sets=folder, **kw))
        assert (
            reuse_diff(trained, row_config(CPU, scen, name, tmp_path, sets=folder, **kw), name)
            == {}
        )
        other = row_config(CPU, scen, name, tmp_path, sets=[f"recovery.folder={tmp_path}/b"], **kw)
        diff = reuse_diff(trained, other, name)
        # dead leaves never read the folder; the public row does
        assert diff == (
            {} if name.endswith("leaves") else {"recovery.folder": [str(tmp_path), f"{tmp_path}/b"]}
        )
        changed = row_config(CPU, scen, name, tmp_path, sets=[*folder, "kd.contrastive=2"], **kw)
        assert reuse_diff(trained, changed, name) == {"kd.contrastive": [1.0, 2.0]}
