"""Benchmark ZO data recovery: forward vs central vs lowres at equal query budgets.

Trains a small Conv4 API on the procedural ``synthetic`` dataset (a few seconds), then runs
:func:`apimeta.recovery.recover` with the cpu-preset settings (docs/design.md 7: 50 iterations,
10 images per class, q = 10, mu = 0.005) for each estimator. Central differences use q/2
directions so every estimator costs B * (1 + q) queries per iteration. Reports fidelity (mean
API probability of the target class on the kept images), accuracy, queries, wall time and the
share of time spent inside API queries (the rest is mostly the generator's forward/backward).

    .venv/bin/python benchmarks/bench_recovery.py            # cpu preset, ~1-4 min on 1 thread
    .venv/bin/python benchmarks/bench_recovery.py --iters 20 --image-size 16 --api-width 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.data import load_dataset
from apimeta.models import build_backbone
from apimeta.recovery import WhiteBoxGradient, ZOGradient, recover
from apimeta.run_config import RecoveryConfig
from apimeta.seeding import make_generator
from apimeta.zo import ESTIMATORS


def train_api(
    image_size: int, width: int, seed: int, device: str
) -> tuple[torch.nn.Module, APIInfo]:
    """A 5-way Conv4 API on 5 synthetic classes (100 images, full-batch Adam, 30 steps)."""
    ds = load_dataset(
        "synthetic", n_classes=(5, 1, 1), per_class=20, image_size=image_size, seed=seed
    )
    tr = ds.split("train")
    x, y = tr.images.float().div(255).to(device), tr.labels.to(device)
    torch.manual_seed(seed)
    net = build_backbone(
        "conv4",
        num_classes=5,
        image_size=image_size,
        width=width,
        bn="standard",
        mean=ds.mean,
        std=ds.std,
    ).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
    info = APIInfo(
        "bench-conv4",
        "synthetic",
        tuple(range(5)),
        tuple(ds.class_names[:5]),
        3,
        image_size,
        mean=ds.mean,
        std=ds.std,
        tags={"train_acc": acc},
    )
    return net, info


class TimedAPI:
    """Forwards to a LocalAPI and accumulates the wall time spent in queries."""

    def __init__(self, api: LocalAPI):
        self.api, self.info, self.ledger, self.seconds = api, api.info, api.ledger, 0.0
        self.device = api.device

    def query(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        out = self.api.query(x)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--estimators", default="forward,central,lowres")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--q", type=int, default=10)
    p.add_argument("--mu", type=float, default=0.005)
    p.add_argument("--lowres", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--api-width", type=int, default=32)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--white-box", action="store_true", help="also run the white-box upper bound")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write results to this file")
    p.add_argument("--zoo", default=None, help="use an API of this zoo dir instead of training one")
    p.add_argument("--api-index", type=int, default=0, help="which zoo API (with --zoo)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    if a.zoo:
        from apimeta.apis.local import load_api_model
        from apimeta.apis.manifest import entry_info, read_manifest

        entry = read_manifest(a.zoo)["apis"][a.api_index]
        net, info = load_api_model(a.zoo, entry).to(a.device), entry_info(entry)
        print(
            f"API: {info.name} ({entry['arch']}, {info.image_size}px) from {a.zoo}, held-out "
            f"acc {entry.get('holdout_acc')} (threads={a.threads}, device={a.device})"
        )
    else:
        net, info = train_api(a.image_size, a.api_width, 0, a.device)
        print(
            f"API: conv4 width {a.api_width} at {a.image_size}px, train acc "
            f"{info.tags['train_acc']:.3f}, trained in {time.perf_counter() - t0:.1f}s "
            f"(threads={a.threads}, device={a.device})"
        )
    runs = [(name, False) for name in a.estimators.split(",") if name]
    if a.white_box:
        runs.append(("white-box", True))
    rows = []
    b = a.per_class * info.n_classes
    for name, wb in runs:
        for seed in range(a.seeds):
            kw: dict = {"q": a.q // 2 if name == "central" else a.q, "mu": a.mu}
            if name == "lowres":
                kw["lowres"] = a.lowres
            est = None if wb else ESTIMATORS.get(name)(**kw)
            api = TimedAPI(LocalAPI(net, info, QueryLedger()))
            t = time.perf_counter()
            r = recover(
                api,
                RecoveryConfig(per_class=a.per_class, iters=a.iters),
                rng=make_generator(seed, "bench-recovery"),
                gradient=WhiteBoxGradient(net) if wb else ZOGradient(est),
            )
            if a.device != "cpu":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            row = {
                "estimator": name,
                "seed": seed,
                "q": kw["q"],
                "fidelity": r.fidelity,
                "accuracy": r.accuracy,
                "queries": r.queries,
                "per_iter": (r.queries - b) // max(r.iters, 1),
                "wall_s": wall,
                "api_s": api.seconds,
                "loss_first": r.loss_curve[0],
                "loss_min": min(r.loss_curve),
                "best_iter": r.best_iter,
            }
            rows.append(row)
            print(
                f"{name:9s} seed {seed} q={row['q']:3d}  fidelity {r.fidelity:.3f}  acc "
                f"{r.accuracy:.3f}  queries {r.queries:7d}  wall {wall:6.1f}s  "
                f"(API {api.seconds:5.1f}s)  loss {row['loss_first']:.3f} -> {row['loss_min']:.3f}"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
