"""CPU speed of the hot paths, before vs after (issue: speed), as ratios measured in one run.

    .venv/bin/python benchmarks/bench_speed.py [--reps 5] [--threads 1] [--part api,recovery,maml]

* ``api``: one LocalAPI query of 550 images (a ``cpu``-preset ZO iteration: (1 + q) x B with
  q = 10, B = 50) on a Conv4 API (width 32, as `zoo build` makes them): NCHW in one forward (the
  old path) vs channels_last in chunks of 50 / 128 / 200 / 550.
* ``recovery``: one ``cpu``-preset recovery (50 iterations, 50 images, lowres ZO, q = 10, no
  early stop) from that API, old vs new LocalAPI; equal images up to float rounding.
* ``compile``: ``recovery.compile`` (the reused generator under ``torch.compile``) vs eager, and
  what the first compiled recovery costs.
* ``maml``: one memory MAML step of the meta-model (Conv4 width 32, 5-way 1-shot 15-query,
  5 inner steps, second order, forward + backward), contiguous vs channels_last parameters.

Timings are medians over interleaved repetitions (the order alternates), CPU time of this
process (``time.process_time``) next to wall time; ratios are old / new.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.episodes import Episode
from apimeta.maml import maml_outer_loss
from apimeta.models import build_backbone
from apimeta.recovery import ZOGradient, recover
from apimeta.run_config import RecoveryConfig, ZOConfig
from apimeta.zo import build_estimator

INFO = APIInfo("bench", "synthetic", (0, 1, 2, 3, 4), tuple("abcde"), 3, 32)


def api_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(
        "conv4", num_classes=5, width=32, bn="standard", mean=[0.5] * 3, std=[0.25] * 3
    ).eval()


def random_episode(seed: int = 2) -> Episode:
    """A 5-way 1-shot 15-query episode of random 32-px images."""
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(5, 3, 32, 32, generator=g),
        torch.arange(5),
        torch.rand(75, 3, 32, 32, generator=g),
        torch.arange(5).repeat_interleave(15),
        (0, 1, 2, 3, 4),
    )


def timed(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) per name, repetitions interleaved with alternating order."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in names}


def report(title: str, res: dict[str, tuple[float, float]], base: str) -> None:
    print(f"\n{title}\n\n| variant | wall ms | CPU ms | speed-up (CPU) |\n|---|---|---|---|")
    for k, (w, c) in res.items():
        print(f"| {k} | {1000 * w:.1f} | {1000 * c:.1f} | {res[base][1] / c:.2f}x |")


def part_api(reps: int) -> None:
    x = torch.rand(550, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    old = LocalAPI(api_model(), INFO, QueryLedger(), channels_last=False, chunk=4096)
    fns = {"NCHW, one forward (old)": lambda: old.query(x)}
    for chunk in (25, 50, 64, 100, 128, 200, 550):
        api = LocalAPI(api_model(), INFO, QueryLedger(), chunk=chunk)
        fns[f"channels_last, chunks of {chunk}"] = lambda api=api: api.query(x)
    new = LocalAPI(api_model(), INFO, QueryLedger())
    diff = (new.query(x) - old.query(x)).abs().max()
    report(
        f"API forward, 550 images (max |difference| {diff:.1e})", timed(fns, reps), next(iter(fns))
    )


def part_recovery(reps: int) -> None:
    cfg = RecoveryConfig(per_class=10, iters=50, nz=256, ngf=32, early_stop_prob=None)
    est = build_estimator(ZOConfig(estimator="lowres", lowres=8, q=10, mu=0.005))

    def run(api: LocalAPI) -> torch.Tensor:
        gen = torch.Generator().manual_seed(3)
        return recover(api, cfg, rng=gen, gradient=ZOGradient(est)).images

    old = LocalAPI(api_model(), INFO, QueryLedger(), channels_last=False, chunk=4096)
    new = LocalAPI(api_model(), INFO, QueryLedger())
    diff = (run(old) - run(new)).abs().max()
    res = timed({"old LocalAPI": lambda: run(old), "new LocalAPI": lambda: run(new)}, reps)
    report(f"One cpu-preset recovery (max |image difference| {diff:.1e})", res, "old LocalAPI")


def part_maml(reps: int) -> None:
    ep = random_episode()

    def model(cl: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        m = build_backbone("conv4", num_classes=5, width=32, bn="transductive")
        return m.to(memory_format=torch.channels_last) if cl else m

    def step(m: torch.nn.Module, cl: bool | str) -> None:
        e = ep
        if cl and cl != "weights":
            e = Episode(
                ep.support_x.contiguous(memory_format=torch.channels_last),
                ep.support_y,
                ep.query_x.contiguous(memory_format=torch.channels_last),
                ep.query_y,
                ep.class_ids,
            )
        m.zero_grad(set_to_none=True)
        maml_outer_loss(m, None, e, steps=5, lr=0.01).loss.backward()

    a, b, w = model(False), model(True), model(True)
    step(a, False)
    step(b, True)
    diff = max(
        (pa.grad - pb.grad).abs().max().item()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )
    res = timed(
        {
            "contiguous (old)": lambda: step(a, False),
            "channels_last weights and inputs": lambda: step(b, True),
            "channels_last weights only": lambda: step(w, "weights"),
        },
        reps,
    )
    report(f"Memory MAML step (max |meta-gradient difference| {diff:.1e})", res, "contiguous (old)")


def part_compile(reps: int) -> None:
    """recovery.compile: the first compiled recovery (compilation included) and the later ones,
    against eager recoveries of the same (reused) generator."""
    cfg = RecoveryConfig(per_class=10, iters=50, nz=256, ngf=32, early_stop_prob=None)
    est = build_estimator(ZOConfig(estimator="lowres", lowres=8, q=10, mu=0.005))
    api = LocalAPI(api_model(), INFO, QueryLedger())

    def run(compile_: bool) -> torch.Tensor:
        c = dataclasses.replace(cfg, compile=compile_)
        gen = torch.Generator().manual_seed(3)
        return recover(api, c, rng=gen, gradient=ZOGradient(est)).images

    t0 = time.perf_counter()
    first = run(True)
    first_s = time.perf_counter() - t0
    diff = (first - run(False)).abs().max()
    res = timed({"eager": lambda: run(False), "compiled": lambda: run(True)}, reps)
    report(
        f"One cpu-preset recovery, eager vs torch.compile (first compiled call, compilation "
        f"included: {first_s:.1f} s wall; max |image difference| {diff:.1e})",
        res,
        "eager",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", default="api,recovery,maml")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    parts = {
        "api": part_api,
        "recovery": part_recovery,
        "maml": part_maml,
        "compile": part_compile,
    }
    for name in args.part.split(","):
        parts[name](args.reps)


if __name__ == "__main__":
    main()
