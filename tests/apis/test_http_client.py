"""``HttpAPI`` against a real server and a fault-injecting proxy: retries, ledger, errors, cache."""

from __future__ import annotations

import httpx
import pytest
import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves annotations here

from apimeta.apis import QueryLedger, restrict_output
from apimeta.apis.cache import QueryCache
from apimeta.apis.http import (
    APIUnreachableError,
    BadOutputError,
    HttpAPI,
    HttpAPIError,
    HttpSession,
    ModelNotFoundError,
    ProtocolMismatchError,
    load_http_zoo,
)
from apimeta.apis.server import create_app
from apimeta.errors import ConfigError, QueryBudgetExceeded
from apimeta.testing import FaultyProxy, UvicornThread, free_port, tiny_apis

KEY = "client-key"
FAST = {"api_key": KEY, "backoff": 0.001, "max_backoff": 0.01, "timeout": 5.0, "max_retries": 3}


@pytest.fixture(scope="module")
def apis():
    return tiny_apis()


@pytest.fixture(scope="module")
def upstream(apis):
    from apimeta.apis.server import create_app

    with UvicornThread(create_app(apis, api_keys=[KEY], max_batch=4)) as srv:
        yield srv.url


@pytest.fixture
def proxy(upstream):
    with FaultyProxy(upstream) as p:
        yield p


def images(n: int, c: int = 3, s: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def local_logits(api, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return api._model(x)


@pytest.mark.parametrize("binary", [True, False])
def test_query_matches_local_and_splits_batches(upstream, apis, binary):
    ledger = QueryLedger()
    with HttpAPI(upstream, "api-001", ledger=ledger, binary=binary, **FAST) as api:
        assert api.session.binary is binary
        info = api.info
        assert (info.name, info.classes, info.class_names) == (
            "api-001",
            apis[1].info.classes,
            apis[1].info.class_names,
        )
        assert (info.channels, info.image_size, info.output, api.max_batch) == (1, 28, "logits", 4)
        x = images(10, 1, 28)
        got = api.query(x)
        torch.testing.assert_close(got, local_logits(apis[1], x), atol=1e-5, rtol=1e-5)
        assert api.stats["attempts"] == 3 + 2  # 2 metadata GETs + ceil(10 / 4) infer requests
        assert ledger.used == 10 and ledger.per_api["api-001"] == 10 and not ledger.retries
        assert api.query(images(0, 1, 28)).shape == (0, 5) and api.stats["attempts"] == 5


def test_load_http_zoo_discovers_models(upstream, apis):
    ledger = QueryLedger()
    zoo = load_http_zoo(upstream, ledger=ledger, **FAST)
    assert [a.info.name for a in zoo] == ["api-000", "api-001"]
    assert all(a.ledger is ledger for a in zoo) and zoo[0].session is zoo[1].session
    (one,) = load_http_zoo(f"{upstream}/v2/models/api-001", **FAST)
    assert one.info.name == "api-001"
    # client-side restriction of a logits server
    (probs,) = load_http_zoo(f"{upstream}/v2/models/api-000", output="probs", **FAST)
    x = images(3)
    got = probs.query(x)
    assert probs.info.output == "probs"
    torch.testing.assert_close(
        got, torch.softmax(local_logits(apis[0], x), 1), atol=1e-5, rtol=1e-5
    )


def test_errors_wrong_model_key_and_unreachable(upstream):
    with pytest.raises(ModelNotFoundError, match=r"no model 'nope' \(served: api-000, api-001\)"):
        HttpAPI(upstream, "nope", **FAST)
    with pytest.raises(HttpAPIError, match="unauthorized") as e:
        HttpAPI(upstream, "api-000", **{**FAST, "api_key": "wrong"})
    assert e.value.status == 401
    dead = f"http://127.0.0.1:{free_port()}"
    session = HttpSession(dead, backoff=0.001, max_retries=2)
    with pytest.raises(APIUnreachableError, match=r"after 3 attempts.*ConnectError"):
        HttpAPI(dead, "api-000", session=session)
    assert session.stats["attempts"] == 3 and session.stats["failed"] == 1
    with pytest.raises(ConfigError):
        HttpAPI("ftp://x", "api-000")


def test_non_v2_server_is_a_protocol_mismatch():
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v2")
    def root():
        return {"hello": "world"}

    with UvicornThread(app) as srv, pytest.raises(ProtocolMismatchError, match="v2"):
        HttpAPI(srv.url, "m", **FAST)


def test_tensor_names_come_from_the_model_metadata(apis):
    """A third-party server whose model calls its tensors pixel_values / logits: the client used
    to send `input` and read `scores`, so the first query failed (StopIteration)."""

    api = apis[0]
    meta = create_app([api]).state.models["api-000"].metadata(8)
    meta["inputs"][0]["name"], meta["outputs"][0]["name"] = "pixel_values", "logits"
    app = FastAPI()

    @app.get("/v2")
    def server():  # no binary extension advertised: the client must send JSON
        return {"name": "third-party", "version": "9", "extensions": []}

    @app.get("/v2/models/m")
    def metadata():
        return {**meta, "name": "m"}

    @app.post("/v2/models/m/infer")
    async def infer(request: Request):
        req = await request.json()
        (tin,) = req["inputs"]
        assert tin["name"] == "pixel_values" and "binary_data_size" not in tin.get("parameters", {})
        x = torch.tensor(tin["data"], dtype=torch.float32).view(tin["shape"])
        out = api.query(x)
        return {"outputs": [{"name": "logits", "shape": list(out.shape), "datatype": "FP32",
                             "data": out.flatten().tolist()}]}  # fmt: skip

    with UvicornThread(app) as srv:
        client = HttpAPI(srv.url, "m", ledger=QueryLedger(), **FAST)
        x = images(3)
        torch.testing.assert_close(client.query(x), local_logits(api, x), atol=1e-5, rtol=1e-5)
        assert (client.input_name, client.output_name) == ("pixel_values", "logits")
        client.close()


def test_discovery_sends_a_json_body_and_explains_a_refusal():
    """Servers that validate the body of POST /v2/repository/index answered 422 to the empty
    one we sent, and `--zoo http://host:port` failed with raw validation text."""
    from fastapi import Body, FastAPI, HTTPException

    app = FastAPI()
    seen: list[dict] = []

    @app.get("/v2")
    def meta():
        return {"name": "other", "version": "1", "extensions": ["model_repository"]}

    @app.post("/v2/repository/index")
    def index(body: dict = Body(...)):  # a JSON body is required (422 without one)
        seen.append(body)
        if body.get("ready") is None and len(seen) > 1:
            raise HTTPException(422, "no listing here")
        return [{"name": "m1", "state": "READY"}, {"name": "m2", "state": "UNAVAILABLE"}]

    with UvicornThread(app) as srv:
        session = HttpSession(srv.url, **{k: v for k, v in FAST.items() if k != "api_key"})
        assert session.model_names() == ["m1"] and seen == [{}]
        with pytest.raises(ProtocolMismatchError, match=r"HTTP 422.*v2/models/NAME"):
            session.model_names()
        session.close()


def test_5xx_burst_is_retried_and_ledger_counts_retries_separately(proxy, apis):
    ledger = QueryLedger(budget=100)
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, **FAST)
    proxy.set_faults(["503", "502", "504"])
    x = images(3)
    got = api.query(x)
    torch.testing.assert_close(got, local_logits(apis[0], x), atol=1e-5, rtol=1e-5)
    assert [a for _, a in proxy.log] == ["503", "502", "504", "ok"]
    assert ledger.used == 3  # billed once: images sent once
    assert ledger.retries["api-000"] == 9  # three re-sends of 3 images, recorded separately
    assert api.stats["fail_503"] == 1 and api.stats["retries"] == 3


def test_retries_exhausted_raise_a_clean_api_error(proxy):
    ledger = QueryLedger()
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, **FAST)
    proxy.set_faults([], default="drop")
    with pytest.raises(APIUnreachableError, match="after 4 attempts"):
        api.query(images(2))
    assert proxy.counts["drop"] == 4 and api.stats["fail_RemoteProtocolError"] == 4
    assert ledger.used == 2 and ledger.retries["api-000"] == 6


def test_429_honours_retry_after(proxy):
    api = HttpAPI(proxy.url, "api-000", **FAST)
    proxy.set_faults(["429:0.05", "429:0.05"])
    api.query(images(1))
    assert proxy.counts == {"429:0.05": 2, "ok": 1}
    assert api.stats["wait_s"] == pytest.approx(0.1)  # Retry-After, not the 1 ms backoff


def test_slow_response_times_out_then_succeeds(proxy):
    api = HttpAPI(proxy.url, "api-000", **{**FAST, "timeout": 0.3})
    proxy.set_faults(["slow:1.0"])
    api.query(images(1))
    assert api.stats["fail_ReadTimeout"] == 1 and proxy.counts == {"slow:1.0": 1, "ok": 1}


@pytest.mark.parametrize("status", ["400", "500", "403"])
def test_other_errors_are_not_retried(proxy, status):
    ledger = QueryLedger()
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, **FAST)
    proxy.set_faults([status])
    with pytest.raises(HttpAPIError) as e:
        api.query(images(2))
    assert e.value.status == int(status) and "injected" in str(e.value)
    assert len(proxy.log) == 1 and ledger.used == 2 and not ledger.retries


@pytest.mark.parametrize(("fault", "match"), [("nan", "NaN"), ("badshape", "shape")])
def test_bad_outputs_raise(proxy, fault, match):
    api = HttpAPI(proxy.url, "api-000", **FAST)
    proxy.set_faults([fault])
    with pytest.raises(BadOutputError, match=match):
        api.query(images(2))
    assert len(proxy.log) == 1


def test_budget_is_checked_before_sending_and_billed_retries_never_overspend(proxy):
    ledger = QueryLedger(budget=3)
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, **FAST)
    with pytest.raises(QueryBudgetExceeded):
        api.query(images(4))
    assert proxy.log == [] and ledger.used == 0
    # billed retries: the second re-send would exceed the budget -> stop before sending it
    ledger = QueryLedger(budget=5)
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, bill_retries=True, **FAST)
    proxy.set_faults(["503", "503"])
    with pytest.raises(QueryBudgetExceeded):
        api.query(images(2))
    assert len(proxy.log) == 2 and ledger.used == 4 and ledger.used <= ledger.budget


def test_a_split_batch_the_budget_cannot_pay_for_sends_no_chunk(proxy):
    """Chunks of 4: the budget pays for the first two chunks of a 10-image batch, not the third.
    The whole batch is refused before anything is sent or billed."""
    ledger = QueryLedger(budget=9)
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, max_batch=4, **FAST)
    with pytest.raises(QueryBudgetExceeded):
        api.query(images(10))
    assert proxy.log == [] and ledger.used == 0
    api.query(images(9))  # 3 chunks, all paid for at once
    assert len(proxy.log) == 3 and ledger.used == 9


def test_concurrent_chunks_keep_order_and_exact_ledger(proxy, apis):
    ledger = QueryLedger()
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, concurrency=3, **FAST)
    proxy.set_faults(["503", "drop"])
    x = images(11)
    got = api.query(x)
    torch.testing.assert_close(got, local_logits(apis[0], x), atol=1e-5, rtol=1e-5)
    assert len(proxy.log) == 3 + 2 and ledger.used == 11
    assert sum(ledger.retries.values()) in range(2, 9)  # 2 re-sent chunks of <= 4 images
    api.close()


def test_jitter_is_seeded():
    a = HttpSession("http://127.0.0.1:1", seed=3, backoff=1.0, max_backoff=100)
    b = HttpSession("http://127.0.0.1:1", seed=3, backoff=1.0, max_backoff=100)
    da, db = [a._delay(k) for k in range(5)], [b._delay(k) for k in range(5)]
    assert da == db and all(2**k / 2 <= d <= 2**k for k, d in enumerate(da))
    assert da != [HttpSession("http://127.0.0.1:1", seed=4)._delay(k) for k in range(5)]


def test_cache_hits_are_not_sent_or_billed(proxy, apis, tmp_path):
    ledger = QueryLedger()
    cache = QueryCache(tmp_path / "q.sqlite")
    api = HttpAPI(proxy.url, "api-000", ledger=ledger, cache=cache, **FAST)
    x = images(6)
    first = api.query(x)
    assert ledger.used == 6 and len(proxy.log) == 2
    # a "resumed run": a new client and a reopened cache
    cache.close()
    cache = QueryCache(tmp_path / "q.sqlite")
    api2 = HttpAPI(proxy.url, "api-000", ledger=ledger, cache=cache, **FAST)
    again = api2.query(torch.cat([x[:4], images(2, seed=9)]))
    assert torch.equal(again[:4], first[:4])
    assert ledger.used == 8 and ledger.cached["api-000"] == 4 and len(proxy.log) == 3
    torch.testing.assert_close(
        again[4:], local_logits(apis[0], images(2, seed=9)), atol=1e-5, rtol=1e-5
    )
    cache.close()


def test_restricted_server_output_cannot_be_widened(apis):
    from apimeta.apis.server import create_app

    with UvicornThread(create_app(apis, output="label")) as srv:
        with pytest.raises(ConfigError, match="cannot get"):
            HttpAPI(srv.url, "api-000", output="probs", **FAST)
        (api, _) = load_http_zoo(srv.url, **FAST)  # load_zoo's default "logits" -> "label"
        x = images(4)
        got = api.query(x)
        assert api.info.output == "label"
        assert torch.equal(got, restrict_output(local_logits(apis[0], x), "label"))
        assert isinstance(api.session.client, httpx.Client)
