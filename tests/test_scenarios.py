from __future__ import annotations

from collections import Counter

import pytest
import torch

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.errors import ConfigError
from apimeta.scenarios import APIPool, infer_scenario


def _api(name: str, dataset: str, arch: str, ledger: QueryLedger) -> LocalAPI:
    info = APIInfo(
        name=name,
        dataset=dataset,
        classes=(0, 1),
        class_names=("a", "b"),
        channels=1,
        image_size=4,
        tags={"arch": arch},
    )
    return LocalAPI(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2)), info, ledger)


def _zoo(spec: list[tuple[str, str, int]]) -> list[LocalAPI]:
    ledger = QueryLedger()
    return [_api(f"{d}-{a}-{i}", d, a, ledger) for d, a, n in spec for i in range(n)]


def test_infer_scenario():
    assert infer_scenario(_zoo([("emoji", "conv4", 3)])) == "SS"
    assert infer_scenario(_zoo([("emoji", "conv4", 3), ("emoji", "resnet10", 1)])) == "SH"
    assert infer_scenario(_zoo([("emoji", "conv4", 3), ("kanji", "conv4", 1)])) == "MH"
    with pytest.raises(ConfigError):
        infer_scenario([])


def test_sh_draws_architecture_uniformly_not_api_uniformly():
    # 9 conv4 APIs and 1 resnet10 API: SH picks each architecture about half the time.
    apis = _zoo([("emoji", "conv4", 9), ("emoji", "resnet10", 1)])
    pool = APIPool(apis, "SH", torch.Generator().manual_seed(0))
    counts = Counter(pool.draw().info.tags["arch"] for _ in range(2000))
    assert 0.45 < counts["resnet10"] / 2000 < 0.55
    ss = APIPool(apis, "SS", torch.Generator().manual_seed(0))
    counts = Counter(ss.draw().info.tags["arch"] for _ in range(2000))
    assert counts["resnet10"] / 2000 < 0.15


def test_mh_draws_dataset_uniformly_and_is_reproducible():
    apis = _zoo([("emoji", "conv4", 8), ("kanji", "conv4", 2)])
    a = APIPool(apis, "auto", torch.Generator().manual_seed(1))
    assert a.scenario == "MH"
    names = [a.draw().info.name for _ in range(1000)]
    share = sum(n.startswith("kanji") for n in names) / 1000
    assert 0.44 < share < 0.56
    b = APIPool(apis, "MH", torch.Generator().manual_seed(1))
    assert [b.draw().info.name for _ in range(1000)] == names


def test_pool_state_roundtrip_and_bad_scenario():
    apis = _zoo([("emoji", "conv4", 5)])
    pool = APIPool(apis, "SS", torch.Generator().manual_seed(3))
    pool.draw()
    state = pool.state_dict()
    nxt = [pool.draw().info.name for _ in range(5)]
    pool.load_state_dict(state)
    assert [pool.draw().info.name for _ in range(5)] == nxt
    with pytest.raises(ConfigError, match="scenario"):
        APIPool(apis, "XX")
