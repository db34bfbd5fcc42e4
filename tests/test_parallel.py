"""Parallel stages on every backend (inline, local process pool, local Ray): the same numbers as
sequential for zoo builds, evaluation and bench cells; one shared ledger never overspent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from apimeta.apis import APIInfo, LocalAPI, SharedLedger, build_zoo, read_manifest
from apimeta.cli import app
from apimeta.data import load_dataset
from apimeta.errors import ConfigError, QueryBudgetExceeded
from apimeta.evaluate import evaluate
from apimeta.models import build_backbone
from apimeta.parallel import Backend, make_backend, run_jobs

runner = CliRunner()
TINY = [
    "--set", "width=8", "--set", "recovery.per_class=4", "--set", "query=3",
    "--set", "recovery.iters=2", "--set", "zo.q=2", "--set", "eval.tasks=2", "--set", "recovery.ngf=8",
]  # fmt: skip
DATA = {"n_classes": (8, 3, 3), "per_class": 10}
ZOO_KW = dict(seed=7, epochs=2, conv4_width=8, resnet_width=0.0625, dataset_options=DATA)


@pytest.fixture(scope="module")
def ray_backend():
    """A local Ray with 2 CPUs for this module, always shut down."""
    ray = pytest.importorskip("ray")
    backend = Backend("ray", 2)
    from apimeta.parallel import ensure_ray

    ensure_ray(backend)
    # this module's job functions travel by value: Ray workers cannot import a test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield backend
    ray.shutdown()


def _square_plus(shared: int, x: int) -> tuple[int, int]:
    return x * x + shared, torch.get_num_threads()


def test_make_backend_follows_the_flags():
    assert make_backend(1) == Backend("inline", 1)
    assert make_backend(0) == Backend("inline", 1)
    assert make_backend(3) == Backend("process", 3)
    with pytest.raises(ConfigError, match="--workers"):
        make_backend(-1)


def test_ray_flag_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'apimeta\[ray\]'"):
        make_backend(2, ray=True)


@pytest.mark.parametrize("kind", ["inline", "process"])
def test_run_jobs_gives_every_result_with_its_index(kind):
    got = dict(run_jobs(_square_plus, [(i,) for i in range(7)], Backend(kind, 2), shared=100))
    assert {i: r[0] for i, r in got.items()} == {i: i * i + 100 for i in range(7)}
    if kind == "process":
        assert all(r[1] == 1 for r in got.values())  # one torch thread per worker


def _fails(shared, x):
    if x == 2:
        raise ConfigError(f"job {x} failed")
    return x


def test_a_failing_job_raises_in_the_caller():
    with pytest.raises(ConfigError, match="job 2 failed"):
        list(run_jobs(_fails, [(i,) for i in range(4)], Backend("process", 2)))


def test_run_jobs_on_ray(ray_backend):
    got = dict(run_jobs(_square_plus, [(i,) for i in range(5)], ray_backend, shared=1))
    assert {i: r for i, r in got.items()} == {i: (i * i + 1, 1) for i in range(5)}


# --- evaluation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data():
    return load_dataset("synthetic", n_classes=(6, 6, 6), per_class=8, image_size=32)


def _model():
    torch.manual_seed(3)
    return build_backbone("conv4", num_classes=5, image_size=32, width=8)


def test_sharded_evaluation_equals_in_process(eval_data, ray_backend):
    kw = dict(shots=(1, 2), query=3, tasks=30, steps=2, lr=0.1, keep_accs=True)
    seen: list[tuple[int, int]] = []
    base = evaluate(_model(), eval_data, **kw)
    pool = evaluate(
        _model(), eval_data, backend=Backend("process", 2), **kw,
        progress=lambda d, t, info: seen.append((info["shot"], d)),
    )  # fmt: skip
    on_ray = evaluate(_model(), eval_data, backend=ray_backend, **kw)
    for shot in ("1-shot", "2-shot"):
        assert len(base[shot]["accs"]) == 30
        assert pool[shot]["accs"] == base[shot]["accs"]  # task by task, in task order
        assert on_ray[shot]["accs"] == base[shot]["accs"]
    assert (1, 30) in seen and (2, 30) in seen  # progress reaches every shot's total


# --- zoo build -------------------------------------------------------------------------------


def _zoo_state(out: Path) -> dict:
    m = read_manifest(out)
    entries = [{k: v for k, v in e.items() if k != "train_time_s"} for e in m["apis"]]
    weights = {e["file"]: load_file(out / e["file"]) for e in m["apis"]}
    return {"entries": entries, "weights": weights}


def test_parallel_zoo_build_equals_sequential_and_resumes(tmp_path, ray_backend):
    build_zoo(["synthetic"], 3, ["conv4", "resnet10"], 4, tmp_path / "seq", **ZOO_KW)
    events = []
    build_zoo(
        ["synthetic"], 2, ["conv4", "resnet10"], 4, tmp_path / "par", **ZOO_KW,
        backend=Backend("process", 2), progress=lambda p: events.append((p.stage, p.index)),
    )  # fmt: skip
    assert sorted(e for e in events if e[0] == "done") == [("done", 0), ("done", 1)]
    events.clear()
    build_zoo(  # resumes: the two finished APIs are reused, the third trains on Ray
        ["synthetic"], 3, ["conv4", "resnet10"], 4, tmp_path / "par", **ZOO_KW,
        backend=ray_backend, progress=lambda p: events.append((p.stage, p.index)),
    )  # fmt: skip
    assert ("reused", 0) in events and ("reused", 1) in events and ("done", 2) in events
    par, seq = _zoo_state(tmp_path / "par"), _zoo_state(tmp_path / "seq")
    assert par["entries"] == seq["entries"]
    for f, state in seq["weights"].items():  # (safetensors headers list keys in any order)
        assert state.keys() == par["weights"][f].keys()
        assert all(torch.equal(state[k], par["weights"][f][k]) for k in state), f


def test_zoo_build_cli_with_workers(tmp_path):
    out = tmp_path / "zoo"
    args = ["zoo", "build", "--out", str(out), "--dataset", "synthetic", "--n-apis", "2",
            "--way", "4", "--epochs", "1", "--conv4-width", "8", "--seed", "7", "--threads", "1",
            "--dataset-option", "n_classes=[8,3,3]", "--dataset-option", "per_class=10",
            "--workers", "2"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert [e["name"] for e in read_manifest(out)["apis"]] == ["api-000", "api-001"]


# --- one ledger for several workers ----------------------------------------------------------


def _spend(ledger: SharedLedger, seed: int, batch: int) -> int:
    """A worker: query its own API in batches until the shared budget refuses; images sent."""
    torch.manual_seed(seed)
    model = build_backbone("conv4", num_classes=3, width=4, bn="standard")
    info = APIInfo(f"api-{seed}", "synthetic", (0, 1, 2), ("a", "b", "c"), 3, 32, "logits")
    api = LocalAPI(model, info, ledger)
    sent = 0
    x = torch.rand(batch, 3, 32, 32)
    while True:
        try:
            api.query(x)
        except QueryBudgetExceeded:
            return sent
        sent += batch


@pytest.mark.parametrize("kind", ["process", "ray"])
def test_workers_sharing_one_ledger_never_overspend(kind, request):
    backend = request.getfixturevalue("ray_backend") if kind == "ray" else Backend("process", 3)
    budget = 400
    with SharedLedger.start(budget, kind) as ledger:
        jobs = [(i, b) for i, b in enumerate((7, 11, 13))]  # batches that cannot fill it exactly
        sent = dict(run_jobs(lambda_free_spend, jobs, backend, shared=ledger))
        state = ledger.summary()
    assert state["used"] == sum(sent.values()) <= budget  # billed == sent, never beyond
    assert state["used"] > budget - 13  # every worker ran until the budget refused it
    assert state["per_api"] == {f"api-{i}": n for i, n in sent.items() if n}


def lambda_free_spend(ledger: SharedLedger, seed: int, batch: int) -> int:
    return _spend(ledger, seed, batch)


def test_shared_ledger_refuses_before_billing_and_round_trips():
    with SharedLedger.start(50, "process") as ledger:
        ledger.charge("a", 30)
        with pytest.raises(QueryBudgetExceeded, match="30 of 50"):
            ledger.charge("a", 21)
        assert ledger.used == 30 and ledger.remaining == 20 and ledger.can_afford(20)
        ledger.record_cache_hit("a", 4)
        state = ledger.state_dict()
        assert state["cached"] == {"a": 4}
        ledger.load_state_dict({**state, "used": 10, "per_api": {"a": 10}})
        assert ledger.used == 10


# --- bench cells -----------------------------------------------------------------------------


def test_bench_cells_on_ray_give_the_same_numbers(tmp_path, ray_backend):
    from apimeta.testing import write_tiny_zoo

    zoo = write_tiny_zoo(tmp_path / "zoo")

    def bench(out: str, *extra: str) -> dict:
        args = ["bench", "--scenario", f"SS={zoo}:synthetic", "--methods", "random,maml-real",
                "--seeds", "2", "--set", "episodes=2", "--set", "inner_steps=1", "--tasks", "3",
                "--shots", "1", "--out", str(tmp_path / out), "--threads", "1", *TINY,
                *extra]  # fmt: skip
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        return {
            str(p.relative_to(tmp_path / out)): json.loads(p.read_text())["results"]
            for p in sorted((tmp_path / out).rglob("eval.json"))
        }

    one = bench("one")
    on_ray = bench("ray", "--ray", "--workers", "2")  # joins the Ray this module started
    assert one == on_ray and len(one) == 4
    assert "--ray" in (tmp_path / "ray" / "results.md").read_text()
