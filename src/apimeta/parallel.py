"""Running independent jobs in parallel: in this process, in a local process pool, or on Ray.

The stages that fan out (zoo build: one job per API; evaluation: one job per shard of tasks;
bench: one job per cell) describe their work as a picklable function and a list of job
arguments and hand it to a :class:`Backend`:

* ``inline`` (``workers <= 1``): in this process, in order;
* ``process`` (``workers > 1``, the default when parallel): spawned worker processes, one torch
  thread each;
* ``ray`` (``--ray`` starts a local Ray, ``--ray-address ADDR`` joins a cluster): one Ray task
  per job, each asking for one CPU. Ray is an optional extra (``pip install apimeta[ray]``).

Data every job needs (a model's weights, a dataset split) is passed once as ``shared``: the
process pool sends it to each worker once (the pool initializer), Ray puts it in its object
store once. ``fn(shared, *args)`` runs in the worker. A job's result depends only on its
arguments, so every backend gives the same numbers (each job sets one torch thread, so float
rounding matches a 1-thread sequential run).

An interrupt (Ctrl-C, or SIGTERM mapped to ``KeyboardInterrupt``) cancels what has not started
and stops the workers; what already finished has been handed to the caller.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from apimeta.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("inline", "process", "ray")
RAY_HINT = "Ray is an optional extra: pip install 'apimeta[ray]' (with -c constraints.txt)"

_SHARED: Any = None  # a process-pool worker's copy of the shared data


@dataclass(frozen=True)
class Backend:
    """Where parallel jobs run: ``kind`` in :data:`BACKENDS`, ``workers`` processes at most
    (Ray: tasks in flight; ``0`` = as many as the cluster has CPUs), ``address`` the Ray
    cluster to join (``None``: start a local Ray)."""

    kind: str = "inline"
    workers: int = 1
    address: str | None = None

    @property
    def parallel(self) -> bool:
        return self.kind != "inline"

    def describe(self) -> str:
        if self.kind == "ray":
            where = self.address or "local"
            return f"Ray ({where}, {self.workers or 'all'} CPUs)"
        return f"{self.workers} worker processes" if self.kind == "process" else "this process"


def make_backend(
    workers: int | None = 1, *, ray: bool = False, ray_address: str | None = None
) -> Backend:
    """The backend the CLI flags ask for: ``--ray``/``--ray-address`` -> Ray; else ``workers``
    > 1 -> a local process pool; else inline. ``workers=None``: one per CPU (at most 8)."""
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if ray or ray_address:
        ray_module()  # fail early, with the install hint
        return Backend("ray", int(workers or 0), ray_address)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    return Backend("process", workers) if workers > 1 else Backend("inline", 1)


def ray_module() -> Any:
    """``import ray``, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray needs Ray, which is not installed. {RAY_HINT}") from None
    return ray


def ensure_ray(backend: Backend) -> Any:
    """Start a local Ray (``workers`` CPUs) or join ``backend.address``, once per process."""
    ray = ray_module()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": False,
        }
        if backend.address:
            ray.init(address=backend.address, **kwargs)
        else:
            ncpu = backend.workers or os.cpu_count() or 1
            # a small object store: jobs ship weights and splits, not datasets of GBs
            ray.init(num_cpus=ncpu, object_store_memory=200 * 1024**2, **kwargs)
        log.info("Ray: %s", ray.cluster_resources())
    return ray


def _pool_init(shared: Any) -> None:
    global _SHARED
    torch.set_num_threads(1)
    _SHARED = shared


def _pool_job(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(_SHARED, *args)


def _ray_job(fn: Callable[..., Any], shared: Any, args: tuple) -> Any:
    torch.set_num_threads(1)
    return fn(shared, *args)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    backend: Backend,
    *,
    shared: Any = None,
) -> Iterator[tuple[int, Any]]:
    """Yield ``(i, fn(shared, *jobs[i]))`` as jobs finish (any order when parallel, in order
    inline). ``fn`` must be picklable (a module-level function). A job that raises stops the
    others and re-raises here."""
    jobs = [tuple(j) for j in jobs]
    if not jobs:
        return
    if backend.kind == "inline" or (backend.kind == "process" and len(jobs) == 1):
        for i, args in enumerate(jobs):
            yield i, fn(shared, *args)
    elif backend.kind == "process":
        yield from _run_pool(fn, jobs, backend, shared)
    elif backend.kind == "ray":
        yield from _run_ray(fn, jobs, backend, shared)
    else:
        raise ConfigError(f"unknown parallel backend {backend.kind!r}; use one of {BACKENDS}")


def _run_pool(
    fn: Callable[..., Any], jobs: list[tuple], backend: Backend, shared: Any
) -> Iterator[tuple[int, Any]]:
    workers = min(backend.workers, len(jobs))
    ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch threads
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init, initargs=(shared,))
    try:
        pending = {ex.submit(_pool_job, fn, args): i for i, args in enumerate(jobs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                i = pending.pop(f)
                yield i, f.result()
    except BaseException:
        stop_pool(ex)
        raise
    ex.shutdown(wait=True)


def _run_ray(
    fn: Callable[..., Any], jobs: list[tuple], backend: Backend, shared: Any
) -> Iterator[tuple[int, Any]]:
    ray = ensure_ray(backend)
    remote = ray.remote(num_cpus=1, max_retries=0)(_ray_job)
    shared_ref = ray.put(shared)  # shipped once, read by every job
    fn_ref = ray.put(fn)
    limit = backend.workers or len(jobs)
    todo = list(enumerate(jobs))[::-1]
    pending: dict[Any, int] = {}
    try:
        while todo or pending:
            while todo and len(pending) < limit:
                i, args = todo.pop()
                pending[remote.remote(fn_ref, shared_ref, args)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                yield i, ray.get(ref)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def stop_pool(ex: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the worker processes (an interrupt)."""
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


__all__ = [
    "BACKENDS",
    "RAY_HINT",
    "Backend",
    "ensure_ray",
    "make_backend",
    "ray_module",
    "run_jobs",
    "stop_pool",
]
