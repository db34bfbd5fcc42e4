"""Worker processes of dataset decoding/rendering: none under --threads 1, none left behind
after SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from apimeta.data import render


def test_one_torch_thread_means_no_worker_processes(monkeypatch):
    def no_pool(*a, **k):
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(render, "ProcessPoolExecutor", no_pool)
    monkeypatch.setattr(render, "_PARALLEL_MIN_CLASSES", 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert render.parallel_map(abs, [-1, -2, -3, -4]) == [1, 2, 3, 4]
    finally:
        torch.set_num_threads(threads)


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_sigterm_stops_the_worker_processes(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            from apimeta.data.render import parallel_map
            from apimeta.runner import interrupts

            def slow(x):
                time.sleep(60)
                return x

            if __name__ == "__main__":
                try:
                    with interrupts():
                        parallel_map(slow, list(range(8)), workers=2)
                except KeyboardInterrupt:
                    raise SystemExit(143)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + 60
    kids: set[int] = set()
    while len(kids) < 2 and time.monotonic() < deadline:  # two workers (+ resource tracker)
        time.sleep(0.2)
        kids = _children(proc.pid)
    assert len(kids) >= 2, "the workers did not start"
    time.sleep(1.0)  # let them pick up their tasks
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    deadline = time.monotonic() + 10
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [k for k in kids if _alive(k)]
    for k in left:
        os.kill(k, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
