"""A bidf-mkd training run against a real HTTP zoo: faults, an outage, SIGKILL + resume.

The zoo is served by ``apimeta.apis.server.create_app`` under uvicorn on a loopback port; a recorder
around every served API counts (and hashes) the images the server received. Faults come from the
fault-injecting proxy of ``apimeta.testing``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from apimeta.apis import QueryLedger, build_zoo, load_zoo
from apimeta.apis.cache import QueryCache
from apimeta.checkpoint import load_checkpoint
from apimeta.config import save_config
from apimeta.errors import APIUnavailableError
from apimeta.methods import METHODS
from apimeta.run_config import HttpConfig, MemoryConfig, RunConfig, ZOConfig
from apimeta.runs import RunDir
from apimeta.testing import FaultyProxy, UvicornThread, make_config

B_PER_CLASS, ITERS, Q, WAY = 4, 2, 2, 5
B = B_PER_CLASS * WAY
FAST = dict(timeout=5.0, max_retries=3, backoff=0.001, max_backoff=0.01)


class ServerLog:
    """Server-side record of every image received (hash counts), optionally gating one call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hashes: Counter[str] = Counter()
        self.calls = 0
        self.gate_at: int | None = None  # this infer call (1-based) blocks until released
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.gated_images = 0

    def reset(self) -> None:
        with self.lock:
            self.hashes.clear()
            self.calls = 0
            self.gate_at = None
            self.blocked.clear()
            self.release.clear()

    @property
    def total(self) -> int:
        return sum(self.hashes.values())


class Recorder:
    """A served API that records what reaches the server before answering."""

    def __init__(self, api, log: ServerLog):
        self.api, self.log = api, log
        self.info, self.ledger = api.info, api.ledger

    def query(self, x: torch.Tensor) -> torch.Tensor:
        with self.log.lock:
            self.log.calls += 1
            gated = self.log.calls == self.log.gate_at
        if gated:
            self.log.gated_images = int(x.shape[0])
            self.log.blocked.set()
            self.log.release.wait(timeout=60)
        keys = QueryCache.keys(self.info.name, "server", x)
        with self.log.lock:
            self.log.hashes.update(keys)
        return self.api.query(x)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("http-zoo")
    build_zoo(["synthetic"], 3, ["conv4"], WAY, out, epochs=2, conv4_width=8, seed=1)
    return out


@pytest.fixture(scope="module")
def server(zoo):
    from apimeta.apis.server import create_app

    log = ServerLog()
    apis = [Recorder(a, log) for a in load_zoo(zoo, ledger=QueryLedger())]
    with UvicornThread(create_app(apis)) as srv:
        yield srv.url, log
        log.release.set()


def tiny_cfg(url: str, run_dir: Path, **kw) -> RunConfig:
    base = dict(
        method="bidf-mkd",
        dataset="synthetic",
        zoo=url,
        width=8,
        way=WAY,
        shot=1,
        query=3,
        episodes=3,
        meta_batch=1,
        nz=16,
        ngf=8,
        memory=MemoryConfig(enabled=False),  # an API event in every meta-update
        recover_per_class=B_PER_CLASS,
        recover_iters=ITERS,
        zo=ZOConfig(q=Q),
        adv_start=1,
        api_patience=1,
        eval_every=1000,
        kd_inner_steps=2,
        test_steps=1,
        eval_tasks=1,
        test_tasks=1,
        checkpoint_every=1,
        query_budget=100_000,
        http=HttpConfig(**FAST),
        out=str(run_dir),
    )
    return make_config(base, **kw)


def train(cfg: RunConfig, resume: bool = False, progress=None):
    method = METHODS.get(cfg.method)()
    run = RunDir.create(cfg, resume=resume)
    method.train(cfg, run, progress, resume=resume)
    return method


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=0)


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The fault-free run: final weights, ledger, server-side counts, infer calls per update."""
    url, log = server
    log.reset()
    calls_after: dict[int, int] = {}

    def progress(done: int, total: int, info: dict) -> None:
        if info.get("phase") == "train":
            calls_after[done] = log.calls

    cfg = tiny_cfg(url, tmp_path_factory.mktemp("ref") / "run")
    m = train(cfg, progress=progress)
    return {
        "model": load_checkpoint(m.run.last_checkpoint)["model"],
        "ledger": m.ledger.state_dict(),
        "events": len(m.events),
        "server_total": log.total,
        "server_counts": Counter(log.hashes),
        "calls_after": calls_after,
        "steps": m.step,
    }


def test_http_run_ledger_equals_images_the_server_received(reference):
    ref = reference
    assert ref["steps"] == ref["events"] == 3
    assert ref["ledger"]["used"] == ref["server_total"] > 0
    assert not ref["ledger"]["retries"] and not ref["ledger"]["cached"]
    # update 2 holds an API event with several requests (used by the kill test below)
    assert ref["calls_after"][2] - ref["calls_after"][1] > 3


def test_injected_faults_change_nothing_but_the_retry_count(server, reference, tmp_path):
    url, log = server
    log.reset()
    faults = ["ok", "503", "503", "ok", "429:0", "ok", "slow:0.8", "ok", "drop", "ok", "502"]
    with FaultyProxy(url, faults) as proxy:
        http = HttpConfig(**{**FAST, "timeout": 0.5})  # "slow" answers come too late
        m = train(tiny_cfg(proxy.url, tmp_path / "run", http=http))
        injected = sum(n for a, n in proxy.counts.items() if a != "ok")
    assert injected == 6
    assert_same_model(load_checkpoint(m.run.last_checkpoint)["model"], reference["model"])
    # billed = every image once; re-sends recorded apart, unbilled
    assert m.ledger.used == reference["ledger"]["used"]
    assert m.ledger.per_api == reference["ledger"]["per_api"]
    assert m.apis[0].stats["retries"] >= injected
    assert sum(m.ledger.retries.values()) > 0
    assert set(log.hashes) == set(reference["server_counts"])  # the same images, none lost


def test_server_outage_stops_with_a_checkpoint_and_resumes_exactly(server, reference, tmp_path):
    url, log = server
    log.reset()
    ok_first = reference["calls_after"][1] + 2  # the outage starts inside meta-update 2
    cfg = tiny_cfg(
        "", tmp_path / "run", http=HttpConfig(**{**FAST, "max_retries": 2}, query_cache="auto")
    )
    with FaultyProxy(url, ["ok"] * ok_first, default="503") as proxy:
        cfg.zoo = proxy.url
        with pytest.raises(APIUnavailableError, match="--resume --out") as err:
            train(cfg)
        assert err.value.step == 1
        assert proxy.counts["503"] == 3  # first attempt + 2 retries
        ckpt = load_checkpoint(Path(cfg.out) / "last.pt")
        assert ckpt["step"] == 1
        sent_before = ckpt["extra"]["ledger"]["used"]
        assert 0 < sent_before - log.total <= B * (1 + Q)  # + the request that failed
        rows = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows) == 1  # the failed update left no records
        proxy.set_faults([], default="ok")  # the server is back
        m = train(cfg, resume=True)
    assert m.step == reference["steps"]
    assert_same_model(load_checkpoint(m.run.last_checkpoint)["model"], reference["model"])
    assert sum(m.ledger.cached.values()) > 0  # the redone update re-used answered queries
    # the same images, and none reached the server more often than without the outage
    assert set(log.hashes) == set(reference["server_counts"])
    assert not log.hashes - reference["server_counts"]
    assert 0 < m.ledger.used - log.total <= B * (1 + Q)  # + the request that never got through


def test_sigkill_then_resume_pays_nothing_twice(server, reference, zoo, tmp_path):
    url, log = server
    log.reset()
    log.gate_at = reference["calls_after"][1] + 3  # blocks inside meta-update 2
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(url, run_dir, http=HttpConfig(**FAST, query_cache="auto"))
    cfg_file = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_file)
    cli = [sys.executable, "-c", "from apimeta.cli import app; app()", "train", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    err_file = tmp_path / "stderr.txt"
    with err_file.open("wb") as err:
        proc = subprocess.Popen(
            [*cli, "--config", str(cfg_file), "--out", str(run_dir)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 120
        while not log.blocked.wait(0.05):
            assert proc.poll() is None, err_file.read_text()[-2000:]
            assert time.monotonic() < deadline, "the run never reached meta-update 2"
        metrics = (run_dir / "metrics.jsonl").read_text()
        assert any(json.loads(x).get("phase") == "event" for x in metrics.splitlines())
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.release.set()  # the in-flight request completes on the server; its answer is lost
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "last.pt")["step"] == 1
    for _ in range(100):  # the released request reaches the recorder
        if log.calls == log.gate_at:
            break
        time.sleep(0.05)
    log.gate_at = None
    done = subprocess.run(
        [*cli, "--resume", "--out", str(run_dir)], env=env, capture_output=True, timeout=180
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    ckpt = load_checkpoint(run_dir / "last.pt")
    assert ckpt["step"] == reference["steps"]
    assert_same_model(ckpt["model"], reference["model"])
    ledger = ckpt["extra"]["ledger"]
    assert set(log.hashes) == set(reference["server_counts"])
    # one infer request more than the uninterrupted run: the one in flight at the kill; the two
    # answered before it came from the query cache
    assert log.calls == reference["calls_after"][reference["steps"]] + 1
    # those two were paid before the kill, so the resumed ledger bills them (cache rows newer
    # than the checkpoint); the server was paid exactly the ledger plus the lost request
    assert log.total - ledger["used"] == log.gated_images > 0
    assert ledger["used"] <= cfg.query_budget
