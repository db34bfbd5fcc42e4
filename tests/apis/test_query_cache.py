"""``QueryCache`` / ``CachedAPI``: cached images are neither sent nor billed, across reopen."""

from __future__ import annotations

import dataclasses

import torch

from apimeta.apis import LocalAPI, QueryLedger
from apimeta.apis.cache import CachedAPI, QueryCache, model_key
from apimeta.testing import tiny_apis


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cached_api_charges_only_misses_and_survives_reopen(tmp_path):
    base = tiny_apis()[0]
    ledger = QueryLedger(budget=10)
    api = LocalAPI(base._model, base.info, ledger)
    path = tmp_path / "cache" / "queries.sqlite"
    with QueryCache(path) as cache:
        cached = CachedAPI(api, cache)
        assert cached.info is api.info and cached.ledger is ledger
        x = images(6)
        first = cached.query(x)
        assert ledger.used == 6 and len(cache) == 6
        second = cached.query(x)
        assert torch.equal(first, second) and ledger.used == 6 and ledger.cached["api-000"] == 6
    with QueryCache(path) as cache:  # a resumed run reopens the same file
        cached = CachedAPI(api, cache)
        mixed = torch.cat([images(2, seed=5), x[3:]])
        out = cached.query(mixed)
        assert ledger.used == 8 and ledger.cached["api-000"] == 9
        assert torch.equal(out[2:], first[3:])
        torch.testing.assert_close(out[:2], api.query(images(2, seed=5)))
    assert ledger.used == 10 and ledger.summary()["cached"] == {"api-000": 9}


def test_keys_depend_on_model_output_and_pixels():
    info = tiny_apis()[0].info
    x = images(2)
    k = QueryCache.keys(model_key(info), "logits", x)
    assert len(set(k)) == 2 and k == QueryCache.keys(model_key(info), "logits", x.clone())
    assert k[0] != QueryCache.keys(model_key(info), "probs", x)[0]
    other = dataclasses.replace(info, name="api-009")
    assert k[0] != QueryCache.keys(model_key(other), "logits", x)[0]
    y = x.clone()
    y[0, 0, 0, 0] += 1e-6
    assert QueryCache.keys(model_key(info), "logits", y)[0] != k[0]


def test_cache_is_shared_between_connections(tmp_path):
    path = tmp_path / "q.sqlite"
    a, b = QueryCache(path), QueryCache(path)
    a.put_many([("k1", torch.arange(3.0).numpy())])
    got = b.get_many(["k1", "k2"])
    assert list(got) == ["k1"] and got["k1"].tolist() == [0.0, 1.0, 2.0]
    a.close()
    b.close()


def test_the_query_cache_is_on_by_default_for_http_zoos_only(tmp_path):
    from apimeta.apis.runtime import query_cache_path
    from apimeta.testing import make_config

    desc = tmp_path / "apis.yaml"
    desc.write_text(
        "source: http://127.0.0.1:1\nmodels: {m: {classes: [1], dataset: d, output: probs}}\n"
    )
    run = tmp_path / "run"
    assert query_cache_path(make_config(zoo="http://h:1"), run) == run / "query-cache.sqlite"
    assert query_cache_path(make_config(zoo=str(desc)), run) == run / "query-cache.sqlite"
    assert query_cache_path(make_config(zoo=str(tmp_path)), run) is None  # a local zoo
    off = make_config(zoo="http://h:1", http={"query_cache": "off"})
    assert query_cache_path(off, run) is None
    assert query_cache_path(make_config(zoo=str(tmp_path), http={"query_cache": "auto"}), run)
