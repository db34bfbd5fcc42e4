"""Ctrl-C (SIGINT) and SIGTERM during ``apimeta train``: last.pt is saved, the resume command is
printed, the exit status is 130 / 143, and ``--resume`` finishes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from apimeta.checkpoint import load_checkpoint

TRAIN = [
    "train", "--method", "maml-real", "--dataset", "synthetic", "--threads", "1",
    "--set", "width=8", "--set", "query=3", "--set", "meta_batch=1", "--set", "inner_steps=1",
    "--set", "eval.tasks=2", "--set", "eval.test_tasks=2", "--set", "eval.test_steps=1",
    "--set", "eval.every=100000", "--set", "checkpoint_every=100000",
]  # fmt: skip


def _cli(*args: str) -> list[str]:
    """The CLI in a child whose Ctrl-C raises KeyboardInterrupt, as in a terminal. A process
    started with SIGINT ignored (a background job of a non-interactive shell, e.g. `make test &`
    or `nohup`) passes that on to its children, and Python then installs no SIGINT handler: the
    child would train on after SIGINT (what made this test "hang" in such runs)."""
    code = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from apimeta.cli import app; app()"
    )
    return [sys.executable, "-c", code, *args]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_pt_and_resume_finishes(tmp_path, sig, code):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        _cli(*TRAIN, "--episodes", "100000", "--out", str(out)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count('"phase": "train"') >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    # no periodic checkpoint yet (checkpoint_every is huge): only the signal can save one
    assert not (out / "last.pt").exists()
    proc.send_signal(sig)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # seen once: show where every thread of the child hangs
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER dumps the stacks on SIGABRT
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"no exit within 120 s of signal {sig!r}; the child's stacks:\n{stderr[-6000:]}"
        )
    assert proc.returncode == code, stdout + stderr
    assert f"apimeta train --resume --out {out}" in " ".join((stdout + stderr).split())
    step = load_checkpoint(out / "last.pt")["step"]
    lines = [r for r in metrics.read_text().splitlines() if '"phase": "train"' in r]
    assert step >= 3 and len(lines) == step  # records of a partial update were dropped
    done = subprocess.run(
        _cli("train", "--resume", "--out", str(out), "--episodes", str(step + 2), "--threads", "1"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert load_checkpoint(out / "last.pt")["step"] == step + 2
