"""Screen the meta-test head options on META-VAL (never meta-test) for some checkpoints.

    APIMETA_HOME=... .venv/bin/python benchmarks/screen_heads.py CKPT [CKPT ...] [--random]
        [--dataset emoji] [--tasks 100] [--steps 10] [--lr 0.01]

Prints one line per (checkpoint, head) with the meta-val 1- and 5-shot means, and writes them to
``heads.json`` in the working directory.
"""

from __future__ import annotations

import argparse
import json

import torch

from apimeta.data import load_dataset
from apimeta.evaluate import HEADS, evaluate
from apimeta.models.meta import load_init, load_meta_model
from apimeta.run_config import RunConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*")
    ap.add_argument("--random", action="store_true", help="also the seeded random init")
    ap.add_argument("--dataset", default="emoji")
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, image_size=32)
    models = {c: load_meta_model(c)[0] for c in args.checkpoints}
    if args.random:
        models["random"] = load_init("random", RunConfig(dataset=args.dataset), [ds])
    out = {}
    for name, model in models.items():
        for head in HEADS:
            res = evaluate(model, ds, split="val", shots=(1, 5), tasks=args.tasks,
                           steps=args.steps, lr=args.lr, head=head)  # fmt: skip
            out[f"{name}:{head}"] = {k: v["mean"] for k, v in res.items()}
            print(name, head, {k: round(v["mean"], 2) for k, v in res.items()}, flush=True)
    with open("heads.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
