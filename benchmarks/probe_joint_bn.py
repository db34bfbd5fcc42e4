"""Meta-val probe: fine-tune with batch-norm statistics of support and query together.

    python benchmarks/probe_joint_bn.py RUN_DIR/config.yaml NAME=CHECKPOINT|random [...]

The evaluation protocol fine-tunes on the support set alone (its batch statistics: 5 images at
5-way 1-shot) and classifies the query set in its own batch (75 images). Here each fine-tuning
step and the final prediction forward support and query in one batch (the loss on the support
rows only), so both are normalized alike, as in training batches of 80 images. Prints one JSON
line per init x ``reinit`` x shot x head: the meta-val mean (100 tasks of the run's dataset, the
bench's tuning tasks) of the separate statistics (the library's protocol, lr 0.1, 10 steps) and
of the joint ones. Meta-test is not read.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from apimeta.evaluate import _init_params, adapt_and_score, reinit_stages, start_head, task_list
from apimeta.maml import functional_forward
from apimeta.models.meta import load_init, load_run_datasets
from apimeta.run_config import load_run_config

STEPS, LR, TASKS = 10, 0.1, 100


def joint_score(model, init, ep, head: str) -> float:
    """Query accuracy in % after fine-tuning with support+query batch statistics."""
    p = {n: v.detach().requires_grad_(True) for n, v in start_head(model, init, ep, head).items()}
    s = ep.support_x.shape[0]
    x = torch.cat([ep.support_x, ep.query_x])
    for _ in range(STEPS):
        loss = F.cross_entropy(functional_forward(model, p, x)[:s], ep.support_y)
        grads = torch.autograd.grad(loss, list(p.values()))
        p = {
            n: (v - LR * g).detach().requires_grad_(True)
            for (n, v), g in zip(p.items(), grads, strict=True)
        }
    with torch.no_grad():
        q = functional_forward(model, p, x)[s:]
    return float((q.argmax(1) == ep.query_y).float().mean()) * 100


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_run_config(sys.argv[1])
    ds = load_run_datasets(cfg)[0]
    for name, path in (a.split("=", 1) for a in sys.argv[2:]):
        base = load_init(None if path == "random" else path, cfg, [ds])
        for reinit in (0, 2):
            model = reinit_stages(base, reinit).eval()
            init = _init_params(model, False)
            for shot in (1, 5):
                for head in ("learned", "random"):
                    sep, joint = [], []
                    for ep in task_list(ds, split="val", shot=shot, tasks=TASKS):
                        kw = {"steps": STEPS, "lr": LR, "head": head}
                        sep.append(adapt_and_score(model, init, ep, **kw) * 100)
                        joint.append(joint_score(model, init, ep, head))
                    row = {"row": name, "reinit": reinit, "shot": shot, "head": head}
                    row |= {"separate": sum(sep) / TASKS, "joint": sum(joint) / TASKS}
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
