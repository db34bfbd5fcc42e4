"""`apimeta demo` and `apimeta bench` end to end on tiny synthetic data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from apimeta.apis.zoo import build_zoo
from apimeta.cli import app

runner = CliRunner()
TINY = [
    "--set", "width=8", "--set", "recovery.per_class=4", "--set", "query=3",
    "--set", "recovery.iters=2", "--set", "zo.q=2", "--set", "eval.tasks=2", "--set", "recovery.ngf=8",
]  # fmt: skip


def test_demo_writes_report_curve_grids_and_table(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(
        app,
        ["demo", "--dataset", "synthetic", "--n-apis", "2", "--episodes", "8", "--tasks", "4",
         "--threads", "1", "--paper", "--out", str(out), *TINY],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    for row in ("bbkd:colour-leaves-ink-lr5", "bidf-mkd", "random"):  # bidf-mkd: --paper
        assert f"| {row} |" in report
    # one protocol for every row: the preset's method's (lr 0.1, top two stages re-drawn)
    assert "the same fine-tuning protocol for every initialization: 10 steps at lr 0.1" in report
    assert "the top 2 feature stages re-drawn" in report
    assert "the head (learned or random)" in report and "chosen per shot on meta-val" in report
    for name in ("bbkd-colour-leaves-ink-lr5", "bidf-mkd", "random-synthetic"):  # the same grid
        res_ = json.loads((out / ("" if name.startswith("random") else "SS") / name / "eval.json")
                          .read_text())["results"]["synthetic"]  # fmt: skip
        assert all(r["setting"]["head"] in ("learned", "random") for r in res_.values()), name
    assert (out / "learning_curve.png").stat().st_size > 1000
    for name in ("bbkd-colour-leaves-ink-lr5", "bidf-mkd"):
        run = out / "SS" / name
        assert (run / "config.yaml").exists() and (run / "best.pt").exists()
        assert list((run / "recovered").glob("event-*.png"))
        row = json.loads((run / "eval.json").read_text())
        assert row["queries"] > 0 and set(row["results"]["synthetic"]) == {"1-shot", "5-shot"}
        assert (row["config"]["eval"]["test_lr"], row["config"]["eval"]["reinit"]) == (0.1, 2)
    leaves = json.loads((out / "SS" / "bbkd-colour-leaves-ink-lr5" / "eval.json").read_text())
    assert leaves["config"]["query_budget"] == 50_000  # its own budget; bidf-mkd's is 1 M
    assert (leaves["config"]["recovery"]["source"], leaves["config"]["kd"]["union_ce"]) == (
        "leaves-ink",
        1.0,
    )  # the preset's method, resolved
    assert leaves["config"]["kd"]["contrastive_colour"] is True
    assert leaves["config"]["outer_lr"] == 0.005
    assert "the APIs' mean top probability" in report and "mean recovery fidelity" in report


def test_bench_table_reuses_finished_runs(tmp_path):
    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "random,bidf-mkd",
            "--set", "episodes=4", "--tasks", "3", "--out", str(tmp_path / "b"), *TINY]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "b" / "results.md").read_text()
    assert "| method | SS 1-shot | SS 5-shot |" in table
    assert "| bidf-mkd |" in table and "| random |" in table
    # the first table's protocol is each run's own: said, and no tuned section promised
    assert "meta-tested with its own run config's protocol" in table
    assert "the section below tunes every row" not in table
    first = (tmp_path / "b" / "SS" / "bidf-mkd" / "eval.json").stat().st_mtime_ns
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "SS" / "bidf-mkd" / "eval.json").stat().st_mtime_ns == first
    assert "Config differences" not in (tmp_path / "b" / "results.md").read_text()
    # a reused run trained with other settings is reported, never silently mixed in
    res = runner.invoke(app, [*args, "--set", "kd.adv_start=3"])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "b" / "results.md").read_text()
    assert "SS bidf-mkd: reused run trained with kd.adv_start=0.25 (table: 3)" in table
    # a run copied into another row's directory is that row (never merged into the one it
    # was trained as), with its differences from that row's config reported
    shutil.copytree(
        tmp_path / "b" / "SS" / "bidf-mkd", tmp_path / "b" / "SS" / "bidf-mkd-no-boundary"
    )
    res = runner.invoke(app, [*args[:4], "random,bidf-mkd,bidf-mkd:no-boundary", *args[5:]])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "b" / "results.md").read_text()
    assert "| bidf-mkd:no-boundary |" in table and "| bidf-mkd |" in table
    assert "SS bidf-mkd:no-boundary: reused run trained with kd.adv=" in table


def test_bench_restarts_a_run_killed_before_its_first_checkpoint(tmp_path):
    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    stale = tmp_path / "b" / "SS" / "bidf-mkd"
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 0}\n')  # what a kill before last.pt leaves
    args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "bidf-mkd",
            "--set", "episodes=4", "--tasks", "3", "--out", str(tmp_path / "b"), *TINY]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (stale / "eval.json").is_file() and (stale / "last.pt").is_file()
    assert '{"step": 0}' not in (stale / "metrics.jsonl").read_text()


def test_bench_never_discards_a_directory_holding_finished_work(tmp_path):
    """Only a run killed before its first checkpoint is started over; a directory without
    last.pt that holds a checkpoint or results is refused and left as it is."""
    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    stale = tmp_path / "b" / "SS" / "bidf-mkd"
    (stale / "old").mkdir(parents=True)
    (stale / "metrics.jsonl").write_text('{"step": 0}\n')
    (stale / "old" / "best.pt").write_bytes(b"weights")
    args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "bidf-mkd",
            "--set", "episodes=4", "--tasks", "3", "--out", str(tmp_path / "b"), *TINY]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert "holds runs or results but no last.pt to resume" in res.output
    assert (stale / "old" / "best.pt").read_bytes() == b"weights"
    assert (stale / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_zoo_free_rows_are_shared_by_scenarios(tmp_path):
    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    args = ["bench", "--scenario", f"A={zoo}:synthetic", "--scenario", f"B={zoo}:synthetic",
            "--methods", "random", "--tasks", "3", "--out", str(tmp_path / "b"), *TINY]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "b" / "results.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| random |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == cells[3] != "—" and cells[2] == cells[4] != "—"  # A and B: same numbers
    assert "Config differences" not in table


def test_bench_rejects_bad_scenario_and_variant(tmp_path):
    res = runner.invoke(app, ["bench", "--scenario", "SS-no-zoo", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "NAME=ZOO:DATASET" in res.output
    res = runner.invoke(
        app, ["bench", "--scenario", f"SS={tmp_path}:synthetic", "--methods", "magic"]
    )
    assert res.exit_code == 2 and "unknown method variant" in res.output
    res = runner.invoke(
        app, ["bench", "--scenario", f"SS={tmp_path}:synthetic", "--oracle", "bbkd"]
    )
    assert res.exit_code == 2 and "not the zoo oracle" in res.output


def test_train_bidf_mkd_then_eval_checkpoint(tmp_path):
    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        ["train", "--method", "bidf-mkd", "--dataset", "synthetic", "--zoo", str(zoo),
         "--episodes", "4", "--query-budget", "100000", "--out", str(run), "--no-boundary",
         "--white-box", "--set", "test_tasks=2", "--set", "meta_batch=2", *TINY],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "run directory" in res.output
    cfg = (run / "config.yaml").read_text()
    assert "adv: 0.0" in cfg and "query_budget: 100000" in cfg
    resolved = yaml.safe_load(cfg)  # --white-box: true gradients, no early stop
    assert resolved["zo"]["enabled"] is False and resolved["recovery"]["early_stop_prob"] is None
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app,
        ["eval", "--init", str(run / "best.pt"), "--dataset", "synthetic", "--shots", "1",
         "--tasks", "3", "--json", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())


def test_bench_reuses_the_training_runs_own_meta_test_exactly(tmp_path):
    from apimeta.bench import evaluate_init
    from apimeta.config import from_dict
    from apimeta.run_config import RunConfig

    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "bidf-mkd",
            "--set", "episodes=4", "--set", "eval.test_tasks=3", "--tasks", "3",
            "--out", str(tmp_path / "b"), *TINY]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    row = json.loads((tmp_path / "b" / "SS" / "bidf-mkd" / "eval.json").read_text())
    cfg = from_dict(RunConfig, row["config"])
    fresh = evaluate_init(cfg, tmp_path / "b" / "SS" / "bidf-mkd" / "best.pt", (1, 5), 3)
    assert row["results"] == json.loads(json.dumps(fresh))


def test_train_takes_the_dataset_of_a_local_zoo(tmp_path):
    """`--zoo` of a synthetic zoo without --dataset used to train on emoji (the default / the
    preset's dataset) and fail only after rendering it."""
    zoo = tmp_path / "zoo"
    build_zoo(["synthetic"], 2, ["conv4"], 5, zoo, epochs=1, conv4_width=8)
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        ["train", "--method", "bidf-mkd", "--zoo", str(zoo), "--episodes", "2",
         "--query-budget", "100000", "--out", str(run), "--set", "meta_batch=2",
         "--set", "eval.test_tasks=2", *TINY],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "trained on synthetic" in res.output
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset"] == "synthetic"


def test_bench_seeds_gives_means_spreads_and_paired_differences(tmp_path):
    from apimeta.testing import write_tiny_zoo

    zoo = write_tiny_zoo(tmp_path / "zoo")
    args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "random,maml-real",
            "--seeds", "2", "--set", "episodes=2", "--set", "inner_steps=1", "--tasks", "4",
            "--shots", "1", "--out", str(tmp_path / "b"), "--threads", "1", *TINY]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "b" / "results.md").read_text()
    assert "over 2 training seeds ± their standard deviation" in table
    assert "| maml-real − random |" in table and "Paired differences" in table
    runs = sorted(p.parent.name for p in (tmp_path / "b").rglob("eval.json"))
    assert runs == ["seed-2022", "seed-2022", "seed-2023", "seed-2023"]
    rows = [json.loads(p.read_text()) for p in (tmp_path / "b").rglob("eval.json")]
    assert {r["seed"] for r in rows} == {2022, 2023}
    assert all(len(r["results"]["synthetic"]["1-shot"]["accs"]) == 4 for r in rows)
    first = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("eval.json")}
    res = runner.invoke(app, args)  # finished runs are reused
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("eval.json")} == first
    # a one-seed bench into the same --out never touches the seeds' runs: refused up front
    one = [a if a != "2" else "1" for a in args]
    assert one[one.index("--seeds") + 1] == "1"
    res = runner.invoke(app, one)
    assert res.exit_code != 0
    assert "holds the runs of 2 training seeds (seed-2022, seed-2023)" in res.output
    assert "rerun with that --seeds" in res.output and "Traceback" not in res.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("eval.json")} == first
    assert len(list((tmp_path / "b").rglob("last.pt"))) == 2  # maml-real's two runs


def test_bench_workers_give_the_same_numbers_as_one_process(tmp_path):
    from apimeta.testing import write_tiny_zoo

    zoo = write_tiny_zoo(tmp_path / "zoo")

    def bench(out: str, *extra: str) -> dict:
        args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--scenario",
                f"SH={zoo}:synthetic", "--methods", "random,maml-real", "--seeds", "2",
                "--set", "episodes=2", "--set", "inner_steps=1", "--tasks", "3", "--shots", "1",
                "--out", str(tmp_path / out), "--threads", "1", *TINY, *extra]  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        rows = {}
        for p in sorted((tmp_path / out).rglob("eval.json")):
            r = json.loads(p.read_text())
            rows[str(p.relative_to(tmp_path / out))] = r["results"]["synthetic"]["1-shot"]["accs"]
        return rows

    one = bench("one")
    two = bench("two", "--workers", "2")
    assert one == two and len(one) == 4  # zoo-free rows shared by SS and SH: trained once
    assert "--workers 2" in (tmp_path / "two" / "results.md").read_text()


def test_bench_tune_chooses_the_protocol_on_meta_val_and_caches_it(tmp_path, monkeypatch):
    from apimeta import bench as bench_mod
    from apimeta.testing import write_tiny_zoo

    zoo = write_tiny_zoo(tmp_path / "zoo")
    args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "random,maml-real",
            "--seeds", "2", "--set", "episodes=2", "--set", "inner_steps=1", "--tasks", "4",
            "--shots", "1", "--out", str(tmp_path / "b"), "--threads", "1", *TINY,
            "--tune", "lr=0.01,0.5", "--tune", "head=learned,ncc"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "b" / "results.md").read_text()
    assert "## Fine-tuning protocol chosen on meta-val" in table
    assert "rows may differ in protocol here; the section below tunes every row" in table
    assert "lr in {0.01, 0.5}, head in {learned, ncc}" in table
    assert "--tune lr=0.01,0.5 --tune head=learned,ncc" in table
    caches = sorted((tmp_path / "b").rglob("tuned.json"))
    assert len(caches) == 4  # 2 rows x 2 seeds
    for c in caches:
        t = json.loads(c.read_text())
        r = t["results"]["synthetic"]["1-shot"]
        assert set(r["val"]) == {"lr=0.01 head=learned", "head=ncc", "lr=0.5 head=learned"}
        assert r["val"][bench_mod.setting_label(r["setting"])] == max(r["val"].values())
        assert len(r["accs"]) == 4 and t["val_tasks"] == 2
        assert bench_mod.setting_label(r["setting"]) in table
    # a second bench reuses every cached choice: tuning is never run again
    calls = []
    real = bench_mod.tune_protocol
    monkeypatch.setattr(
        bench_mod, "tune_protocol", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = {c: c.stat().st_mtime_ns for c in caches}
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {c: c.stat().st_mtime_ns for c in caches} == first and calls == []
    # a retrained checkpoint (another file) is tuned again; the others are still reused
    ckpt = json.loads(
        (tmp_path / "b" / "maml-real-synthetic" / "seed-2022" / "eval.json").read_text()
    )
    st = Path(ckpt["checkpoint"]).stat()
    os.utime(ckpt["checkpoint"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    # a bad grid is one line, before anything runs
    res = runner.invoke(app, [*args[:-4], "--tune", "momentum=0.9"])
    assert res.exit_code != 0 and "KEY one of lr, steps, head" in res.output
