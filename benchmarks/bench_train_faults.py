"""Fault tolerance of a bidf-mkd TRAINING RUN against an HTTP zoo.

    .venv/bin/python benchmarks/bench_train_faults.py [--episodes 8] [--seed 0]

A tiny synthetic zoo is served by ``apimeta.apis.server`` (uvicorn thread on 127.0.0.1); a recorder
around every served API counts and hashes the images the server received (= what it would bill).
Four runs of the same config:

1. reference: fault-free;
2. faults: through the fault-injecting proxy (apimeta.testing) with a seeded plan
   of 5xx bursts, 429 storms (Retry-After 0), slow answers past the client timeout and dropped
   connections;
3. outage: the proxy answers 503 from the middle of the run on, past the retry policy; the run
   stops with APIUnavailableError and last.pt; the proxy recovers and the run is resumed;
4. SIGKILL: ``apimeta train`` as a subprocess with ``http.query_cache=auto``, killed with -9
   while a request is in flight in a meta-update after the first checkpoint; resumed with
   ``apimeta train --resume``.

Reported per run: faults injected, requests retried, queries lost (answers that differ: the
final model must be bit-identical to the reference), images billed by the client ledger vs
images the server received, cache hits, budget overspend (must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

from apimeta.apis import QueryLedger, build_zoo, load_zoo
from apimeta.apis.cache import QueryCache
from apimeta.apis.server import create_app
from apimeta.checkpoint import load_checkpoint
from apimeta.config import save_config
from apimeta.errors import APIUnavailableError
from apimeta.methods import METHODS
from apimeta.run_config import (
    EvalConfig,
    EventConfig,
    HttpConfig,
    KDConfig,
    RecoveryConfig,
    RunConfig,
    ZOConfig,
)
from apimeta.runs import RunDir
from apimeta.testing import FaultyProxy, UvicornThread


class Recorder:
    """A served API recording what reaches the server; call ``gate_at`` blocks until released."""

    def __init__(self, api, state: dict):
        self.api, self.s = api, state
        self.info, self.ledger = api.info, api.ledger

    def query(self, x: torch.Tensor) -> torch.Tensor:
        s = self.s
        with s["lock"]:
            s["calls"] += 1
            gated = s["calls"] == s["gate_at"]
        if gated:
            s["gated_images"] = int(x.shape[0])
            s["blocked"].set()
            s["release"].wait(timeout=120)
        keys = QueryCache.keys(self.info.name, "server", x)
        with s["lock"]:
            s["hashes"].update(keys)
        return self.api.query(x)


def new_state() -> dict:
    return {
        "lock": threading.Lock(),
        "hashes": Counter(),
        "calls": 0,
        "gate_at": None,
        "gated_images": 0,
        "blocked": threading.Event(),
        "release": threading.Event(),
    }


def fault_plan(n: int, seed: int) -> list[str]:
    """Seeded per-request actions: 5xx bursts, 429 storms, slow (past timeout) and drops."""
    rng = random.Random(seed)
    plan: list[str] = ["ok", "slow:0.8", "ok", "drop", "503", "ok", "429:0"]  # each kind once
    while len(plan) < n:
        u = rng.random()
        if u < 0.08:
            plan += [rng.choice(["503", "502", "504"])] * rng.randint(1, 3)
        elif u < 0.14:
            plan += ["429:0"] * rng.randint(1, 3)
        elif u < 0.17:
            plan.append("slow:0.8")
        elif u < 0.22:
            plan.append("drop")
        else:
            plan.append("ok")
    return plan


def make_cfg(url: str, out: Path, episodes: int, seed: int, **http) -> RunConfig:
    return RunConfig(
        method="bidf-mkd",
        dataset="synthetic",
        zoo=url,
        seed=seed,
        width=8,
        way=5,
        shot=1,
        query=3,
        episodes=episodes,
        meta_batch=2,
        recovery=RecoveryConfig(per_class=4, iters=3, nz=16, ngf=8),
        kd=KDConfig(inner_steps=2, adv_start=1),
        zo=ZOConfig(q=2),
        events=EventConfig(patience=1),
        eval=EvalConfig(every=10_000, tasks=1, test_tasks=1, test_steps=1),
        checkpoint_every=1,
        query_budget=200_000,
        http=HttpConfig(**{"timeout": 5.0, "max_retries": 3, "backoff": 0.001, **http}),
        out=str(out),
    )


def train(cfg: RunConfig, resume: bool = False, progress=None):
    m = METHODS.get(cfg.method)()
    m.train(cfg, RunDir.create(cfg, resume=resume), progress, resume=resume)
    return m


def same_model(a: Path, b: dict) -> bool:
    ma = load_checkpoint(a)["model"]
    return all(torch.equal(ma[k], b[k]) for k in b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-faults-"))
    build_zoo(["synthetic"], 3, ["conv4"], 5, tmp / "zoo", epochs=2, conv4_width=8, seed=1)
    st = new_state()
    apis = [Recorder(a, st) for a in load_zoo(tmp / "zoo", ledger=QueryLedger())]
    rows: list[dict] = []

    def reset() -> None:
        st.update(new_state())

    with UvicornThread(create_app(apis)) as srv:
        # 1. reference
        calls_after: dict[int, int] = {}
        images_after: dict[int, int] = {}

        def progress(done: int, total: int, info: dict) -> None:
            if info.get("phase") == "train":
                calls_after[done] = st["calls"]
                images_after[done] = sum(st["hashes"].values())

        t0 = time.perf_counter()
        ref = train(make_cfg(srv.url, tmp / "ref", args.episodes, args.seed), progress=progress)
        ref_model = load_checkpoint(ref.run.last_checkpoint)["model"]
        ref_calls, ref_hashes = st["calls"], Counter(st["hashes"])
        rows.append(
            {
                "run": "reference",
                "updates": ref.step,
                "api_events": len(ref.events),
                "infer_requests": ref_calls,
                "billed": ref.ledger.used,
                "server_received": sum(ref_hashes.values()),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )

        # 2. injected faults
        reset()
        plan = fault_plan(3 * ref_calls, args.seed)
        t0 = time.perf_counter()
        with FaultyProxy(srv.url, plan) as proxy:
            cfg = make_cfg(
                proxy.url, tmp / "faults", args.episodes, args.seed, timeout=0.5, max_retries=8
            )
            m = train(cfg)
            faults = {k: v for k, v in proxy.counts.items() if k != "ok"}
        rows.append(
            {
                "run": "faults",
                "faults_injected": sum(faults.values()),
                "faults": faults,
                "requests_retried": int(m.apis[0].stats["retries"]),
                "images_resent_unbilled": sum(m.ledger.retries.values()),
                "queries_lost": 0
                if same_model(m.run.last_checkpoint, ref_model)
                else "MODEL DIFFERS",
                "billed": m.ledger.used,
                "billed_minus_reference": m.ledger.used - ref.ledger.used,
                "server_received": sum(st["hashes"].values()),
                "same_images_as_reference": set(st["hashes"]) == set(ref_hashes),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )

        # 3. outage past the retry policy, then resume
        reset()
        half = calls_after[max(1, ref.step // 2)] + 2
        t0 = time.perf_counter()
        with FaultyProxy(srv.url, ["ok"] * half, default="503") as proxy:
            cfg = make_cfg(
                proxy.url, tmp / "outage", args.episodes, args.seed, max_retries=2,
                query_cache="auto",
            )  # fmt: skip
            try:
                train(cfg)
                stopped = "did not stop"
            except APIUnavailableError as e:
                stopped = f"APIUnavailableError at step {e.step}"
            ck = load_checkpoint(Path(cfg.out) / "last.pt")
            n503 = proxy.counts["503"]
            proxy.set_faults([], default="ok")
            m = train(cfg, resume=True)
        rows.append(
            {
                "run": "outage",
                "stopped": stopped,
                "checkpoint_step": ck["step"],
                "503s_served": n503,
                "queries_lost": 0
                if same_model(m.run.last_checkpoint, ref_model)
                else "MODEL DIFFERS",
                "cache_hits_after_resume": sum(m.ledger.cached.values()),
                "billed": m.ledger.used,
                "server_received": sum(st["hashes"].values()),
                "resent_to_server": (st["hashes"] - ref_hashes).total(),
                "overspend_vs_server": max(0, sum(st["hashes"].values()) - m.ledger.used),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )

        # 4. SIGKILL mid-update, resume via the CLI
        reset()
        st["gate_at"] = calls_after[max(1, ref.step // 2)] + 3
        run_dir = tmp / "killed"
        cfg = make_cfg(srv.url, run_dir, args.episodes, args.seed, query_cache="auto")
        save_config(cfg, tmp / "killed.yaml")
        cli = [sys.executable, "-c", "from apimeta.cli import app; app()", "train"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        with (tmp / "killed.err").open("wb") as err:
            proc = subprocess.Popen(
                [*cli, "--threads", "1", "--config", str(tmp / "killed.yaml"), "--out",
                 str(run_dir)], env=env, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        if not st["blocked"].wait(timeout=180):
            proc.kill()
            raise SystemExit("the subprocess never reached the gated request")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before_kill = sum(st["hashes"].values())  # the gated request is not recorded yet
        ck_step = load_checkpoint(run_dir / "last.pt")["step"]
        st["release"].set()
        while st["calls"] < st["gate_at"]:
            time.sleep(0.05)
        st["gate_at"] = None
        done = subprocess.run(
            [*cli, "--threads", "1", "--resume", "--out", str(run_dir)], env=env,
            capture_output=True,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(done.stderr.decode()[-3000:])
        ck = load_checkpoint(run_dir / "last.pt")
        ledger = ck["extra"]["ledger"]
        server = sum(st["hashes"].values())
        rows.append(
            {
                "run": "sigkill",
                "killed_at_checkpoint_step": ck_step,
                "in_flight_images_at_kill": st["gated_images"],
                "answered_after_checkpoint_before_kill": before_kill - images_after[ck_step],
                "queries_lost": 0
                if same_model(run_dir / "last.pt", ref_model)
                else "MODEL DIFFERS",
                "extra_infer_requests": st["calls"] - ref_calls,
                "billed": ledger["used"],
                "server_received": server,
                "paid_not_billed": server - ledger["used"],
                "cache_hits_free": sum(ledger["cached"].values()),
                "budget": cfg.query_budget,
                "overspend_vs_budget": max(0, ledger["used"] - cfg.query_budget),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    for r in rows:
        print(json.dumps(r))
    print(f"(tmp dir {tmp})")


if __name__ == "__main__":
    main()
