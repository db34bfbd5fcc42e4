"""Screen: interpolate a trained init back toward the random init it started from.

init(a) = a * trained + (1 - a) * random (every parameter; a = 1 is the trained init, a = 0 the
seeded random init of the run's own config, which is where training started). Prints meta-val
means (1/5-shot, ``eval.tasks`` tasks) per a and fine-tuning lr, so a and lr can be chosen on
meta-val like ``bench --tune``.

Usage: python benchmarks/interpolate_init.py ALPHAS LRS RUN_DIR [RUN_DIR ...]
e.g.   python benchmarks/interpolate_init.py 0,0.25,0.5,1 0.01,0.1 runs/rebase300/SS/bidf-mkd/seed-*
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from apimeta.evaluate import evaluate_with_config, with_protocol
from apimeta.maml import named_params
from apimeta.models.meta import load_init, load_run_datasets
from apimeta.run_config import load_run_config


def block_of(name: str) -> str:
    """``net.features.4.weight`` -> ``"1"`` (Conv4: conv, BN, ReLU, pool per block); head."""
    if ".classifier." in name:
        return "head"
    return str(int(name.split(".features.")[1].split(".")[0]) // 4)


def mix(spec: str, name: str, trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    if spec.startswith("blocks:"):
        return trained if block_of(name) in spec[len("blocks:") :].split("+") else start
    a = float(spec)
    return a * trained + (1 - a) * start


def main(alphas: str, lrs: str, *runs: str) -> None:
    torch.set_num_threads(1)
    for run in runs:
        cfg = load_run_config(Path(run) / "config.yaml")
        datasets = load_run_datasets(cfg)
        trained = load_init(Path(run) / "best.pt", cfg)
        start = {
            n: p.detach().clone() for n, p in named_params(load_init(None, cfg, datasets)).items()
        }
        end = {n: p.detach().clone() for n, p in named_params(trained).items()}
        for spec in alphas.split(","):
            with torch.no_grad():
                for n, p in named_params(trained).items():
                    p.copy_(mix(spec, n, end[n], start[n]))
            for lr in [float(v) for v in lrs.split(",")]:
                res = evaluate_with_config(
                    trained, datasets[0], with_protocol(cfg, {"lr": lr}), split="val",
                    shots=(1, 5), tasks=cfg.eval.tasks,
                )  # fmt: skip
                print(f"{run} a={spec} lr={lr:g}: "
                      f"{res['1-shot']['mean']:.2f}/{res['5-shot']['mean']:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
