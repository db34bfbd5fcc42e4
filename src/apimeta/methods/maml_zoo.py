"""``maml-zoo``: the oracle of a zoo — MAML on the REAL meta-train images of exactly the classes
the zoo's APIs predict (what the API owners trained on), nothing else.

The upper bound of any data-free learner on that zoo: it has the owners' data, which a
data-free method can at best recover. The zoo is read (its manifest, description or model
metadata), never queried. Training is :class:`~apimeta.methods.maml_real.MAMLReal` on the
restricted pool; every meta-val / meta-test task is the shared protocol's.
"""

from __future__ import annotations

import torch

from apimeta.episodes import TaskSampler
from apimeta.errors import ConfigError
from apimeta.methods.interface import METHODS
from apimeta.methods.maml_real import MAMLReal


@METHODS.register("maml-zoo")
class MAMLZoo(MAMLReal):
    """MAML on the real images of the zoo's classes (train split): the zoo's ceiling."""

    name = "maml-zoo"
    uses_zoo = True

    def setup(self) -> None:
        from apimeta.apis.runtime import http_client_options
        from apimeta.apis.sources import served_over_http, zoo_classes

        cfg = self.cfg
        if not cfg.zoo:
            raise ConfigError("maml-zoo trains on the classes of a zoo: pass --zoo DIR or URL")
        opts = http_client_options(cfg) if served_over_http(cfg.zoo) else {}
        classes = zoo_classes(cfg.zoo, **opts)
        self.samplers: list[TaskSampler] = []
        self.oracle_classes: dict[str, list[int]] = {}
        for ds in self.datasets:
            keep = classes.get(ds.name)
            if not keep:
                continue
            split = ds.split("train")
            missing = sorted(set(keep) - set(split.classes))
            if missing:
                raise ConfigError(
                    f"the zoo's {ds.name} classes {missing[:5]} are not meta-train classes of "
                    f"{ds.name} at this image size; was the zoo built on another split?"
                )
            if len(keep) < cfg.way:
                raise ConfigError(
                    f"the zoo covers {len(keep)} {ds.name} classes; a {cfg.way}-way task needs "
                    f"{cfg.way}"
                )
            mask = torch.isin(split.labels, torch.tensor(keep))
            self.oracle_classes[ds.name] = keep
            self.samplers.append(
                TaskSampler(
                    split.images[mask],
                    split.labels[mask],
                    cfg.way,
                    cfg.shot,
                    cfg.query,
                    self.rng("tasks", ds.name),
                )
            )
        if not self.samplers:
            raise ConfigError(
                f"the zoo's APIs cover datasets {sorted(classes)}, none of the run's "
                f"{cfg.dataset_names}; pass --dataset {','.join(sorted(classes))}"
            )
        self.pick = self.rng("dataset-choice")
