"""``apimeta train`` / ``apimeta eval`` through typer's CliRunner on tiny synthetic data."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from apimeta.cli import app
from apimeta.errors import ConfigError
from apimeta.run_config import ABLATIONS, available_presets, resolve_config

runner = CliRunner()
TINY = [
    "--dataset", "synthetic", "--set", "width=8", "--set", "query=3", "--set", "meta_batch=2",
    "--set", "inner_steps=1", "--set", "eval.tasks=2", "--set", "eval.test_tasks=2",
    "--set", "eval.test_steps=1", "--set", "eval.every=2", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = runner.invoke(
        app, ["train", "--method", "maml-real", "--episodes", "4", "--out", str(out), *TINY]
    )
    assert res.exit_code == 0, res.output
    return out, res.output


def test_train_writes_run_directory(trained):
    out, output = trained
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "test.json"):
        assert (out / name).is_file(), name
    assert "maml-real" in output and "synthetic" in output and "best" in output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "train"] == [1, 2]
    assert "episodes: 4" in (out / "config.yaml").read_text()


def test_train_resume_extends_the_run(trained, tmp_path):
    out, _ = trained
    res = runner.invoke(
        app, ["train", "--out", str(out), "--resume", "--episodes", "6", "--threads", "1"]
    )
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "train"] == [1, 2, 3]
    assert "episodes: 6" in (out / "config.yaml").read_text()


def test_eval_checkpoint_and_random(trained, tmp_path):
    out, _ = trained
    js = tmp_path / "e.json"
    common = ["--tasks", "2", "--query", "3", "--steps", "1", "--threads", "1"]
    res = runner.invoke(
        app, ["eval", "--init", str(out / "best.pt"), "--shots", "1,2", "--json", str(js), *common]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(js.read_text())
    assert set(data["results"]["synthetic"]) == {"1-shot", "2-shot"}
    assert data["protocol"]["transductive"] is True
    one = data["results"]["synthetic"]["1-shot"]  # per-task accuracies, for paired comparisons
    assert len(one["accs"]) == 2 and sum(one["accs"]) / 2 == pytest.approx(one["mean"])
    res = runner.invoke(
        app,
        ["eval", "--init", "random", "--dataset", "synthetic", "--width", "8",
         "--non-transductive", "--shots", "1", "--json", str(js), *common],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "1-shot" in res.output
    assert json.loads(js.read_text())["protocol"]["transductive"] is False
    # --reinit: the top stages re-drawn; recorded in the protocol; out of range is one line
    args = ["eval", "--init", str(out / "best.pt"), "--shots", "1", "--json", str(js), *common]
    res = runner.invoke(app, [*args, "--reinit", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(js.read_text())["protocol"]["reinit"] == 2
    res = runner.invoke(app, [*args, "--reinit", "9"])
    assert res.exit_code == 2 and "eval.reinit must be in 0..4" in res.output


def test_eval_tune_chooses_per_shot_on_meta_val(trained, tmp_path):
    """``--tune``: each shot's protocol is chosen on meta-val from the grid, the winner alone is
    meta-tested, and the table and JSON name it."""
    out, _ = trained
    js = tmp_path / "t.json"
    res = runner.invoke(
        app,
        ["eval", "--init", str(out / "best.pt"), "--shots", "1,2", "--tasks", "2", "--query",
         "3", "--steps", "1", "--threads", "1", "--tune", "head=learned,random", "--tune",
         "lr=0.01,0.1", "--val-tasks", "2", "--json", str(js)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "chosen on" in res.output and "head=" in res.output  # the table names the choice
    data = json.loads(js.read_text())
    assert data["protocol"]["tune"] == {"head": ["learned", "random"], "lr": [0.01, 0.1]}
    for r in data["results"]["synthetic"].values():
        assert set(r["setting"]) == {"head", "lr"} and len(r["val"]) == 4
        best = max(r["val"].values())
        assert r["val"][f"head={r['setting']['head']} lr={r['setting']['lr']}"] == best
        assert len(r["accs"]) == 2


def test_train_with_eval_tune_meta_tests_the_chosen_protocol(tmp_path):
    """``eval.tune`` in a run's config: its final meta-test names the setting chosen per shot
    (in-training meta-val keeps the plain protocol); a bad grid is one line before training."""
    out = tmp_path / "run"
    args = ["train", "--method", "maml-real", "--episodes", "2", "--out", str(out), *TINY]
    res = runner.invoke(app, [*args, "--set", "eval.tune.head=[learned,random]"])
    assert res.exit_code == 0, res.output
    assert "chosen on" in res.output and "head=" in res.output  # the result table names it
    test = json.loads((out / "test.json").read_text())["test"]["best"]["synthetic"]
    assert {r["setting"]["head"] for r in test.values()} <= {"learned", "random"}
    assert all(set(r["val"]) == {"head=learned", "head=random"} for r in test.values())
    res = runner.invoke(app, [*args[:-2], "--out", str(tmp_path / "bad"),
                              "--set", "eval.tune.momentum=[0.9]"])  # fmt: skip
    assert res.exit_code == 2 and "eval.tune: unknown key 'momentum'" in res.output
    res = runner.invoke(app, [*args[:-2], "--out", str(tmp_path / "bad2"),
                              "--set", "eval.tune.reinit=[0,9]"])  # fmt: skip
    assert res.exit_code == 2 and "eval.reinit must be in 0..4" in res.output
    assert not (tmp_path / "bad2" / "last.pt").exists()  # refused before training
    assert not (tmp_path / "bad" / "last.pt").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--method", "nope"], "unknown method"),
        (["train", "--method", "bidf-mkd:nope"], "unknown method variant 'bidf-mkd:nope'"),
        (["train", "--preset", "cpu", "--no-boundary"], "add --method bidf-mkd"),
        (["train", "--preset", "nope"], "no preset named"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--method", "maml-real", "--set", "bogus=1"], "unknown config key"),
        (["eval", "--init", "missing.pt"], "neither"),
        (["eval", "--init", "random", "--shots", "a,b"], "--shots"),
        (["eval", "--init", "random", "--dataset", "synthetic", "--split", "dev"], "--split"),
        (["eval", "--init", "random", "--tune", "head=learned", "--split", "val"], "drop --split"),
        (["eval", "--init", "random", "--tune", "momentum=0.9"], "--tune 'momentum=0.9'"),
    ],
)
def test_bad_inputs_exit_2(args, message, tmp_path):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_config_resolution_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("episodes: 10\nshot: 5\nzo:\n  q: 3\n")
    cfg = resolve_config(config=f, direct={"shot": 1, "seed": None}, sets=["zo.q=7"])
    assert (cfg.episodes, cfg.shot, cfg.zo.q, cfg.seed) == (10, 1, 7, 2022)
    for name in available_presets():
        assert resolve_config(preset=name).way >= 2
    with pytest.raises(ConfigError):
        resolve_config(preset="definitely-not-a-preset")


def test_white_box_flag_disables_zo_and_early_stop_unless_set_again():
    paper = {"method": "bidf-mkd"}
    assert resolve_config(preset="cpu", direct=paper).recovery.early_stop_prob is not None
    cfg = resolve_config(preset="cpu", direct=paper, ablations=ABLATIONS["white-box"])
    assert cfg.zo.enabled is False and cfg.recovery.early_stop_prob is None
    cfg = resolve_config(
        preset="cpu",
        direct=paper,
        ablations=ABLATIONS["white-box"],
        sets=["recovery.early_stop_prob=0.5"],
    )
    assert cfg.recovery.early_stop_prob == 0.5
