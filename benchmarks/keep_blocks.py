"""Screen: keep some Conv4 blocks of a trained state_dict, take the rest from the random init.

For the checkpoints that ``benchmarks/surrogate_kd.py`` saves (``SAVE-stepN.pt``, a meta-model
state_dict): each spec ``blocks:0+1`` keeps those blocks (or ``head``) of the trained model and
takes every other parameter from the seeded random init of the same seed (where the screen
started). Prints meta-val means (100 tasks, 1/5-shot) per fine-tuning lr (0.01, 0.1) and head
start (zero, random), as ``surrogate_kd.py`` does.

Usage: python benchmarks/keep_blocks.py SEED STATE_DICT SPECS [ZOO]
e.g.   python benchmarks/keep_blocks.py 2022 runs/surrogate/dl1000-2022-step2000.pt blocks:0+1,blocks:0
"""

from __future__ import annotations

import sys

import torch
from interpolate_init import mix
from surrogate_kd import meta_val, screen_config

from apimeta.models.meta import load_init, load_run_datasets


def main(seed: str, path: str, specs: str, zoo: str = "runs/zoos/emoji-conv4") -> None:
    torch.set_num_threads(1)
    cfg = screen_config(int(seed), zoo)
    datasets = load_run_datasets(cfg)
    start = load_init(None, cfg, datasets).state_dict()
    trained = torch.load(path, weights_only=True)
    for spec in specs.split(","):
        model = load_init(None, cfg, datasets)
        model.load_state_dict(
            {
                k: mix(spec, k, v, start[k]) if k.startswith("net.") else v
                for k, v in trained.items()
            }
        )
        print(f"{spec}: {meta_val(model, datasets[0], cfg)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
