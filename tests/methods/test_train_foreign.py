"""A short bidf-mkd run on other people's APIs: a third-party v2 server (other tensor names, no
apimeta metadata, probabilities, flat input in [0, 255]) used through a description file."""

from __future__ import annotations

import yaml

from apimeta.methods import METHODS
from apimeta.run_config import MemoryConfig, ZOConfig
from apimeta.runs import RunDir
from apimeta.testing import UvicornThread, foreign_v2_app, make_config, tiny_model


def test_train_on_a_described_third_party_server(tmp_path):
    models = {"alpha": tiny_model(0), "beta": tiny_model(1)}
    app = foreign_v2_app(models, 3, 32)
    with UvicornThread(app) as srv:
        desc = tmp_path / "apis.yaml"
        desc.write_text(
            yaml.safe_dump(
                {
                    "source": srv.url,
                    "dataset": "synthetic",
                    "output": "probs",
                    "layout": "flat",
                    "channels": 3,
                    "input_range": [0, 255],
                    "output_name": "probabilities",
                    "models": {
                        "alpha": {"classes": [f"class{c:03d}" for c in range(0, 5)]},
                        "beta": {"classes": [3, 4, 5, 6, 7]},
                    },
                }
            )
        )
        cfg = make_config(
            method="bidf-mkd",
            dataset="synthetic",
            zoo=str(desc),
            width=8,
            way=5,
            shot=1,
            query=3,
            episodes=2,
            meta_batch=1,
            nz=16,
            ngf=8,
            memory=MemoryConfig(enabled=False),
            recover_per_class=2,
            recover_iters=2,
            zo=ZOConfig(q=2),
            adv_start=1,
            eval_every=1000,
            kd_inner_steps=1,
            test_steps=1,
            eval_tasks=1,
            test_tasks=1,
            query_budget=100_000,
            out=str(tmp_path / "run"),
        )
        method = METHODS.get(cfg.method)()
        run = RunDir.create(cfg)
        method.train(cfg, run, None)
    assert method.step == 2 and method.ledger.used == app.state.images > 0
    assert set(method.ledger.per_api) <= {"alpha", "beta"} and method.events
    assert {a.info.output for a in method.apis} == {"probs"}
    assert (tmp_path / "run" / "query-cache.sqlite").is_file()  # on by default over HTTP
