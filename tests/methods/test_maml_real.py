"""maml-real mechanics: exact resume, checkpoints, run directory, meta-model builder."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import pytest
import torch

from apimeta.checkpoint import load_checkpoint, save_checkpoint
from apimeta.errors import CheckpointError, ConfigError, TrainingInterrupted
from apimeta.evaluate import evaluate_with_config
from apimeta.methods import METHODS
from apimeta.methods.trainer import held_interrupts
from apimeta.models.meta import (
    build_meta_model,
    load_meta_model,
    load_run_datasets,
    meta_model_spec,
)
from apimeta.run_config import EvalConfig, RunConfig
from apimeta.runs import RunDir
from apimeta.testing import ctrl_c_after_steps, make_config

TINY = dict(
    method="maml-real",
    dataset="synthetic",
    width=8,
    query=3,
    meta_batch=2,
    inner_steps=2,
    eval=EvalConfig(every=4, tasks=2, test_tasks=2, test_steps=2),  # every 2 meta-updates
    checkpoint_every=1,
)


def _cfg(tmp_path, name, **kw) -> RunConfig:
    return make_config(TINY, out=str(tmp_path / name), **kw)


def _train(cfg: RunConfig, resume: bool = False):
    run = RunDir.create(cfg, resume=resume)
    return METHODS.get(cfg.method)().train(cfg, run, resume=resume), run


def test_resume_is_exact(tmp_path):
    full, run_full = _train(_cfg(tmp_path, "full", episodes=8))  # 4 meta-updates
    half = _cfg(tmp_path, "half", episodes=4)  # 2 meta-updates, then resume to 4
    _train(half)
    resumed, run_half = _train(dataclasses.replace(half, episodes=8), resume=True)
    a = load_checkpoint(full.final_checkpoint)
    b = load_checkpoint(resumed.final_checkpoint)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["rng"]["tasks:synthetic"], b["rng"]["tasks:synthetic"])
    loss = lambda run: [r["loss"] for r in run.read_metrics() if r["phase"] == "train"]  # noqa: E731
    assert loss(run_full) == loss(run_half) and len(loss(run_full)) == 4
    # and training did change the init
    init = build_meta_model(_cfg(tmp_path, "x"), 3, 32, (0.5,) * 3, (0.25,) * 3).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in a["model"].items())


def test_run_outputs_and_checkpoint_roundtrip(tmp_path):
    res, run = _train(_cfg(tmp_path, "r", episodes=4))
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "test.json"):
        assert (run.path / name).is_file(), name
    phases = [r["phase"] for r in run.read_metrics()]
    assert phases.count("train") == 2 and phases.count("val") == 1 and phases[-1] == "test"
    assert run.load_config() == _cfg(tmp_path, "r", episodes=4)
    model, cfg, ckpt = load_meta_model(res.best_checkpoint)
    assert cfg.method == "maml-real" and ckpt["best_step"] == 2
    assert set(res.metrics["test"]) == {"best", "final"}
    assert res.metrics["test"]["best"]["synthetic"]["1-shot"]["n"] == 2
    x = torch.rand(4, 3, 32, 32)
    ref = build_meta_model(cfg, 3, 32, (0.5,) * 3, (0.25,) * 3)
    ref.load_state_dict(ckpt["model"])
    torch.testing.assert_close(model(x), ref(x))


def test_first_order_differs_from_second_order(tmp_path):
    so, _ = _train(_cfg(tmp_path, "so", episodes=2))
    fo, _ = _train(_cfg(tmp_path, "fo", episodes=2, first_order=True))
    a, b = load_checkpoint(so.final_checkpoint), load_checkpoint(fo.final_checkpoint)
    assert any(not torch.allclose(a["model"][k], b["model"][k]) for k in a["model"])


def test_random_method_and_test_selection_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        res, _ = _train(_cfg(tmp_path, "rnd", method="random", select_split="test"))
    assert "optimistic" in caplog.text
    assert res.metrics["steps"] == 0 and res.best_checkpoint is not None
    ckpt = load_checkpoint(res.final_checkpoint)
    init = build_meta_model(_cfg(tmp_path, "y"), 3, 32, (0.5,) * 3, (0.25,) * 3).state_dict()
    for k, v in init.items():
        assert torch.equal(ckpt["model"][k], v)


def test_build_meta_model_is_seeded_and_leaves_global_rng_alone(tmp_path):
    cfg = _cfg(tmp_path, "s")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_meta_model(cfg, 3, 32)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_meta_model(cfg, 3, 32)
    c = build_meta_model(dataclasses.replace(cfg, seed=1), 3, 32)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    bn = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(not m.track_running_stats for m in bn)  # transductive BN
    assert meta_model_spec(dataclasses.replace(cfg, dataset="a,b"), 3, 32)["adaptive_pool"]


def test_run_dir_and_checkpoint_errors(tmp_path):
    cfg = _cfg(tmp_path, "e", episodes=2)
    with pytest.raises(CheckpointError, match="cannot resume"):
        RunDir.create(cfg, resume=True)
    _train(cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        RunDir.create(cfg)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    # non-plain objects are refused by weights_only loading
    torch.save({"format": 1, "obj": RunDir(tmp_path / "o")}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "obj.pt")
    save_checkpoint(tmp_path / "ok.pt", {"x": torch.ones(2), "n": 3, "d": {"a": [1, 2.0]}})
    assert load_checkpoint(tmp_path / "ok.pt")["d"] == {"a": [1, 2.0]}
    with pytest.raises(ConfigError, match="meta_batch"):
        _train(_cfg(tmp_path, "mb", meta_batch=0))


def test_ema_averages_the_weights_selects_the_average_and_resumes_exactly(tmp_path):
    """ema=0.5: after each meta-update w_ema = 0.5 w_ema + 0.5 w; training itself is unchanged;
    best.pt (meta-val's choice) holds the average; last.pt holds both and resumes exactly."""
    plain, _ = _train(_cfg(tmp_path, "plain", episodes=4))  # 2 meta-updates, no average
    assert "ema" not in load_checkpoint(plain.final_checkpoint)
    half = _cfg(tmp_path, "ema", episodes=2, ema=0.5)  # 1 meta-update
    _train(half)
    e1 = load_checkpoint(tmp_path / "ema" / "last.pt")["ema"]
    _, run = _train(dataclasses.replace(half, episodes=4), resume=True)
    last = load_checkpoint(run.last_checkpoint)
    raw, e2 = last["model"], last["ema"]
    for k, v in load_checkpoint(plain.final_checkpoint)["model"].items():
        assert torch.equal(v, raw[k]), k  # the average does not change what is trained
    params = [k for k, _ in load_meta_model(run.last_checkpoint)[0].named_parameters()]
    assert params
    for k in params:
        torch.testing.assert_close(e2[k], 0.5 * e1[k] + 0.5 * raw[k], rtol=1e-6, atol=1e-7)
        assert not torch.equal(e2[k], raw[k]), k
    best = load_checkpoint(run.best_checkpoint)  # validated at updates 1 and 2: either one
    for k, v in {1: e1, 2: e2}[best["step"]].items():
        assert torch.equal(best["model"][k], v), k
    # meta-val scored the average as `apimeta eval` scores best.pt (fine-tuned, not frozen)
    cfg = dataclasses.replace(half, episodes=4)
    model = load_meta_model(run.best_checkpoint)[0]
    res = evaluate_with_config(
        model, load_run_datasets(cfg)[0], cfg, split="val", shots=(cfg.shot,), tasks=cfg.eval.tasks
    )
    assert res[f"{cfg.shot}-shot"]["mean"] == pytest.approx(best["best_score"])


def test_ema_must_lie_in_zero_one_and_needs_its_state_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="ema must be in"):
        _train(_cfg(tmp_path, "bad", episodes=2, ema=1.0))
    _train(_cfg(tmp_path, "r", episodes=2))
    with pytest.raises(CheckpointError, match="no weight average"):
        _train(_cfg(tmp_path, "r", episodes=4, ema=0.9), resume=True)


def test_cosine_outer_lr_decays_over_the_run(tmp_path):
    from apimeta.methods.trainer import OUTER_LR_SCHEDULES

    cos = OUTER_LR_SCHEDULES["cosine"]
    assert cos(0, 4) == 1.0 and cos(2, 4) == pytest.approx(0.5) and cos(4, 4) == pytest.approx(0)
    full, run_full = _train(_cfg(tmp_path, "full", episodes=8, outer_lr_schedule="cosine"))
    lrs = [r["outer_lr"] for r in run_full.read_metrics() if r.get("phase") == "train"]
    base = make_config(TINY).outer_lr
    assert lrs == pytest.approx([base * cos(s, 4) for s in range(4)]) and lrs[0] == base
    plain, _ = _train(_cfg(tmp_path, "plain", episodes=8))
    a, b = load_checkpoint(full.final_checkpoint), load_checkpoint(plain.final_checkpoint)
    assert any(not torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    with pytest.raises(ConfigError, match="outer_lr_schedule"):
        _train(_cfg(tmp_path, "bad", episodes=2, outer_lr_schedule="step"))


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal: a test run started
    with SIGINT ignored (``nohup``, a background job of a script) would otherwise ignore it."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_held_interrupts_delivers_a_signal_after_the_block(ctrl_c):
    reached, calls = [], []
    with pytest.raises(KeyboardInterrupt), held_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # a Python handler would run here, between bytecodes
        reached.append(True)
    assert reached == [True]
    old = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
    try:
        with held_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert calls == []
        assert calls == [signal.SIGTERM]  # the handler it had, once, after the block
    finally:
        signal.signal(signal.SIGTERM, old)


def test_an_interrupt_during_the_optimizer_step_checkpoints_that_step(tmp_path):
    """Ctrl-C landing inside ``optimizer.step()`` of meta-update 2: the step completes and is
    counted, ``last.pt`` holds step 2 with its 2 records, and resuming gives the uninterrupted
    run's weights (were the interrupt raised inside the step, the checkpoint would say step 1
    with step 2's weights, and the resumed run would have one update too many)."""
    full, _ = _train(_cfg(tmp_path, "full", episodes=8))
    cut = _cfg(tmp_path, "cut", episodes=8)
    with ctrl_c_after_steps(2), pytest.raises(TrainingInterrupted) as err:
        _train(cut)
    assert err.value.step == 2
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    run = RunDir(tmp_path / "cut")
    assert ckpt["step"] == 2
    assert len([r for r in run.read_metrics() if r["phase"] == "train"]) == 2
    resumed, _ = _train(cut, resume=True)
    a, b = load_checkpoint(full.final_checkpoint), load_checkpoint(resumed.final_checkpoint)
    assert a["step"] == b["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
