"""Screen: MAML on pseudo-classes the APIs select from a pool of candidates (one query each).

Each API of a zoo labels ``PER_API`` candidate images once. Every image goes to its API's top
class; each class of the union (a column, as in ``bbkd``) keeps the ``KEEP`` images its API is
surest of. MAML (the ``cpu`` preset's inner loop, meta-batch and outer lr) then trains on
N-way tasks drawn over those pseudo-classes, exactly as ``maml-zoo`` trains on the owners'
classes. Sources:

- ``dead-leaves`` (or any name of :data:`apimeta.candidates.SOURCES`): data-free;
- ``folder:PATH``: a folder of unlabelled images (NOT data-free, e.g. emoji of the classes
  outside the zoo from ``benchmarks/public_folder.py``);
- ``real-zoo``: the owners' own images with their true labels (``maml-zoo``'s data; the
  script's ceiling, no queries).

Usage: python benchmarks/select_maml.py SOURCE PER_API STEPS [SEED] [ZOO] [EVAL_AT] [KEEP]
Prints, per evaluation point, the meta-val means (100 tasks, 1/5-shot) at lr 0.1 per head start
(learned, random) and ``eval.reinit`` (0, 2). Environment: ``INIT=CHECKPOINT`` starts MAML from a
run's weights (e.g. the default's ``best.pt``: distillation, then episodic training) and scores
it first (step 0).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from apimeta.apis.ledger import QueryLedger
from apimeta.apis.runtime import load_run_apis
from apimeta.candidates import FOLDER, draw_candidates
from apimeta.checkpoint import load_checkpoint
from apimeta.episodes import TaskSampler
from apimeta.losses import output_kind, teacher_probs
from apimeta.maml import maml_outer_loss
from apimeta.models.meta import load_init, load_run_datasets

sys.path.insert(0, "benchmarks")
from surrogate_kd import meta_val, screen_config


def select(scores: torch.Tensor, cols: torch.Tensor, keep: int) -> torch.Tensor:
    """(N,) pseudo-label per image (-1 = dropped): its API's top column, kept when it is among
    the ``keep`` images of that column with the highest probability. ``scores``: (N,) top
    probability; ``cols``: (N,) top column."""
    label = torch.full_like(cols, -1)
    for c in cols.unique():
        idx = torch.nonzero(cols == c).flatten()
        best = idx[scores[idx].argsort(descending=True)[:keep]]
        label[best] = c
    return label


def main(source: str, per_api: int, steps: int, seed: int = 2022,
         zoo: str = "runs/zoos/emoji-conv4", eval_at: str = "", keep: int = 20) -> None:  # fmt: skip
    torch.set_num_threads(1)
    cfg = screen_config(seed, zoo)
    datasets = load_run_datasets(cfg)
    ds = datasets[0]
    model = load_init(None, cfg, datasets)
    if os.environ.get("INIT"):
        model.load_state_dict(load_checkpoint(os.environ["INIT"])["model"])
    ledger = QueryLedger(None)
    apis = load_run_apis(cfg, ledger)
    g = torch.Generator().manual_seed(seed)
    keys = sorted({(a.info.dataset, int(c)) for a in apis for c in a.info.classes})
    column = {k: i for i, k in enumerate(keys)}
    t0 = time.time()
    if source == "real-zoo":
        train = ds.split("train")
        mask = torch.isin(train.labels, torch.tensor([k[1] for k in keys]))
        images, labels = train.images[mask], train.labels[mask]
    else:
        xs, scores, cols = [], [], []
        name, folder = (FOLDER, source[7:]) if source.startswith("folder:") else (source, None)
        for a in apis:
            x = draw_candidates(name, per_api, cfg.image_size, 3, g, folder=folder)
            p = teacher_probs(a.query(x), 1.0, output_kind(a.info.output) != "logits")
            top, arg = p.max(1)
            own = torch.tensor([column[(a.info.dataset, int(c))] for c in a.info.classes])
            xs.append((x * 255).round().to(torch.uint8))
            scores.append(top)
            cols.append(own[arg])
        label = select(torch.cat(scores), torch.cat(cols), keep)
        ok = label >= 0
        images, labels = torch.cat(xs)[ok], label[ok]
        conf = torch.cat(scores)[ok].mean()
        print(f"mean top probability of the kept images {100 * float(conf):.1f}%", flush=True)
    counts = torch.unique(labels, return_counts=True)[1]
    print(f"{source}: {len(images)} images in {len(counts)} pseudo-classes (median "
          f"{int(counts.median())} per class), {ledger.used} queries, {time.time() - t0:.0f}s",
          flush=True)  # fmt: skip
    sampler = TaskSampler(images, labels, cfg.way, cfg.shot, cfg.query, g)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.outer_lr)
    points = sorted({int(v) for v in eval_at.split(",") if v} | {steps})
    grid = {"reinits": (0, 2), "lrs": (0.1,), "heads": ("learned", "random")}
    if os.environ.get("INIT"):
        print(f"step 0 (the init): {meta_val(model, ds, cfg, **grid)}", flush=True)
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = torch.zeros(())
        for _ in range(cfg.meta_batch):
            res = maml_outer_loss(
                model, None, sampler.sample(), steps=cfg.inner_steps, lr=cfg.inner_lr
            )
            loss = loss + res.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in points:
            print(f"step {step} ({time.time() - t0:.0f}s train): {meta_val(model, ds, cfg, **grid)}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), *(int(a[3]),) if len(a) > 3 else (), *a[4:6],
         *(int(a[6]),) if len(a) > 6 else ())  # fmt: skip
