"""maml-zoo, the oracle of a zoo: MAML on the real train images of exactly the zoo's classes."""

from __future__ import annotations

import json

import pytest
import torch

from apimeta.bench import gap_share, gap_share_table, zoo_free
from apimeta.errors import ConfigError
from apimeta.methods import METHODS
from apimeta.run_config import EvalConfig
from apimeta.runs import RunDir
from apimeta.testing import make_config, write_tiny_zoo

TINY = dict(
    method="maml-zoo",
    dataset="synthetic",
    width=8,
    query=3,
    meta_batch=2,
    inner_steps=1,
    episodes=4,
    eval=EvalConfig(every=1000, tasks=2, test_tasks=2, test_steps=1),
)


def train(cfg):
    method = METHODS.get(cfg.method)()
    method.train(cfg, RunDir.create(cfg))
    return method


def test_the_oracle_sees_only_the_zoos_classes_and_their_train_images(tmp_path):
    zoo = write_tiny_zoo(tmp_path / "zoo")  # two APIs on synthetic classes 10..14
    m = train(make_config(TINY, zoo=str(zoo), out=str(tmp_path / "run")))
    assert m.oracle_classes == {"synthetic": [10, 11, 12, 13, 14]}
    (sampler,) = m.samplers
    train_split = m.datasets[0].split("train")
    want = torch.isin(train_split.labels, torch.tensor([10, 11, 12, 13, 14]))
    assert torch.equal(sampler.labels, train_split.labels[want])  # every image of those classes
    assert torch.equal(sampler.images, train_split.images[want])  # ... and only train images
    seen = set()
    for _ in range(30):
        seen |= set(m.sample_episode().class_ids)
    assert seen == {10, 11, 12, 13, 14}
    assert not zoo_free("maml-zoo") and zoo_free("maml-real")  # a bench row per zoo


def test_the_oracle_refuses_zoos_it_cannot_use(tmp_path):
    with pytest.raises(ConfigError, match="pass --zoo"):
        train(make_config(TINY, out=str(tmp_path / "a")))
    zoo = write_tiny_zoo(tmp_path / "zoo")
    data = json.loads((zoo / "zoo.json").read_text())
    for e in data["apis"]:
        e["classes"] = [30, 31, 32, 33, 34]  # meta-test classes of synthetic
    (zoo / "zoo.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not meta-train classes"):
        train(make_config(TINY, zoo=str(zoo), out=str(tmp_path / "b")))


def test_gap_share():
    assert gap_share(50.0, 40.0, 60.0) == 0.5
    assert gap_share(40.0, 40.0, 60.0) == 0.0
    assert gap_share(35.0, 40.0, 60.0) == -0.25
    assert gap_share(50.0, 40.0, 40.0) != gap_share(50.0, 40.0, 40.0)  # NaN: no span
    res = lambda m: {"d": {"1-shot": {"mean": m, "ci95": 1.0}}}  # noqa: E731
    rows = [
        {"scenario": "SS", "variant": v, "results": res(m)}
        for v, m in (("random", 40.0), ("maml-zoo", 60.0), ("bidf-mkd", 52.0))
    ]
    table = gap_share_table(rows, ["SS"], [1])
    assert "| bidf-mkd | 60% |" in table and "maml-zoo |" not in table.split("\n", 3)[-1]
    assert gap_share_table(rows[:1] + rows[2:], ["SS"], [1]) == ""  # no oracle row
    # another oracle row (a maml-zoo variant chosen on meta-val): the shares use it instead
    rows.append({"scenario": "SS", "variant": "maml-zoo:lr3", "results": res(64.0)})
    table = gap_share_table(rows, ["SS"], [1], oracle="maml-zoo:lr3")
    assert "| bidf-mkd | 50% |" in table and "(maml-zoo:lr3 - random)" in table
    assert "| maml-zoo | 83% |" in table  # the other oracle is a row like any other here
