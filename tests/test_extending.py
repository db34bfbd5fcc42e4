"""Extending apimeta as docs/architecture.md says: a new method and a new API backend, each
written in one file (here: this test) and registered with a decorator, work end to end through
the library and the CLI without touching any other file."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from apimeta.apis import API_SOURCES, LocalAPI, QueryLedger, load_zoo
from apimeta.apis.base import APIInfo
from apimeta.bench import variant, zoo_free
from apimeta.cli import app
from apimeta.maml import maml_outer_loss
from apimeta.methods import METHODS, MetaTrainer
from apimeta.testing import make_config, tiny_model


# ----------------------------------------------------------------------------- a toy backend
class ToyZoo:
    """``toy://N``: N in-process classifiers on synthetic classes (what a new backend needs)."""

    priority = 0
    handles_cache = False

    @staticmethod
    def matches(source: str) -> bool:
        return source.startswith("toy://")

    @staticmethod
    def load(source: str, *, ledger: QueryLedger, output: str, device: str = "cpu", **_: Any):
        n = int(source.removeprefix("toy://"))
        apis = []
        for i in range(n):
            classes = tuple(range(5 * i, 5 * i + 5))
            info = APIInfo(
                f"toy-{i}",
                "synthetic",
                classes,
                tuple(map(str, classes)),
                3,
                32,
                output=output,
                tags={"arch": "conv4"},
            )
            apis.append(LocalAPI(tiny_model(i).to(device), info, ledger))
        return apis


# ----------------------------------------------------------------------------- a toy method
class FirstOrderMAML(MetaTrainer):
    """First-order MAML on real meta-train tasks: the whole method is these lines."""

    name = "toy-fomaml"
    reads: ClassVar[tuple[str, ...]] = ("eval",)

    def setup(self) -> None:
        cfg = self.cfg
        self.tasks = self.datasets[0].sampler("train", cfg.way, cfg.shot, cfg.query, self.rng("t"))

    def meta_batch_loss(self, step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        outs = [
            maml_outer_loss(
                self.model, None, self.tasks.sample(), steps=1, lr=cfg.inner_lr, first_order=True
            )
            for _ in range(cfg.meta_batch)
        ]
        loss = torch.stack([o.loss for o in outs]).sum()
        return loss, {"train_acc": 100.0 * sum(o.accuracy for o in outs) / len(outs)}


@pytest.fixture
def registered():
    API_SOURCES.register("toy")(ToyZoo)
    METHODS.register("toy-fomaml")(FirstOrderMAML)
    yield
    API_SOURCES._items.pop("toy")
    METHODS._items.pop("toy-fomaml")


TINY = dict(
    dataset="synthetic",
    width=8,
    query=3,
    episodes=2,
    meta_batch=1,
    checkpoint_every=1,
    eval={"every": 1000, "tasks": 2, "test_tasks": 2, "test_steps": 1},
)


def test_a_backend_in_one_file_opens_with_load_zoo_and_trains(registered, tmp_path):
    apis = load_zoo("toy://3")
    assert [a.info.name for a in apis] == ["toy-0", "toy-1", "toy-2"]
    assert apis[0].query(torch.rand(2, 3, 32, 32)).shape == (2, 5) and apis[0].ledger.used == 2
    res = CliRunner().invoke(
        app,
        ["train", "--method", "bidf-mkd", "--zoo", "toy://3", "--out", str(tmp_path / "run"),
         "--dataset", "synthetic", "--episodes", "1", "--threads", "1", "--query-budget", "10000000",
         "--set", "width=8", "--set", "query=3", "--set", "meta_batch=1", "--set", "zo.q=1",
         "--set", "recovery.per_class=4", "--set", "recovery.iters=1", "--set", "recovery.ngf=8",
         "--set", "kd.inner_steps=1", "--set", "eval.tasks=2", "--set", "eval.test_tasks=2",
         "--set", "eval.test_steps=1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    events = (tmp_path / "run" / "metrics.jsonl").read_text().count('"phase": "event"')
    assert events == 1 and (tmp_path / "run" / "recovered" / "event-0000.png").is_file()


def test_a_method_in_one_file_trains_from_the_cli_and_is_a_bench_row(registered, tmp_path):
    res = CliRunner().invoke(
        app,
        ["train", "--method", "toy-fomaml", "--dataset", "synthetic", "--episodes", "2",
         "--out", str(tmp_path / "run"), "--threads", "1", "--set", "width=8",
         "--set", "query=3", "--set", "meta_batch=1", "--set", "eval.tasks=2",
         "--set", "eval.test_tasks=2", "--set", "eval.test_steps=1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "toy-fomaml" in res.output and (tmp_path / "run" / "best.pt").is_file()
    assert variant("toy-fomaml") == ("toy-fomaml", {}) and zoo_free("toy-fomaml")
    # and as a library call
    cfg = make_config(TINY, method="toy-fomaml", out=str(tmp_path / "lib"))
    from apimeta.runner import train

    result = train(cfg)
    assert result.metrics["steps"] == 2 and result.metrics["method"] == "toy-fomaml"
