"""The prepared GPU check of the speed issue: one script, one short run on a lent accelerator.

    .venv/bin/python benchmarks/gpu_check.py --device cuda [--out /tmp/gpu-check] [--skip-paper]

Measures, on ``--device``:

1. the raw forward of a Conv4 API (width 32, 32 px, eval, no grad) in images/s, at batch 1,000;
2. one ``cpu``-preset recovery (B = 50, 50 iterations, lowres q = 10) through ``LocalAPI``: images
   sent per second, as a ratio of (1);
3. one memory MAML meta-update of the meta-model (5-way 1-shot 15-query, 5 inner steps, second
   order, forward + backward);
4. the first meta-update of a ``cpu``-preset and of a ``paper``-preset run on a 2-API emoji zoo
   built on the device: that update is an API event (its ``step_time`` from ``metrics.jsonl``,
   queries from the ledger).

Timings synchronize the device around each measured call. It prints the GPU's name and a JSON
line with every number, for BENCHMARKS.md. It runs on CPU too (``--device cpu --skip-paper``),
which is how it is checked on machines without a GPU; it is never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench_speed import random_episode  # benchmarks/ is on sys.path when run as a script

from apimeta.apis import APIInfo, LocalAPI, QueryLedger, build_zoo
from apimeta.config import from_dict
from apimeta.maml import maml_outer_loss
from apimeta.models import build_backbone
from apimeta.recovery import ZOGradient, recover
from apimeta.run_config import RecoveryConfig, RunConfig, ZOConfig, base_config
from apimeta.runner import train
from apimeta.zo import build_estimator

INFO = APIInfo("gpu", "synthetic", (0, 1, 2, 3, 4), tuple("abcde"), 3, 32)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, reps: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def api_model(dev: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_backbone(
        "conv4", num_classes=5, width=32, bn="standard", mean=[0.5] * 3, std=[0.25] * 3
    )
    return m.eval().to(dev)


def raw_forward(dev: torch.device) -> float:
    model = api_model(dev).to(memory_format=torch.channels_last)
    x = torch.rand(1000, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        with torch.no_grad():
            model(x)

    return 1000 / timed(run, dev)


def recovery_rate(dev: torch.device) -> dict:
    api = LocalAPI(api_model(dev), INFO, QueryLedger())
    cfg = RecoveryConfig(per_class=10, iters=50, nz=256, ngf=32, early_stop_prob=None)
    est = build_estimator(ZOConfig(estimator="lowres", lowres=8, q=10, mu=0.005))
    box = {}

    def run() -> None:
        g = torch.Generator().manual_seed(3)  # the run's CPU generator, as in training
        box["r"] = recover(api, cfg, rng=g, gradient=ZOGradient(est), device=dev)

    s = timed(run, dev, reps=2)
    return {"recovery_s": s, "recovery_images_per_s": box["r"].queries / s}


def meta_update(dev: torch.device) -> float:
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=32, bn="transductive").to(dev)
    ep = random_episode().to(dev)

    def run() -> None:
        model.zero_grad(set_to_none=True)
        maml_outer_loss(model, None, ep, steps=5, lr=0.01).loss.backward()

    return timed(run, dev, reps=5)


def first_update(preset: str, zoo: Path, out: Path, device: str) -> dict:
    # bidf-mkd, whose first update is a generator recovery (the cpu preset's own method is a
    # bbkd variant without a generator)
    sets = ["method=bidf-mkd", f"device={device}", f"zoo={zoo}", f"out={out / preset}"]
    data = base_config(preset, sets)
    data["episodes"] = data["meta_batch"]  # one meta-update: it starts with an API event
    data["eval"]["tasks"] = data["eval"]["test_tasks"] = 5
    cfg = from_dict(RunConfig, data)
    t0 = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / preset / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("phase") == "train")
    return {
        "step_time_s": first["step_time"],
        "queries": first["queries"],
        "api_events": first.get("api_events"),
        "run_wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--skip-paper", action="store_true", help="only the cpu preset's event")
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    res: dict = {"device": name}
    res["raw_conv4_images_per_s"] = raw_forward(dev)
    res.update(recovery_rate(dev))
    res["recovery_share_of_raw"] = res["recovery_images_per_s"] / res["raw_conv4_images_per_s"]
    res["meta_update_s"] = meta_update(dev)
    print(json.dumps(res), flush=True)
    zoo = args.out / "zoo"
    build_zoo(["emoji"], 2, ["conv4"], 5, zoo, seed=2022, device=args.device)
    res["event_cpu_preset"] = first_update("cpu", zoo, args.out, args.device)
    print(json.dumps(res), flush=True)
    if not args.skip_paper:
        res["event_paper_preset"] = first_update("paper", zoo, args.out, args.device)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
