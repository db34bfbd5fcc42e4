"""Scale check for ``recovery.diversity``: one ``cpu``-preset recovery from each of the first
three APIs of a zoo per weight, with the diversity term in the learner's feature space or in
pixels; prints fidelity, within-class diversity (features of INIT, pixels) and queries.

Usage: python benchmarks/diversity_scale.py INIT|random WEIGHTS [features|pixels] [ZOO]
e.g.   python benchmarks/diversity_scale.py runs/screen-aug/SS/bidf-mkd/seed-2022/best.pt 0,1,10
"""

from __future__ import annotations

import sys
import time

import torch

from apimeta.apis.ledger import QueryLedger
from apimeta.apis.runtime import load_run_apis
from apimeta.config import from_dict
from apimeta.evaluate import head_features
from apimeta.maml import named_params
from apimeta.memory import within_class_diversity
from apimeta.models.meta import load_init, load_run_datasets
from apimeta.recovery import ZOGradient, recover
from apimeta.run_config import RunConfig, base_config
from apimeta.transforms import resize
from apimeta.zo import build_estimator


def main(init: str, weights: str, space: str = "features", zoo: str = "runs/zoos/emoji-conv4"):
    torch.set_num_threads(1)
    cfg = from_dict(RunConfig, {**base_config("cpu", []), "zoo": zoo, "dataset": "emoji"})
    model = load_init(None if init == "random" else init, cfg, load_run_datasets(cfg))
    params = {n: p.detach() for n, p in named_params(model).items()}
    apis = load_run_apis(cfg, QueryLedger(None))

    def feats(x: torch.Tensor) -> torch.Tensor:
        return head_features(model, params, resize(x, cfg.image_size))

    for w in [float(v) for v in weights.split(",")]:
        for api in apis[:3]:

            def term(x: torch.Tensor, t: torch.Tensor, w: float = w) -> torch.Tensor:
                return -w * within_class_diversity(x if space == "pixels" else feats(x), t)

            t0, used0 = time.time(), api.ledger.used
            r = recover(api, cfg.recovery, rng=torch.Generator().manual_seed(0),
                        gradient=ZOGradient(build_estimator(cfg.zo)),
                        regularizer=term if w > 0 else None, final_query=True)  # fmt: skip
            with torch.no_grad():
                fd = float(within_class_diversity(feats(r.images), r.targets))
            pd = float(within_class_diversity(r.images, r.targets))
            print(
                f"{space} w={w:g} {api.info.name} fidelity={r.fidelity:.3f} "
                f"div_features={fd:.3f} div_pixels={pd:.3f} iters={r.iters} "
                f"queries={api.ledger.used - used0} {time.time() - t0:.1f}s",
                flush=True,
            )


if __name__ == "__main__":
    main(*sys.argv[1:])
