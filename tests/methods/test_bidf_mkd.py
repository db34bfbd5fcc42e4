"""BiDf-MKD mechanics on a tiny synthetic zoo: query accounting, resume, budget, ablations."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from apimeta.apis.base import QueryLedger
from apimeta.apis.zoo import build_zoo
from apimeta.checkpoint import load_checkpoint
from apimeta.errors import CheckpointError, ConfigError, TrainingInterrupted
from apimeta.evaluate import REINIT_SEED, reinit_stages
from apimeta.events import EventSchedule
from apimeta.losses import union_ce
from apimeta.methods import METHODS
from apimeta.methods.bbkd import CosineHead, dataset_spans
from apimeta.models.meta import build_from_spec, load_init
from apimeta.models.stages import feature_stages, redraw_top_stages
from apimeta.run_config import (
    EvalConfig,
    EventConfig,
    KDConfig,
    MemoryConfig,
    RecoveryConfig,
    RunConfig,
    ZOConfig,
)
from apimeta.runs import RunDir
from apimeta.seeding import derive_seed
from apimeta.testing import ctrl_c_after_steps, make_config

B_PER_CLASS, ITERS, Q, WAY = 4, 2, 2, 5
B = B_PER_CLASS * WAY


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    build_zoo(["synthetic"], 3, ["conv4"], WAY, out, epochs=2, conv4_width=8, seed=1)
    return out


def tiny_cfg(zoo, tmp_path, **kw) -> RunConfig:
    base = dict(
        method="bidf-mkd",
        dataset="synthetic",
        zoo=str(zoo),
        width=8,
        way=WAY,
        shot=1,
        query=3,
        episodes=4,
        meta_batch=2,
        recovery=RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS),
        zo=ZOConfig(q=Q),
        kd=KDConfig(adv_start=1),
        events=EventConfig(patience=1),
        eval=EvalConfig(every=1000, tasks=3, test_tasks=3),
        checkpoint_every=1,
        query_budget=None,
        out=str(tmp_path / "run"),
    )
    return make_config(base, **kw)


def train(cfg: RunConfig, resume: bool = False):
    method = METHODS.get(cfg.method)()
    run = RunDir.create(cfg, resume=resume)
    result = method.train(cfg, run, resume=resume)
    return method, result


def test_one_event_costs_two_recoveries_plus_two_cached_kd_queries(zoo, tmp_path):
    cfg = tiny_cfg(zoo, tmp_path, episodes=1, meta_batch=1)
    m, _ = train(cfg)
    recovery = ITERS * B * (1 + Q)  # forward differences: base + q perturbed per image
    assert len(m.events) == 1
    assert m.events[0]["queries"] == 2 * recovery + 2 * B
    assert m.ledger.used == 2 * recovery + 2 * B


def test_reference_requeries_support_outputs_every_inner_step(zoo, tmp_path):
    cfg = tiny_cfg(zoo, tmp_path, episodes=1, meta_batch=1, cache_api_outputs=False)
    m, _ = train(cfg)
    recovery = ITERS * B * (1 + Q)
    assert m.ledger.used == 2 * recovery + (cfg.kd.inner_steps + 1) * B


def test_first_update_has_api_event_then_memory_episodes(zoo, tmp_path):
    m, result = train(tiny_cfg(zoo, tmp_path, episodes=4, meta_batch=2, api_patience=100))
    rows = [r for r in m.run.read_metrics() if r.get("phase") == "train"]
    assert rows[0]["api_episodes"] == 1 and rows[0]["memory_episodes"] == 1
    assert all(r["api_episodes"] == 0 for r in rows[1:])  # patience 100: no new event
    assert rows[0]["memory_classes"] == WAY
    assert (m.run.path / "recovered" / "event-0000.png").exists()
    assert set(result.metrics["test"]["best"]) == {"synthetic"}
    event = m.events[0]  # a diversity figure per event, beside fidelity
    assert 0 < event["diversity_support"] <= 2 and 0 < event["diversity_support_pixels"] <= 2


def test_resume_gives_the_same_model_as_an_uninterrupted_run(zoo, tmp_path):
    full, _ = train(tiny_cfg(zoo, tmp_path / "a", episodes=8))
    part, _ = train(tiny_cfg(zoo, tmp_path / "b", episodes=4))
    assert part.step == 2
    resumed, _ = train(tiny_cfg(zoo, tmp_path / "b", episodes=8), resume=True)
    assert resumed.step == 4
    a = load_checkpoint(full.run.last_checkpoint)
    b = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=0, atol=0)
    assert a["extra"]["ledger"] == b["extra"]["ledger"]
    assert len(a["extra"]["events"]) == len(b["extra"]["events"])


def test_budget_exhaustion_stops_cleanly_with_a_checkpoint(zoo, tmp_path):
    event = 2 * ITERS * B * (1 + Q) + 2 * B
    cfg = tiny_cfg(
        zoo, tmp_path, episodes=40, query_budget=event + event // 2, on_budget_exhausted="stop"
    )
    m, result = train(cfg)
    assert len(m.events) == 1
    assert m.ledger.used <= cfg.query_budget
    assert m.step < cfg.episodes // cfg.meta_batch  # stopped early
    ckpt = load_checkpoint(m.run.last_checkpoint)
    assert ckpt["step"] == m.step and ckpt["extra"]["budget_exhausted"]
    assert "test" in result.metrics


def test_budget_exhaustion_keeps_replaying_memory(zoo, tmp_path):
    event = 2 * ITERS * B * (1 + Q) + 2 * B
    cfg = tiny_cfg(zoo, tmp_path, episodes=12, query_budget=event, on_budget_exhausted="replay")
    m, _ = train(cfg)
    assert m.step == 6 and len(m.events) == 1 and m.ledger.used <= event


def test_ablations_no_memory_no_boundary_white_box(zoo, tmp_path):
    no_mem = tiny_cfg(zoo, tmp_path / "nm", episodes=2, memory=MemoryConfig(enabled=False))
    m, _ = train(no_mem)
    assert len(m.events) == 2 and len(m.memory.classes()) == 0
    no_adv, _ = train(tiny_cfg(zoo, tmp_path / "na", episodes=4, adv=0.0))
    assert {e["query_mode"] for e in no_adv.events} == {"support"}
    adv, _ = train(tiny_cfg(zoo, tmp_path / "ad", episodes=4, adv_start=0))
    assert {e["query_mode"] for e in adv.events} == {"boundary"}
    white = tiny_cfg(zoo, tmp_path / "wb", episodes=1, meta_batch=1, zo=ZOConfig(enabled=False))
    wb, _ = train(white)
    assert wb.ledger.used == 2 * ITERS * B + 2 * B  # forward queries only, no perturbations


def test_missing_zoo_and_too_few_images_are_config_errors(zoo, tmp_path):
    with pytest.raises(ConfigError, match="--zoo"):
        train(dataclasses.replace(tiny_cfg(zoo, tmp_path / "x"), zoo=None))
    with pytest.raises(ConfigError, match=r"recovery\.per_class"):
        train(tiny_cfg(zoo, tmp_path / "y", query=15))


def test_bbkd_spends_queries_and_keeps_a_zero_head(zoo, tmp_path):
    cfg = tiny_cfg(zoo, tmp_path, method="bbkd", episodes=4, events=EventConfig(patience=1))
    m, result = train(cfg)
    assert m.n_events == 2
    assert m.ledger.used == 2 * (2 * ITERS * B * (1 + Q) + 2 * B) - 2 * B * 0
    head = load_checkpoint(m.run.last_checkpoint)["model"]
    assert torch.count_nonzero(head["net.classifier.weight"]) == 0
    assert result.metrics["test"]["final"]["synthetic"]


def test_bbkd_mixups_label_mixed_recovered_images_with_one_query_each(zoo, tmp_path):
    """recovery.mixups: M mixups of an event's recovered images join its pool entry, one query
    each; the recovered images themselves are unchanged; bidf-mkd refuses the setting."""
    kw = dict(method="bbkd", episodes=4, events=EventConfig(patience=1))
    plain, _ = train(tiny_cfg(zoo, tmp_path / "p", **kw))
    rec = RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS, mixups=7)
    m, _ = train(tiny_cfg(zoo, tmp_path / "m", recovery=rec, **kw))
    assert m.n_events == plain.n_events == 2
    assert m.ledger.used == plain.ledger.used + 2 * 7
    for a, b, t in zip(plain.pool_x, m.pool_x, m.pool_t, strict=True):
        assert b.shape[0] == a.shape[0] + 7 == t.shape[0]
        assert torch.equal(b[: a.shape[0]], a)  # the recovered images, as without mixups
        assert float(b[a.shape[0] :].min()) >= 0 and float(b[a.shape[0] :].max()) <= 1
    with pytest.raises(ConfigError, match=r"recovery\.mixups .* is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "b", recovery=rec))
    bad = RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS, mixups=-1)
    with pytest.raises(ConfigError, match=r"recovery\.mixups must be >= 0"):
        train(tiny_cfg(zoo, tmp_path / "c", recovery=bad, **kw))


def test_min_classes_triggers_events_until_memory_is_diverse(zoo, tmp_path):
    plain, _ = train(tiny_cfg(zoo, tmp_path / "p", episodes=2, api_patience=100))
    cfg = tiny_cfg(zoo, tmp_path / "m", episodes=2, api_patience=100)
    cfg = dataclasses.replace(cfg, memory=MemoryConfig(min_classes=2 * WAY))
    m, _ = train(cfg)
    first = next(r for r in m.run.read_metrics() if r.get("phase") == "train")
    assert len(plain.events) == 1  # the paper: one event, then memory episodes
    assert first["api_episodes"] == 2 and first["memory_episodes"] == 0


def test_filter_query_stores_only_images_the_api_assigns_to_their_class(zoo, tmp_path):
    cfg = tiny_cfg(zoo, tmp_path / "f", episodes=1, meta_batch=1)
    cfg = dataclasses.replace(cfg, memory=MemoryConfig(filter_query=True))
    m, _ = train(cfg)
    stored = sum(m.memory.n_images(k) for k in m.memory.classes())
    kept = m.events[0]["query_stored"]
    assert 0 <= kept < B and stored == B + kept  # all of S, the agreeing part of Q
    unfiltered, _ = train(tiny_cfg(zoo, tmp_path / "u", episodes=1, meta_batch=1))
    assert unfiltered.events[0]["query_stored"] == B
    assert sum(unfiltered.memory.n_images(k) for k in unfiltered.memory.classes()) == 2 * B


@pytest.mark.parametrize("trigger", ["plateau", "every"])
def test_event_trigger_plateau_waits_for_a_plateau_every_does_not(trigger):
    schedule = EventSchedule(trigger, patience=2)
    schedule.event_done()
    due = []
    for acc in (0.1, 0.2, 0.3, 0.4, 0.4, 0.4):  # improving, then flat
        schedule.update(acc)
        due.append(schedule.due)
        schedule.event_done()  # the next API episode consumes it
    if trigger == "plateau":
        assert due == [False, False, False, False, False, True]
    else:
        assert due == [False, True, False, True, False, True]


def test_unknown_event_trigger_is_a_config_error(zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"events\.trigger"):
        train(tiny_cfg(zoo, tmp_path, event_trigger="sometimes"))


@pytest.mark.parametrize("method", ["bidf-mkd", "bbkd"])
def test_a_budget_below_one_event_is_refused_before_the_run_starts(zoo, tmp_path, method):
    """It used to train on nothing and print a results table (exit 0)."""
    cfg = tiny_cfg(zoo, tmp_path, method=method, query_budget=100)
    with pytest.raises(ConfigError, match=r"cannot pay for one API event.*at least \d+"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # nothing left half-written
    with pytest.raises(ConfigError, match="query_budget must be >= 0"):
        train(tiny_cfg(zoo, tmp_path, method=method, query_budget=-5))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["bidf-mkd", "bbkd"])
def test_meta_val_with_reinit_runs_inside_training(zoo, tmp_path, method):
    """In-training meta-val copies the model for eval.reinit: bbkd's feature hook, bound to the
    learner, once dragged the learner (its ledger's lock) into that copy and the run failed."""
    ev = EvalConfig(every=2, tasks=3, test_tasks=3, reinit=2)
    m, result = train(tiny_cfg(zoo, tmp_path, method=method, eval=ev))
    assert [r["step"] for r in m.run.read_metrics() if r.get("phase") == "val"]
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.model.modules())
    assert result.metrics["test"]["final"]["synthetic"]


def test_schedules_a_short_run_never_reaches_are_warned_about(zoo, tmp_path, caplog):
    """A 2-update run with the default kd.adv_start=500 and eval.every=1000 used to run without
    the boundary term and without model selection, silently."""
    cfg = tiny_cfg(zoo, tmp_path, episodes=4, kd=KDConfig(adv_start=500))
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "kd.adv_start=500 >= the run's 2 meta-updates" in caplog.text
    assert "meta-val runs only at the end" in caplog.text


def test_fractional_schedules_scale_with_the_run(zoo, tmp_path, caplog):
    """kd.adv_start and eval.every in (0, 1) are fractions of the run: the boundary term starts
    and meta-val runs at the same relative points whatever --episodes is."""
    from apimeta.run_config import EvalConfig, schedule_point

    assert [schedule_point(v, 2000) for v in (0.25, 500, 0, 0.0001)] == [500, 500, 0, 1]
    cfg = tiny_cfg(
        zoo,
        tmp_path,
        episodes=8,
        kd=KDConfig(adv_start=0.5),
        eval=EvalConfig(every=0.5, tasks=3, test_tasks=3),
    )
    with caplog.at_level("WARNING"):
        m, _ = train(cfg)
    assert m.adv_start == 2 and "never switches on" not in caplog.text
    assert "meta-val runs only at the end" not in caplog.text
    vals = [r for r in m.run.read_metrics() if r.get("phase") == "val"]
    assert [r["step"] for r in vals] == [2, 4]  # every 4 of the 8 episodes = 2 updates


@pytest.mark.parametrize("meta_batch", [2, 4])
def test_a_memory_meta_update_syncs_once_whatever_its_size(zoo, tmp_path, meta_batch):
    """A replay meta-update (meta_batch memory episodes, inner steps, backward) converts one
    device tensor to Python (its accuracy, for the event schedule); the trainer adds one (the
    loss: finite check and record). The memory lives on the run's device."""
    from apimeta.testing import count_host_syncs

    cfg = tiny_cfg(zoo, tmp_path, episodes=2, meta_batch=2, api_patience=100, inner_steps=3)
    m, _ = train(cfg)
    m.cfg = dataclasses.replace(m.cfg, meta_batch=meta_batch)
    assert not m.schedule.due and m.memory.device == m.device

    def update() -> None:
        loss, metrics = m.meta_batch_loss(m.state.step)
        loss.backward()
        assert metrics["memory_episodes"] == meta_batch and metrics["api_episodes"] == 0

    assert count_host_syncs(update) == 1


def test_memory_augment_changes_replayed_images_only(zoo, tmp_path):
    """memory.augment: the same memory task (same classes, labels, sample) gets augmented
    support and query images; the stored memory is untouched; unknown names are refused."""
    cfg = tiny_cfg(zoo, tmp_path, episodes=2, meta_batch=2, api_patience=100)
    m, _ = train(cfg)
    state = m.rng("memory-tasks").get_state()
    plain, no_mix = m.memory_episode()
    assert no_mix is None  # memory.interpolate 0: a plain task
    stored = {k: m.memory.n_images(k) for k in m.memory.classes()}
    m.rng("memory-tasks").set_state(state)
    m.cfg = dataclasses.replace(m.cfg, memory=MemoryConfig(augment="crop,flip,jitter,cutout"))
    aug, _ = m.memory_episode()
    assert aug.class_ids == plain.class_ids
    assert torch.equal(aug.support_y, plain.support_y) and torch.equal(aug.query_y, plain.query_y)
    assert aug.support_x.shape == plain.support_x.shape
    assert not torch.equal(aug.support_x, plain.support_x)
    assert not torch.equal(aug.query_x, plain.query_x)
    assert {k: m.memory.n_images(k) for k in m.memory.classes()} == stored
    bad = dataclasses.replace(cfg, memory=MemoryConfig(augment="rotate"), out=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="unknown augmentation"):
        train(bad)


def test_memory_interpolate_mixes_two_memory_tasks_costs_no_queries_and_resumes(zoo, tmp_path):
    """memory.interpolate: that share of the replayed tasks pairs two memory tasks with a drawn
    mix (MLTI); no query more, other weights, an exact resume; bad values are refused."""
    kw = dict(episodes=6, meta_batch=2, api_patience=100)
    off, _ = train(tiny_cfg(zoo, tmp_path / "off", **kw))
    on, _ = train(tiny_cfg(zoo, tmp_path / "on", memory=MemoryConfig(interpolate=1.0), **kw))
    assert on.ledger.used == off.ledger.used  # one API event each, the mixes cost nothing
    ep, mix = on.memory_episode()
    assert mix is not None and -1 <= mix.stage < 3 and 0 < mix.lam < 1
    n = WAY * 1  # way x shot of one task
    assert ep.support_x.shape[0] == (n if mix.stage == -1 else 2 * n)
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (off, on))
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])
    part = tiny_cfg(zoo, tmp_path / "part", memory=MemoryConfig(interpolate=1.0), **kw)
    train(dataclasses.replace(part, episodes=2))
    resumed, _ = train(part, resume=True)
    c = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in b["model"].items():
        torch.testing.assert_close(v, c["model"][k], rtol=0, atol=0)
    for bad, msg in [
        (MemoryConfig(interpolate=1.5), r"memory\.interpolate must be in \[0, 1\]"),
        (MemoryConfig(interpolate=0.5, interpolate_alpha=0.0), r"interpolate_alpha must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            train(tiny_cfg(zoo, tmp_path / "bad", memory=bad, **kw))


def _shared(meta_step: float, **kw) -> RecoveryConfig:
    return RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS, meta_step=meta_step, **kw)


def test_shared_generator_takes_a_reptile_step_per_recovery_and_resumes_exactly(zoo, tmp_path):
    """recovery.meta_step: one generator shared across APIs starts every recovery and moves that
    share of the way to the adapted weights; it costs the same queries and resumes exactly."""
    one = tiny_cfg(zoo, tmp_path / "one", episodes=1, meta_batch=1)
    plain, _ = train(one)
    m, _ = train(dataclasses.replace(one, recovery=_shared(0.5), out=str(tmp_path / "shared")))
    assert m.ledger.used == plain.ledger.used  # same iterations, same images per recovery
    assert plain.shared_generators == {} and set(m.shared_generators) == {"32x3"}
    shared, adapted = m.shared_generators["32x3"], m._adapted["32x3"]
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    rec = m.recover_from(m.apis[0])
    assert not rec.budget_exhausted
    after = {k: v.clone() for k, v in shared.state_dict().items()}
    work = adapted.state_dict()
    assert any(not torch.equal(work[k], before[k]) for k in work)  # the copy was trained
    for k, v in after.items():
        if v.is_floating_point():
            torch.testing.assert_close(v, before[k] + 0.5 * (work[k] - before[k]))
        else:
            assert torch.equal(v, work[k])
    # the next recovery starts from the moved generator, not a fresh one: the same draws
    # (recovery RNG), other images
    state = m.rng("recovery").get_state()
    from_shared = m.recover_from(m.apis[0]).images
    m.rng("recovery").set_state(state)
    m.cfg = dataclasses.replace(m.cfg, recovery=_shared(0.0))
    assert not torch.equal(from_shared, m.recover_from(m.apis[0]).images)
    m.rng("recovery").set_state(state)
    m.cfg = dataclasses.replace(m.cfg, recovery=_shared(0.5))
    m.shared_generators["32x3"].load_state_dict(after)
    torch.testing.assert_close(m.recover_from(m.apis[0]).images, from_shared, rtol=0, atol=0)
    # interrupted and resumed: the same shared generator and model
    kw = dict(episodes=8, recovery=_shared(0.5))
    full, _ = train(tiny_cfg(zoo, tmp_path / "a", **kw))
    train(tiny_cfg(zoo, tmp_path / "b", **{**kw, "episodes": 4}))
    resumed, _ = train(tiny_cfg(zoo, tmp_path / "b", **kw), resume=True)
    a = load_checkpoint(full.run.last_checkpoint)
    b = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in a["extra"]["shared_generators"]["32x3"].items():
        torch.testing.assert_close(v, b["extra"]["shared_generators"]["32x3"][k], rtol=0, atol=0)
    for k, v in a["model"].items():
        torch.testing.assert_close(v, b["model"][k], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"recovery\.meta_step must be in \[0, 1\]"):
        train(tiny_cfg(zoo, tmp_path / "bad", recovery=_shared(1.5)))


def test_diverse_recovery_passes_the_learners_feature_diversity_to_recovery(zoo, tmp_path):
    """recovery.diversity: every recovery gets -w * (within-class diversity of the meta-model's
    features of the generator's images), differentiable in the images, weights held fixed;
    off (0) it gets no term; queries are the same."""
    import apimeta.methods.api_learner as al
    from apimeta.evaluate import head_features
    from apimeta.memory import within_class_diversity

    seen = []
    real = al.recover
    spy = lambda *a, **k: seen.append(k.get("regularizer")) or real(*a, **k)  # noqa: E731
    al.recover = spy
    try:
        m0, _ = train(tiny_cfg(zoo, tmp_path, episodes=1, meta_batch=1, out=str(tmp_path / "a")))
        assert seen == [None, None]
        seen.clear()
        cfg = tiny_cfg(zoo, tmp_path, episodes=1, meta_batch=1, out=str(tmp_path / "b"))
        cfg.recovery.diversity = 3.0
        m, _ = train(cfg)
    finally:
        al.recover = real
    assert len(seen) == 2 and all(callable(r) for r in seen)  # support and boundary set
    assert m.ledger.used == m0.ledger.used
    x = torch.rand(B, 3, 32, 32, requires_grad=True)
    t = torch.arange(B) % WAY
    before = [None if p.grad is None else p.grad.clone() for p in m.model.parameters()]
    term = m.diversity_term()(x, t)
    params = {n: p.detach() for n, p in m.model.named_parameters()}
    with torch.no_grad():
        want = -3.0 * within_class_diversity(head_features(m.model, params, x), t)
    assert float(term.detach()) == pytest.approx(float(want), rel=1e-5)
    term.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    after = [p.grad for p in m.model.parameters()]  # no gradient reaches the weights
    assert all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )
    with pytest.raises(ConfigError, match=r"recovery\.diversity must be >= 0"):
        bad = tiny_cfg(zoo, tmp_path, out=str(tmp_path / "c"))
        bad.recovery.diversity = -1.0
        train(bad)


@pytest.mark.parametrize("method", ["bidf-mkd", "maml-real"])
def test_random_train_head_meta_learns_the_features_only(zoo, tmp_path, method):
    """train_head=random: every inner loop (inner KD, memory and real-task MAML) starts from a
    fresh head, so the saved head never moves from its init while the features do; learned
    (the paper) moves both."""
    from apimeta.models.meta import load_init

    w0 = load_init(None, tiny_cfg(zoo, tmp_path / "ref", method=method)).state_dict()
    for mode in ("learned", "random"):
        m, _ = train(tiny_cfg(zoo, tmp_path / mode, method=method, episodes=4, train_head=mode))
        got = load_checkpoint(m.run.last_checkpoint)["model"]
        head_moved = not torch.equal(got["net.classifier.weight"], w0["net.classifier.weight"])
        feats_moved = not torch.equal(got["net.features.0.weight"], w0["net.features.0.weight"])
        assert feats_moved, mode
        assert head_moved == (mode == "learned"), mode


def test_bbkd_on_dead_leaves_queries_each_candidate_once_and_trains_no_generator(zoo, tmp_path):
    cfg = tiny_cfg(
        zoo, tmp_path, method="bbkd", episodes=6, events=EventConfig(patience=1),
        recovery=RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS, source="dead-leaves",
                                candidates=7),
    )  # fmt: skip
    m, result = train(cfg)
    assert m.n_events == 3 and m.ledger.used == 3 * 7  # one query per candidate, nothing else
    assert [x.shape[0] for x in m.pool_x] == [7, 7, 7]
    side = m.apis[0].info.image_size
    # kept as uint8 (what the API was sent, exactly), at the API's input size
    assert all(x.dtype == torch.uint8 and x.shape[-1] == side for x in m.pool_x)
    events = [r for r in m.run.read_metrics() if r.get("phase") == "event"]
    assert [e["source"] for e in events] == ["dead-leaves"] * 3
    assert all(1 / WAY <= e["confidence"] <= 1 for e in events)
    assert (m.run.path / "recovered" / "event-0000.png").exists()
    assert result.metrics["test"]["final"]["synthetic"]


def test_a_procedural_source_is_refused_by_bidf_mkd_and_bad_values_by_the_config(zoo, tmp_path):
    rec = dict(per_class=B_PER_CLASS, iters=ITERS)
    with pytest.raises(ConfigError, match=r"recovery\.source .dead-leaves. is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "a", recovery=RecoveryConfig(**rec, source="dead-leaves")))
    with pytest.raises(ConfigError, match=r"recovery\.source must be one of"):
        train(tiny_cfg(zoo, tmp_path / "b", recovery=RecoveryConfig(**rec, source="fractals")))
    with pytest.raises(ConfigError, match=r"recovery\.candidates must be >= 1"):
        train(tiny_cfg(zoo, tmp_path / "c", recovery=RecoveryConfig(**rec, candidates=0)))


def _image_folder(path, n: int, side: int):
    """``n`` distinct RGB PNGs at ``side`` px under ``path`` (one in a sub-folder): (n, 3, s, s)
    uint8, in the folder's sorted order."""
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    (path / "sub").mkdir(parents=True)
    for i in range(n):
        where = path / "sub" if i == n - 1 else path
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(where / f"{i:02d}.png")
    return x


def test_bbkd_on_a_folder_queries_its_images_once_each_and_resumes_exactly(zoo, tmp_path):
    """recovery.source folder: an event's candidates are images of the user's folder (without
    repeats while the folder has enough), one query each; exact resume; bad folders refused
    before anything is written."""
    from apimeta.apis.sources import load_zoo

    side = load_zoo(zoo, ledger=QueryLedger(budget=0))[0].info.image_size
    images = _image_folder(tmp_path / "public", 6, side)

    def cfg(out, episodes=6, candidates=4, folder=str(tmp_path / "public")):
        return tiny_cfg(
            zoo, tmp_path / out, method="bbkd", episodes=episodes, events=EventConfig(patience=1),
            recovery=RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS, source="folder",
                                    candidates=candidates, folder=folder),
        )  # fmt: skip

    m, result = train(cfg("a"))
    assert m.n_events == 3 and m.ledger.used == 3 * 4  # one query per candidate, nothing else
    flat = images.flatten(1)
    for x in m.pool_x:
        assert x.dtype == torch.uint8 and x.shape == (4, 3, side, side)
        hit = (x.flatten(1)[:, None] == flat[None]).all(-1)  # (candidates, folder images)
        assert bool(hit.any(1).all())  # every candidate is a folder image, exactly
        assert int(hit.any(0).sum()) == 4  # no repeats within an event
    assert result.metrics["test"]["final"]["synthetic"]
    events = [r for r in m.run.read_metrics() if r.get("phase") == "event"]
    assert [e["source"] for e in events] == ["folder"] * 3
    more, _ = train(cfg("b", episodes=2, candidates=9))  # more than the folder: with repeats
    assert more.pool_x[0].shape[0] == 9 and more.ledger.used == 9
    train(cfg("part", episodes=4))
    resumed, _ = train(cfg("part"), resume=True)
    for a, b in zip(m.pool_x, resumed.pool_x, strict=True):
        assert torch.equal(a, b)
    a = load_checkpoint(m.run.last_checkpoint)["model"]
    for k, v in load_checkpoint(resumed.run.last_checkpoint)["model"].items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    for folder, match in (
        (None, r"needs a folder of unlabelled images"),
        (str(tmp_path / "nowhere"), r"is not a folder"),
        (str(tmp_path / "empty"), r"holds no \*\.png"),
    ):
        with pytest.raises(ConfigError, match=match):
            train(cfg("bad", folder=folder))
        assert not (tmp_path / "bad" / "last.pt").exists()
    with pytest.raises(ConfigError, match=r"recovery\.source .folder. is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "c", recovery=RecoveryConfig(source="folder", folder="x")))


def _leaves(zoo, tmp_path, contrastive: float, episodes: int = 4, **kd) -> RunConfig:
    return tiny_cfg(
        zoo, tmp_path, method="bbkd", episodes=episodes, events=EventConfig(patience=1),
        recovery=RecoveryConfig(per_class=B_PER_CLASS, iters=ITERS, source="dead-leaves",
                                candidates=7),
        kd=KDConfig(adv_start=1, contrastive=contrastive, **kd),
    )  # fmt: skip


def _resumes_exactly(zoo, tmp_path, want: dict, **kd) -> dict:
    """A `_leaves` run stopped after 2 of its 4 updates and resumed ends with the weights
    ``want`` (the uninterrupted run's model state); returns the resumed run's last checkpoint."""
    train(_leaves(zoo, tmp_path / "part", 1.0, episodes=2, **kd))
    resumed, _ = train(_leaves(zoo, tmp_path / "part", 1.0, **kd), resume=True)
    c = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in want.items():
        torch.testing.assert_close(v, c["model"][k], rtol=0, atol=0)
    return c


def test_bbkd_contrastive_term_costs_no_queries_changes_training_and_resumes_exactly(zoo, tmp_path):
    off, _ = train(_leaves(zoo, tmp_path / "off", 0.0))
    on, _ = train(_leaves(zoo, tmp_path / "on", 1.0))
    assert on.ledger.used == off.ledger.used == 2 * 7  # the views are never sent to an API
    a = load_checkpoint(off.run.last_checkpoint)
    b = load_checkpoint(on.run.last_checkpoint)
    assert a["extra"]["projection"] is None
    assert b["extra"]["projection"]["2.weight"].shape[0] == 128
    # the union head starts the same; the features then learn differently
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])
    # interrupted and resumed: the same weights, projection included
    c = _resumes_exactly(zoo, tmp_path, b["model"])
    for k, v in b["extra"]["projection"].items():
        torch.testing.assert_close(v, c["extra"]["projection"][k], rtol=0, atol=0)


def test_contrastive_colour_distorts_the_views_only_and_needs_the_contrastive_term(zoo, tmp_path):
    plain, _ = train(_leaves(zoo, tmp_path / "plain", 1.0))
    colour, _ = train(_leaves(zoo, tmp_path / "colour", 1.0, contrastive_colour=True))
    assert colour.ledger.used == plain.ledger.used  # the views are never sent to an API
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (plain, colour))
    for k in ("pool_x", "pool_t"):  # the same candidates and answers: only the views differ
        for u, v in zip(a["extra"][k], b["extra"][k], strict=True):
            assert torch.equal(u, v)
    assert not torch.equal(a["model"]["net.features.0.weight"], b["model"]["net.features.0.weight"])
    with pytest.raises(ConfigError, match=r"kd\.contrastive_colour .* set kd\.contrastive > 0"):
        train(_leaves(zoo, tmp_path / "bad", 0.0, contrastive_colour=True))
    assert not (tmp_path / "bad" / "last.pt").exists()


def test_outer_lr_drives_every_parameter_group_of_bbkd(zoo, tmp_path):
    """``outer_lr`` (the ``lr3`` rows: 0.003) is Adam's lr for the backbone and for the union
    head and projection bbkd adds, and a larger one moves the weights further."""
    slow, _ = train(_leaves(zoo, tmp_path / "slow", 1.0))
    cfg = _leaves(zoo, tmp_path / "fast", 1.0)
    fast, _ = train(dataclasses.replace(cfg, outer_lr=0.003))
    assert len(fast.optimizer.param_groups) == 2
    assert [g["lr"] for g in fast.optimizer.param_groups] == [0.003, 0.003]
    assert [g["lr"] for g in slow.optimizer.param_groups] == [0.001, 0.001]
    init = load_init(None, cfg, fast.datasets).state_dict()
    a, b = (load_checkpoint(r.run.last_checkpoint)["model"] for r in (slow, fast))
    k = "net.features.0.weight"
    assert (b[k] - init[k]).norm() > (a[k] - init[k]).norm()


def test_bbkd_union_ce_costs_no_queries_trains_other_apis_columns_and_resumes_exactly(
    zoo, tmp_path
):
    off, _ = train(_leaves(zoo, tmp_path / "off", 0.0))
    on, _ = train(_leaves(zoo, tmp_path / "on", 0.0, union_ce=1.0))
    assert on.ledger.used == off.ledger.used == 2 * 7  # no image is queried twice
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (off, on))
    # the columns of classes no event has seen: per-API KD never touches them (they keep the
    # seeded init both runs share); union CE only ever pushes them down (never a label)
    seen = set(torch.cat(b["extra"]["pool_cols"]).tolist())
    unseen = [c for c in range(len(on.column)) if c not in seen]
    assert unseen, "the tiny zoo's events must leave some API's classes unseen"
    ua, ub = a["extra"]["union_head"]["bias"], b["extra"]["union_head"]["bias"]
    assert bool((ub[unseen] < ua[unseen]).all())
    # a threshold no API output reaches: the term is zero and training is the plain one
    never, _ = train(_leaves(zoo, tmp_path / "never", 0.0, union_ce=1.0, union_ce_min_prob=0.999))
    c = load_checkpoint(never.run.last_checkpoint)
    for k, v in a["model"].items():
        torch.testing.assert_close(v, c["model"][k], rtol=0, atol=0)
    # interrupted and resumed: the same weights
    train(_leaves(zoo, tmp_path / "part", 0.0, episodes=2, union_ce=1.0))
    resumed, _ = train(_leaves(zoo, tmp_path / "part", 0.0, union_ce=1.0), resume=True)
    d = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in b["model"].items():
        torch.testing.assert_close(v, d["model"][k], rtol=0, atol=0)


def test_contrastive_is_refused_by_bidf_mkd_and_bad_values_by_the_config(zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"kd\.contrastive .* is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "a", kd=KDConfig(adv_start=1, contrastive=1.0)))
    with pytest.raises(ConfigError, match=r"kd\.contrastive must be >= 0"):
        train(_leaves(zoo, tmp_path / "b", -1.0))
    cfg = _leaves(zoo, tmp_path / "c", 1.0)
    cfg = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, contrastive_tau=0.0))
    with pytest.raises(ConfigError, match=r"kd\.contrastive_tau must be > 0"):
        train(cfg)
    with pytest.raises(ConfigError, match=r"kd\.union_ce .* is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "d", kd=KDConfig(adv_start=1, union_ce=1.0)))
    with pytest.raises(ConfigError, match=r"kd\.union_ce must be >= 0"):
        train(_leaves(zoo, tmp_path / "e", 0.0, union_ce=-1.0))
    with pytest.raises(ConfigError, match=r"kd\.union_ce_min_prob must be in \[0, 1\)"):
        train(_leaves(zoo, tmp_path / "f", 0.0, union_ce=1.0, union_ce_min_prob=1.0))


def test_resuming_with_the_contrastive_term_switched_is_a_checkpoint_error(zoo, tmp_path):
    train(_leaves(zoo, tmp_path, 0.0, episodes=2))
    with pytest.raises(CheckpointError, match="trained with other parameters"):
        train(_leaves(zoo, tmp_path, 1.0), resume=True)


def test_bbkd_without_the_apis_answers_queries_nothing_and_draws_the_labelled_runs_images(
    zoo, tmp_path
):
    """kd.distill=0 with kd.union_ce=0 (the control row ssl-leaves-ink): no query at all, the
    same candidates a labelled run draws (as many as its budget pays for), the contrastive loss
    alone trains, and it resumes exactly; settings that leave nothing to learn are refused."""
    budget = 3 * 7  # three events' worth of candidates; the 4th update finds the budget spent
    labelled, _ = train(
        dataclasses.replace(_leaves(zoo, tmp_path / "a", 1.0, episodes=8), query_budget=budget)
    )
    control, result = train(
        dataclasses.replace(
            _leaves(zoo, tmp_path / "b", 1.0, episodes=8, distill=0.0), query_budget=budget
        )
    )
    assert labelled.ledger.used == budget and control.ledger.used == 0
    assert control.n_events == labelled.n_events == 3
    for a, b in zip(labelled.pool_x, control.pool_x, strict=True):
        assert torch.equal(a, b)  # the same images, unlabelled
    events = [r for r in control.run.read_metrics() if r.get("phase") == "event"]
    assert [e["labelled"] for e in events] == [False] * 3 and "confidence" not in events[0]
    train_rows = [r for r in control.run.read_metrics() if r.get("phase") == "train"]
    assert train_rows and all("train_acc" not in r for r in train_rows)
    assert result.metrics["test"]["final"]["synthetic"]
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (labelled, control))
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])  # the KD term was on in one of them
    # the union head gets no gradient without answers: it keeps its seeded init
    fresh, _ = train(
        dataclasses.replace(
            _leaves(zoo, tmp_path / "c", 1.0, distill=0.0, episodes=0), query_budget=budget
        )
    )
    c = load_checkpoint(fresh.run.last_checkpoint)
    for k, v in c["extra"]["union_head"].items():
        torch.testing.assert_close(b["extra"]["union_head"][k], v, rtol=0, atol=0)
    # interrupted and resumed: the same weights
    part = dataclasses.replace(
        _leaves(zoo, tmp_path / "p", 1.0, episodes=8, distill=0.0), query_budget=budget
    )
    train(dataclasses.replace(part, episodes=4))
    resumed, _ = train(part, resume=True)
    for k, v in b["model"].items():
        got = load_checkpoint(resumed.run.last_checkpoint)["model"][k]
        torch.testing.assert_close(got, v, rtol=0, atol=0)
    # the KD weight scales the per-API KD: 0 with the union CE on still queries, and differs
    half, _ = train(_leaves(zoo, tmp_path / "h", 0.0, distill=0.5))
    one, _ = train(_leaves(zoo, tmp_path / "o", 0.0))
    assert half.ledger.used == one.ledger.used == 2 * 7
    h, o = (load_checkpoint(r.run.last_checkpoint)["model"][w] for r in (half, one))
    assert not torch.equal(h, o)
    with pytest.raises(ConfigError, match=r"leave nothing to learn"):
        train(_leaves(zoo, tmp_path / "n", 0.0, distill=0.0))
    with pytest.raises(ConfigError, match=r"needs them; set a procedural recovery\.source"):
        train(tiny_cfg(zoo, tmp_path / "g", method="bbkd", kd=KDConfig(contrastive=1.0, distill=0)))
    with pytest.raises(ConfigError, match=r"kd\.distill must be >= 0"):
        train(_leaves(zoo, tmp_path / "m", 1.0, distill=-1.0))
    with pytest.raises(ConfigError, match=r"kd\.distill \(0\.0\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "d", kd=KDConfig(adv_start=1, distill=0.0)))
    for out in "nmgd":
        assert not (tmp_path / out / "last.pt").exists()


def test_bbkd_unanswered_apis_are_never_queried_and_teach_through_the_contrastive_loss(
    zoo, tmp_path
):
    """kd.unanswered: the named APIs' events draw the labelled run's candidates but never query
    them (the budget counts them as labelled), the others train as usual; naming every API is
    the control exactly; it resumes exactly; bad names and settings are refused."""
    budget = 3 * 7
    base = dict(contrastive=1.0, episodes=8)

    def run(out, **kd):
        return train(
            dataclasses.replace(_leaves(zoo, tmp_path / out, **base, **kd), query_budget=budget)
        )

    labelled, _ = run("a")
    events = [r for r in labelled.run.read_metrics() if r.get("phase") == "event"]
    silent = events[0]["api"]
    assert any(e["api"] != silent for e in events), "the tiny run must meet two APIs"
    mixed, _ = run("m", unanswered=[silent])
    got = [r for r in mixed.run.read_metrics() if r.get("phase") == "event"]
    assert [e["api"] for e in got] == [e["api"] for e in events]
    assert [e["labelled"] for e in got] == [e["api"] != silent for e in events]
    assert mixed.pool_answered == [e["api"] != silent for e in events]
    assert mixed.ledger.used == 7 * sum(e["api"] != silent for e in events)
    for a, b in zip(labelled.pool_x, mixed.pool_x, strict=True):
        assert torch.equal(a, b)  # the same candidates, some unlabelled
    control, _ = run("c", distill=0.0)
    w = "net.features.0.weight"
    a, m, c = (
        load_checkpoint(r.run.last_checkpoint)["model"][w] for r in (labelled, mixed, control)
    )
    assert not torch.equal(m, a) and not torch.equal(m, c)
    # every API unanswered (by dataset name) is the control, weight for weight
    every, _ = run("e", unanswered=["synthetic"])
    assert every.ledger.used == 0 and every.n_events == control.n_events
    e = load_checkpoint(every.run.last_checkpoint)["model"]
    for k, v in load_checkpoint(control.run.last_checkpoint)["model"].items():
        torch.testing.assert_close(e[k], v, rtol=0, atol=0)
    # interrupted and resumed: the same weights
    part = dataclasses.replace(
        _leaves(zoo, tmp_path / "p", **base, unanswered=[silent]), query_budget=budget
    )
    train(dataclasses.replace(part, episodes=4))
    resumed, _ = train(part, resume=True)
    assert resumed.pool_answered == mixed.pool_answered
    torch.testing.assert_close(
        load_checkpoint(resumed.run.last_checkpoint)["model"][w], m, rtol=0, atol=0
    )
    with pytest.raises(ConfigError, match=r"kd\.unanswered: nope is neither a dataset nor an API"):
        run("x", unanswered=["nope"])
    with pytest.raises(ConfigError, match=r"kd\.unanswered needs kd\.contrastive > 0"):
        train(_leaves(zoo, tmp_path / "y", 0.0, unanswered=[silent]))
    with pytest.raises(ConfigError, match=r"kd\.unanswered needs a procedural recovery\.source"):
        train(
            tiny_cfg(
                zoo,
                tmp_path / "g",
                method="bbkd",
                kd=KDConfig(contrastive=1.0, unanswered=[silent]),
            )
        )
    with pytest.raises(ConfigError, match=r"kd\.unanswered \(.*\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "d", kd=KDConfig(adv_start=1, unanswered=[silent])))
    for out in "xygd":
        assert not (tmp_path / out / "last.pt").exists()


def test_union_scope_dataset_keeps_the_union_ce_within_the_answering_apis_dataset(zoo, tmp_path):
    """kd.union_scope: each column's span is its dataset's columns; with one dataset the run is
    the "all" run weight for weight; an unknown scope is refused."""
    keys = [("emoji", 3), ("emoji", 9), ("kanji", 1), ("kanji", 4), ("kanji", 7), ("zz", 0)]
    assert dataset_spans(keys) == [(0, 2), (0, 2), (2, 5), (2, 5), (2, 5), (5, 6)]
    every, _ = train(_leaves(zoo, tmp_path / "a", 1.0, union_ce=1.0))
    scoped, _ = train(_leaves(zoo, tmp_path / "d", 1.0, union_ce=1.0, union_scope="dataset"))
    a, d = (load_checkpoint(r.run.last_checkpoint)["model"] for r in (every, scoped))
    for k, v in a.items():
        torch.testing.assert_close(d[k], v, rtol=0, atol=0)
    # the slice the loss reads: a 2-dataset union of 6 columns, an API of the second dataset
    full = torch.randn(4, 6, requires_grad=True)
    lo, hi = dataset_spans(keys)[2]
    cols = torch.tensor([2, 3, 4])
    union_ce(full[:, lo:hi], torch.randn(4, 3), cols - lo).backward()
    assert full.grad is not None and bool((full.grad[:, [0, 1, 5]] == 0).all())
    assert bool((full.grad[:, 2:5] != 0).any())
    with pytest.raises(ConfigError, match=r"kd\.union_scope must be one of all, dataset"):
        train(_leaves(zoo, tmp_path / "x", 1.0, union_ce=1.0, union_scope="api"))
    assert not (tmp_path / "x" / "last.pt").exists()


def test_bbkd_grey_kd_costs_no_queries_changes_training_and_is_refused_elsewhere(zoo, tmp_path):
    """kd.grey: the same queries, other weights; bidf-mkd and values outside [0, 1] refused."""
    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0, union_ce=1.0))
    grey, _ = train(_leaves(zoo, tmp_path / "g", 1.0, union_ce=1.0, grey=0.5))
    assert grey.ledger.used == plain.ledger.used == 2 * 7
    w = "net.features.0.weight"
    a, b = (load_checkpoint(r.run.last_checkpoint)["model"][w] for r in (plain, grey))
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"kd\.grey must be in \[0, 1\]"):
        train(_leaves(zoo, tmp_path / "x", 1.0, grey=1.5))
    with pytest.raises(ConfigError, match=r"kd\.grey \(0\.5\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "y", kd=KDConfig(adv_start=1, grey=0.5)))


def test_cosine_head_bounds_the_union_logits_learns_its_scale_and_resumes_exactly(zoo, tmp_path):
    """kd.cosine_head: the union head is a bias-free cosine classifier whose logits never
    exceed its (learned) scale; the same queries, other weights; exact resume; refused by
    bidf-mkd and below 0."""
    head = CosineHead(6, 4, 10.0)
    feats = torch.randn(5, 6) * 100.0  # the features' norm does not reach the logits
    logits = head(feats)
    assert logits.abs().max() <= 10.0 + 1e-4
    torch.testing.assert_close(head(feats * 0.01), logits)
    linear, _ = train(_leaves(zoo, tmp_path / "a", 1.0, union_ce=1.0))
    cosine, _ = train(_leaves(zoo, tmp_path / "c", 1.0, union_ce=1.0, cosine_head=10.0))
    assert isinstance(cosine.union_head, CosineHead)
    assert cosine.ledger.used == linear.ledger.used == 2 * 7
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (linear, cosine))
    assert set(a["extra"]["union_head"]) == {"weight", "bias"}
    assert set(b["extra"]["union_head"]) == {"weight", "log_scale"}
    assert float(b["extra"]["union_head"]["log_scale"]) != pytest.approx(math.log(10.0), abs=0)
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])
    train(_leaves(zoo, tmp_path / "part", 1.0, episodes=2, union_ce=1.0, cosine_head=10.0))
    resumed, _ = train(
        _leaves(zoo, tmp_path / "part", 1.0, union_ce=1.0, cosine_head=10.0), resume=True
    )
    c = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in b["model"].items():
        torch.testing.assert_close(v, c["model"][k], rtol=0, atol=0)
    for k, v in b["extra"]["union_head"].items():
        torch.testing.assert_close(v, c["extra"]["union_head"][k], rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"kd\.cosine_head .* >= 0"):
        train(_leaves(zoo, tmp_path / "x", 1.0, cosine_head=-1.0))
    with pytest.raises(ConfigError, match=r"kd\.cosine_head \(10\.0\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "y", kd=KDConfig(adv_start=1, cosine_head=10.0)))


def test_manifold_mixup_costs_no_queries_changes_training_and_resumes_exactly(zoo, tmp_path):
    """kd.manifold_mixup: the same candidates and answers, other weights; exact resume; refused
    by bidf-mkd and below 0."""
    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0))
    mixed, _ = train(_leaves(zoo, tmp_path / "m", 1.0, manifold_mixup=2.0))
    assert mixed.ledger.used == plain.ledger.used == 2 * 7
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (plain, mixed))
    for k in ("pool_x", "pool_t"):
        for u, v in zip(a["extra"][k], b["extra"][k], strict=True):
            assert torch.equal(u, v)
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])
    _resumes_exactly(zoo, tmp_path, b["model"], manifold_mixup=2.0)
    with pytest.raises(ConfigError, match=r"kd\.manifold_mixup .* >= 0"):
        train(_leaves(zoo, tmp_path / "x", 1.0, manifold_mixup=-1.0))
    with pytest.raises(ConfigError, match=r"kd\.manifold_mixup \(2\.0\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "y", kd=KDConfig(adv_start=1, manifold_mixup=2.0)))


def test_forget_redraws_the_top_stages_clears_their_adam_state_and_resumes_exactly(zoo, tmp_path):
    """kd.forget_every: at every multiple of it (not update 0) the top kd.forget_stages stages
    are re-drawn in place, seeded by the step, with their Adam state cleared; the same queries;
    exact resume across a re-draw; bad values refused, and by bidf-mkd."""
    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0))
    forget, _ = train(_leaves(zoo, tmp_path / "f", 1.0, forget_every=1.0))  # at update 1
    assert forget.ledger.used == plain.ledger.used == 2 * 7
    assert forget.forget_every == 1
    a, b = (load_checkpoint(r.run.last_checkpoint)["model"] for r in (plain, forget))
    assert not torch.equal(a["net.features.12.weight"], b["net.features.12.weight"])
    # the mechanics on the trained learner: top two stages -> the seeded draw, state cleared
    model = forget.model
    want = redraw_top_stages(model, 2, derive_seed(forget.cfg.seed, "bbkd", "forget", 9))
    stages = feature_stages(model)
    top = {id(p) for s in stages[2:] for p in s.parameters()}
    low = [p for s in stages[:2] for p in s.parameters()]
    kept = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in top}
    assert all(p in forget.optimizer.state for p in low)
    forget._forget(9)
    for (n, p), q in zip(model.named_parameters(), want.parameters(), strict=True):
        if id(p) in top:
            assert torch.equal(p, q), n
            assert p not in forget.optimizer.state
        else:
            assert torch.equal(p, kept[n]), n
    assert all(p in forget.optimizer.state for p in low)
    # interrupted before the re-draw and resumed: the same weights
    _resumes_exactly(zoo, tmp_path, b, forget_every=1.0)
    with pytest.raises(ConfigError, match=r"kd\.forget_every must be >= 0"):
        train(_leaves(zoo, tmp_path / "x", 1.0, forget_every=-1.0))
    with pytest.raises(ConfigError, match=r"kd\.forget_stages must be in 0\.\.4"):
        train(_leaves(zoo, tmp_path / "z", 1.0, forget_every=1.0, forget_stages=5))
    with pytest.raises(ConfigError, match=r"kd\.forget_every \(1\.0\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "y", kd=KDConfig(adv_start=1, forget_every=1.0)))


def test_freeze_keeps_the_top_stages_at_meta_tests_draw_out_of_the_optimizer(zoo, tmp_path):
    """kd.freeze_stages: the top stages are drawn once (freeze_draw eval: what eval.reinit
    re-draws at meta-test; run: from the run's seed) and never change, while they still require
    grad (meta-test fine-tunes them) and stay out of the optimizer; the lower stages train; the
    same queries; exact resume; bad values refused, and by bidf-mkd."""
    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0))
    frozen, _ = train(_leaves(zoo, tmp_path / "f", 1.0, freeze_stages=2))
    run_draw, _ = train(_leaves(zoo, tmp_path / "r", 1.0, freeze_stages=2, freeze_draw="run"))
    assert frozen.ledger.used == plain.ledger.used == 2 * 7
    a, b, r = (load_checkpoint(x.run.last_checkpoint)["model"] for x in (plain, frozen, run_draw))
    model = frozen.model
    stages = feature_stages(model)
    top = {id(p) for s in stages[2:] for p in s.parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in top}
    assert names and all(p.requires_grad for p in model.parameters())
    in_opt = {id(p) for g in frozen.optimizer.param_groups for p in g["params"]}
    assert not top & in_opt and all(id(p) in in_opt for s in stages[:2] for p in s.parameters())
    # eval.reinit=2 re-draws exactly the frozen stages: reinit 0 and 2 are the same model
    redrawn = dict(reinit_stages(model, 2).named_parameters())
    want_run = dict(
        redraw_top_stages(model, 2, derive_seed(run_draw.cfg.seed, "bbkd", "freeze"))
        .named_parameters()
    )  # fmt: skip
    for n in names:
        assert torch.equal(b[n], redrawn[n]), n
        assert torch.equal(r[n], want_run[n]), n
        if b[n].dim() > 1:  # (batch-norm's fresh affine is 1 and 0 in every draw)
            assert not torch.equal(b[n], r[n]), n
            assert not torch.equal(a[n], b[n]), n  # the plain run trains them
    w = "net.features.0.weight"  # the lower stages train, under other top stages
    assert not torch.equal(a[w], b[w]) and not torch.equal(b[w], r[w])
    assert derive_seed(run_draw.cfg.seed, "bbkd", "freeze") != REINIT_SEED
    # interrupted and resumed: the same weights
    _resumes_exactly(zoo, tmp_path, b, freeze_stages=2)
    with pytest.raises(ConfigError, match=r"kd\.freeze_stages must be >= 0"):
        train(_leaves(zoo, tmp_path / "x", 1.0, freeze_stages=-1))
    with pytest.raises(ConfigError, match=r"kd\.freeze_stages must be in 0\.\.4"):
        train(_leaves(zoo, tmp_path / "z", 1.0, freeze_stages=5))
    with pytest.raises(ConfigError, match=r"kd\.freeze_draw must be one of eval, run"):
        train(_leaves(zoo, tmp_path / "d", 1.0, freeze_stages=2, freeze_draw="test"))
    with pytest.raises(ConfigError, match=r"turn one off"):
        train(_leaves(zoo, tmp_path / "o", 1.0, freeze_stages=2, forget_every=1.0))
    with pytest.raises(ConfigError, match=r"kd\.freeze_stages \(2\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "y", kd=KDConfig(adv_start=1, freeze_stages=2)))


def test_outer_wd_is_adamws_decoupled_decay_and_changes_training(zoo, tmp_path):
    """outer_wd > 0: AdamW with that decay (every weight with a gradient shrinks by lr x wd
    before Adam's step; the zero head, never given a gradient, stays 0); 0: Adam, the paper."""
    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0))
    decayed, _ = train(dataclasses.replace(_leaves(zoo, tmp_path / "w", 1.0), outer_wd=0.05))
    assert type(plain.optimizer) is torch.optim.Adam
    assert isinstance(decayed.optimizer, torch.optim.AdamW)
    assert all(g["weight_decay"] == 0.05 for g in decayed.optimizer.param_groups)
    assert decayed.ledger.used == plain.ledger.used
    a, b = (load_checkpoint(r.run.last_checkpoint)["model"] for r in (plain, decayed))
    w = "net.features.0.weight"
    assert not torch.equal(a[w], b[w])
    assert not b["net.classifier.weight"].any()
    # one step by hand: decay first, then Adam's update, on a fresh parameter
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))
    with pytest.raises(ConfigError, match=r"outer_wd must be >= 0"):
        train(dataclasses.replace(_leaves(zoo, tmp_path / "x", 1.0), outer_wd=-1.0))


def test_born_again_distils_a_fresh_student_from_the_last_generation(zoo, tmp_path):
    """kd.born_again=1 on 4 updates: generation 1 (2 updates) is exactly the run without it and
    becomes the teacher; generation 2 starts from a fresh seeded draw (zero head) with Adam's
    state cleared and learns from the teacher's union logits too; the same queries; Ctrl-C in
    generation 2 resumes exactly (the teacher is checkpointed); bad values refused."""

    def cfg(name: str, episodes: int = 8, **kd) -> RunConfig:  # two events: budget for two
        return dataclasses.replace(
            _leaves(zoo, tmp_path / name, 1.0, episodes=episodes, **kd), query_budget=2 * 7
        )

    half, _ = train(cfg("h", episodes=4))
    again, _ = train(cfg("a", born_again=1))
    mute, _ = train(cfg("m", born_again=1, born_again_weight=0.0))
    assert again.generation == 2 and again.ledger.used == half.ledger.used == 2 * 7
    h, a, m = (load_checkpoint(r.run.last_checkpoint) for r in (half, again, mute))
    assert a["extra"]["teacher"] is not None and h["extra"]["teacher"] is None
    for k, v in h["model"].items():  # the teacher is generation 1: the 2-update run
        assert torch.equal(a["extra"]["teacher"]["model"][k], v), k
    for k, v in h["extra"]["union_head"].items():
        assert torch.equal(a["extra"]["teacher"]["union_head"][k], v), k
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], m["model"][w])  # the teacher's logits train
    assert not a["model"]["net.classifier.weight"].any()
    # the mechanics on the trained learner: the old model becomes the teacher, the new one the
    # generation's seeded draw (zero head), the union head re-drawn, Adam's state cleared
    model = again.model
    old = {k: v.clone() for k, v in model.state_dict().items()}
    old_head = {k: v.clone() for k, v in again.union_head.state_dict().items()}
    assert again.optimizer.state
    again._next_generation(2)
    fresh = build_from_spec(again.spec, seed=derive_seed(again.cfg.seed, "bbkd", "born-again", 2))
    for k, v in fresh.state_dict().items():
        want = torch.zeros_like(v) if k.startswith("net.classifier") else v
        assert torch.equal(model.state_dict()[k], want), k
        assert torch.equal(again.teacher[0].state_dict()[k], old[k]), k
    for k, v in again.union_head.state_dict().items():
        assert torch.equal(again.teacher[1].state_dict()[k], old_head[k]), k
        assert not torch.equal(v, old_head[k]), k
    assert not again.optimizer.state and not again.teacher[0].training
    assert not any(p.requires_grad for p in again.teacher[0].parameters())
    # Ctrl-C after update 3 (in generation 2), resumed: the uninterrupted run's weights
    cut = cfg("cut", born_again=1)
    with ctrl_c_after_steps(3), pytest.raises(TrainingInterrupted):
        train(cut)
    (last,) = (tmp_path / "cut").rglob("last.pt")
    assert load_checkpoint(last)["step"] == 3
    resumed, _ = train(cut, resume=True)
    r = load_checkpoint(resumed.run.last_checkpoint)
    for k, v in a["model"].items():
        assert torch.equal(r["model"][k], v), k
    for bad, match in (
        ({"born_again": -1}, r"kd\.born_again must be >= 0"),
        ({"born_again": 1, "born_again_weight": -1.0}, r"kd\.born_again_weight must be >= 0"),
        ({"born_again": 1, "born_again_T": 0.0}, r"kd\.born_again_T must be > 0"),
        ({"born_again": 2}, r"into 3 generations: raise --episodes"),
        ({"born_again": 1, "freeze_stages": 2}, r"turn one off"),
    ):
        with pytest.raises(ConfigError, match=match):
            train(_leaves(zoo, tmp_path / "x", 1.0, **bad))
    with pytest.raises(ConfigError, match=r"set ema=0"):
        train(dataclasses.replace(_leaves(zoo, tmp_path / "e", 1.0, born_again=1), ema=0.9))
    with pytest.raises(ConfigError, match=r"kd\.born_again \(1\) is for bbkd"):
        train(tiny_cfg(zoo, tmp_path / "y", kd=KDConfig(adv_start=1, born_again=1)))


def test_contrastive_low_trains_the_low_stages_through_their_own_projection(zoo, tmp_path):
    """kd.contrastive_low: a second NT-Xent on the same views at feature stage
    kd.contrastive_low_stage (pooled over space, its own projection, in the optimizer); its
    gradient reaches only that stage and those below; no queries; exact resume; refusals."""
    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0))
    low, _ = train(_leaves(zoo, tmp_path / "l", 1.0, contrastive_low=1.0))
    assert low.ledger.used == plain.ledger.used == 2 * 7
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (plain, low))
    assert a["extra"]["low_projection"] is None
    stages = feature_stages(low.model)
    assert low.low_stage is stages[1][-1]  # Conv4's block 2 ends with its pooling
    width = next(m for m in stages[1].modules() if isinstance(m, torch.nn.Conv2d)).out_channels
    assert b["extra"]["low_projection"]["0.weight"].shape == (256, width)
    in_opt = {id(p) for g in low.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in low.low_projection.parameters())
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])
    # the low term alone (the same views: the same generator state) moves stages 1-2 only
    x = low.pool_x[0][:16]
    with_low = low._contrastive(x, torch.Generator().manual_seed(3))
    head, low.low_projection = low.low_projection, None
    top_only = low._contrastive(x, torch.Generator().manual_seed(3))
    low.low_projection = head
    low.model.zero_grad()
    (with_low - top_only).backward()
    grads = [max(float(p.grad.abs().max()) for p in s.parameters()) for s in stages]
    assert min(grads[:2]) > 1e-4 and max(grads[2:]) < 1e-6, grads
    _resumes_exactly(zoo, tmp_path, b["model"], contrastive_low=1.0)
    for bad, match in (
        ({"contrastive_low": -1.0}, r"kd\.contrastive_low must be >= 0"),
        (
            {"contrastive_low": 1.0, "contrastive_low_stage": 5},
            r"contrastive_low_stage must be in 1\.\.4",
        ),
    ):
        with pytest.raises(ConfigError, match=match):
            train(_leaves(zoo, tmp_path / "x", 1.0, **bad))
    with pytest.raises(ConfigError, match=r"set kd\.contrastive > 0 too"):
        train(_leaves(zoo, tmp_path / "z", 0.0, contrastive_low=1.0))


def test_contrastive_loss_vicreg_replaces_nt_xent_on_the_same_views(zoo, tmp_path, monkeypatch):
    """kd.contrastive_loss: vicreg: the views' projections go to losses.vicreg instead of
    NT-Xent (no queries, the same candidates); it needs kd.contrastive; bad names refused."""
    import apimeta.methods.bbkd as bbkd
    from apimeta.losses import vicreg

    plain, _ = train(_leaves(zoo, tmp_path / "a", 1.0))
    vic, _ = train(_leaves(zoo, tmp_path / "v", 1.0, contrastive_loss="vicreg"))
    assert vic.ledger.used == plain.ledger.used == 2 * 7
    a, b = (load_checkpoint(r.run.last_checkpoint) for r in (plain, vic))
    assert torch.equal(a["extra"]["pool_x"][0], b["extra"]["pool_x"][0])
    w = "net.features.0.weight"
    assert not torch.equal(a["model"][w], b["model"][w])
    calls: dict[str, list] = {"vicreg": [], "nt_xent": []}
    for name in calls:
        real = getattr(bbkd, name)
        monkeypatch.setattr(
            bbkd, name, lambda *args, _r=real, _n=name: calls[_n].append(args) or _r(*args)
        )
    x = vic.pool_x[0][:6]
    got = vic._contrastive(x, torch.Generator().manual_seed(1))
    ((z1, z2),) = calls["vicreg"]
    assert not calls["nt_xent"] and z1.shape == z2.shape == (6, 128)
    torch.testing.assert_close(got, vicreg(z1, z2))  # kd.contrastive 1 x VICReg's loss
    plain._contrastive(x, torch.Generator().manual_seed(1))
    assert len(calls["nt_xent"]) == 1 and len(calls["vicreg"]) == 1
    with pytest.raises(ConfigError, match=r"kd\.contrastive_loss 'vicreg' .* set kd\.contrastive"):
        train(_leaves(zoo, tmp_path / "x", 0.0, contrastive_loss="vicreg"))
    with pytest.raises(ConfigError, match=r"kd\.contrastive_loss must be one of nt-xent, vicreg"):
        train(_leaves(zoo, tmp_path / "y", 1.0, contrastive_loss="byol"))


def test_outer_lr_stages_scales_each_named_stages_outer_lr(zoo, tmp_path):
    """outer_lr_stages: one Adam group per named feature stage at outer_lr x its multiplier (the
    rest of the model and the method's heads at outer_lr); all 1 is the plain run bit for bit; a
    0 leaves that stage at its initial draw; exact resume; more multipliers than stages refused."""
    from apimeta.models.meta import load_run_datasets, meta_model_for_datasets

    def cfg(name: str, scales: list[float], episodes: int = 4) -> RunConfig:
        c = _leaves(zoo, tmp_path / name, 1.0, episodes=episodes)
        return dataclasses.replace(c, outer_lr_stages=scales)

    plain, _ = train(cfg("a", []))
    ones, _ = train(cfg("o", [1.0, 1.0]))
    scaled, _ = train(cfg("s", [0.0, 2.0]))
    lr = scaled.cfg.outer_lr
    assert [g["lr"] for g in scaled.optimizer.param_groups] == [0.0, 2 * lr, lr, lr]
    assert scaled.ledger.used == plain.ledger.used
    a, o, s = (load_checkpoint(r.run.last_checkpoint)["model"] for r in (plain, ones, scaled))
    for k, v in a.items():
        assert torch.equal(o[k], v), k
    init, _ = meta_model_for_datasets(scaled.cfg, load_run_datasets(scaled.cfg))
    drawn, kept = (feature_stages(m)[0] for m in (init, scaled.model))
    for p0, p1 in zip(drawn.parameters(), kept.parameters(), strict=True):
        assert torch.equal(p0, p1)  # multiplier 0: the initial draw
    trained = [n for n in s if n.startswith("net.features.4.") and n.endswith("weight")]
    assert trained and all(not torch.equal(s[n], a[n]) for n in trained)  # 2x lr: not plain's
    partial = cfg("r", [0.5, 2.0], episodes=2)
    train(partial)
    resumed, _ = train(dataclasses.replace(partial, episodes=4), resume=True)
    whole, _ = train(cfg("w", [0.5, 2.0]))
    r, w = (load_checkpoint(x.run.last_checkpoint)["model"] for x in (resumed, whole))
    for k, v in w.items():
        assert torch.equal(r[k], v), k
    with pytest.raises(ConfigError, match=r"outer_lr_stages names 5 stages"):
        train(cfg("x", [1.0] * 5))
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").rglob("last.pt"))
