"""Open Inference Protocol v2 conformance of ``apimeta.apis.server`` (real uvicorn, real httpx)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

from apimeta.apis import LocalAPI, restrict_output
from apimeta.apis.server import create_app
from apimeta.errors import ConfigError
from apimeta.testing import UvicornThread, tiny_apis, write_tiny_zoo

KEY = "sekrit-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def apis():
    return tiny_apis()


@pytest.fixture(scope="module")
def server(apis):
    app = create_app(apis, output="topk:2", api_keys=[KEY], max_batch=8, max_body_bytes=400_000)
    with UvicornThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def images(n: int, c: int = 3, s: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def infer_body(x: torch.Tensor, **extra) -> dict:
    spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    spec["data"] = x.reshape(-1).tolist()
    return {"inputs": [spec], **extra}


def test_health_needs_no_key_and_metadata_does(server):
    for path, field in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        r = server.get(path)
        assert r.status_code == 200 and r.json()[field] is True
    r = server.get("/v2")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    r = server.get("/v2", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json() == {"error": "invalid API key"}
    meta = server.get("/v2", headers={"x-api-key": KEY}).json()
    assert meta["name"] == "apimeta" and "version" in meta
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    r = server.post("/v2/models/api-000/infer", json=infer_body(images(1)))
    assert r.status_code == 401


def test_repository_index_and_model_metadata(server, apis):
    index = server.post("/v2/repository/index", headers=AUTH).json()
    assert index == [
        {"name": "api-000", "version": "1", "state": "READY"},
        {"name": "api-001", "version": "1", "state": "READY"},
    ]
    meta = server.get("/v2/models/api-001", headers=AUTH).json()
    assert meta["name"] == "api-001" and meta["versions"] == ["1"] and meta["platform"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 5]}]
    p = meta["parameters"]
    assert all(isinstance(v, str | int | float | bool) for v in p.values())  # protocol: scalars
    assert json.loads(p["classes"]) == list(apis[1].info.classes)
    assert json.loads(p["class_names"]) == list(apis[1].info.class_names)
    assert (p["dataset"], p["channels"], p["image_size"]) == ("synthetic", 1, 28)
    assert (p["output"], p["max_batch_size"]) == ("topk:2", 8)
    assert server.get("/v2/models/api-001/versions/1", headers=AUTH).json() == meta
    r = server.get("/v2/models/api-001/ready", headers=AUTH)
    assert r.status_code == 200 and r.json()["ready"] is True
    for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/api-001/versions/7"):
        r = server.get(path, headers=AUTH)
        assert r.status_code == 404 and set(r.json()) == {"error"}
    r = server.get("/v3/whatever", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()


def test_json_infer_layout_and_server_side_restriction(server, apis):
    x = images(5)
    body = infer_body(x, id="req-7", outputs=[{"name": "scores"}])
    r = server.post("/v2/models/api-000/infer", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["model_name"] == "api-000" and resp["model_version"] == "1"
    assert resp["id"] == "req-7"
    (out,) = resp["outputs"]
    assert (out["name"], out["shape"], out["datatype"]) == ("scores", [5, 5], "FP32")
    got = torch.tensor(out["data"]).view(5, 5)
    with torch.no_grad():
        want = restrict_output(apis[0]._model(x), "topk:2")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ((got > 0).sum(1) == 2).all()  # the client never sees more than the top 2
    # nested (non-flattened) data is allowed by the protocol too
    nested = {"inputs": [{"name": "input", "shape": [5, 3, 32, 32], "datatype": "FP32"}]}
    nested["inputs"][0]["data"] = x.tolist()
    r2 = server.post("/v2/models/api-000/infer", json=nested, headers=AUTH).json()
    assert r2["outputs"][0]["data"] == out["data"]


def test_binary_tensor_extension(server, apis):
    x = images(3, 1, 28, seed=1)
    raw = x.numpy().astype("<f4").tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 1, 28, 28],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    headers = {
        **AUTH,
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }
    r = server.post("/v2/models/api-001/infer", content=head + raw, headers=headers)
    assert r.status_code == 200, r.text
    hl = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:hl])
    out = meta["outputs"][0]
    assert out["shape"] == [3, 5] and out["parameters"]["binary_data_size"] == 60
    got = torch.from_numpy(np.frombuffer(r.content[hl:], dtype="<f4").copy()).view(3, 5)
    r_json = server.post("/v2/models/api-001/infer", json=infer_body(x), headers=AUTH).json()
    assert got.flatten().tolist() == pytest.approx(r_json["outputs"][0]["data"], abs=1e-6)
    # NaN can only arrive through binary data: rejected with 400
    bad = np.full(3 * 28 * 28, np.nan, dtype="<f4").tobytes()
    r = server.post("/v2/models/api-001/infer", content=head + bad, headers=headers)
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    # header/body mismatch
    r = server.post("/v2/models/api-001/infer", content=head + raw[:-4], headers=headers)
    assert r.status_code == 400 and "bytes" in r.json()["error"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda b: b["inputs"][0].update(shape=[2, 3, 16, 16]), "shape"),
        (lambda b: b["inputs"][0].update(datatype="INT8"), "datatype"),
        (lambda b: b["inputs"][0].update(name="image"), "unknown input"),
        (lambda b: b["inputs"][0].update(data=[0.5] * 7), "values"),
        (lambda b: b["inputs"][0]["data"].__setitem__(3, 1.5), "[0, 1]"),
        (lambda b: b.update(outputs=[{"name": "logits"}]), "unknown output"),
        (lambda b: b.update(inputs=[]), "exactly one input"),
        (lambda b: b.update(parameters=[1]), "'parameters' of the request must be an object"),
        (lambda b: b["inputs"][0].update(parameters="x"), "'parameters' of input"),
        (lambda b: b.update(outputs=[{"name": "scores", "parameters": 3}]), "'parameters' of"),
        (lambda b: b["inputs"][0].update(data=["0.5"] * 96), "no strings"),
        (lambda b: b["inputs"][0].update(data=[True] * 96), "booleans"),
        (lambda b: b["inputs"][0].update(data=[None] * 96), "null"),
        (
            lambda b: b.update(outputs=[{"name": "scores", "parameters": {"class_count": 2}}]),
            "classification extension",
        ),
    ],
)
def test_bad_requests_are_400_with_a_message(server, mutate, needle):
    body = infer_body(images(2))
    mutate(body)
    r = server.post("/v2/models/api-000/infer", json=body, headers=AUTH)
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and needle in r.json()["error"]


def test_invalid_json_is_400(server):
    r = server.post(
        "/v2/models/api-000/infer",
        content=b'{"inputs": [',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_limits_are_413(server):
    r = server.post("/v2/models/api-001/infer", json=infer_body(images(9, 1, 28)), headers=AUTH)
    assert r.status_code == 413 and "max batch size 8" in r.json()["error"]
    big = b"0" * 500_000
    r = server.post("/v2/models/api-001/infer", content=big, headers=AUTH)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_access_log_is_one_json_line_with_a_hashed_key(server, caplog):
    paths = ("/v2/models/api-000/infer", "/v2/models/nope")

    def ours() -> list[dict]:
        # the server logs after the response is sent: other tests' lines may still arrive
        recs = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
        return [line for line in recs if line["path"] in paths]

    with caplog.at_level(logging.INFO, logger="apimeta.server.access"):
        server.post(paths[0], json=infer_body(images(2)), headers=AUTH)
        server.get(paths[1], headers=AUTH)
        deadline = time.monotonic() + 5.0
        while len(ours()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = ours()
    assert len(lines) == 2
    ok, missing = lines
    assert ok["status"] == 200 and ok["model"] == "api-000" and ok["batch"] == 2
    assert ok["method"] == "POST" and ok["latency_ms"] >= 0
    assert ok["key"] and KEY not in json.dumps(lines)
    assert missing["status"] == 404 and missing["model"] == "nope"


def test_a_client_disconnect_is_logged_as_499_not_500(server, caplog):
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(str(server.base_url))
    path = "/v2/models/api-001/infer"
    with caplog.at_level(logging.INFO, logger="apimeta.server.access"):
        with socket.create_connection((url.hostname, url.port)) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                '{"inputs": ['.encode()
            )
            time.sleep(0.2)
        deadline = time.monotonic() + 5.0
        lines: list[dict] = []
        while not lines and time.monotonic() < deadline:
            recs = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
            lines = [line for line in recs if line["path"] == path]
            time.sleep(0.01)
    assert [line["status"] for line in lines] == [499]


def test_rate_limit_is_429_with_retry_after(apis):
    app = create_app(apis, rate_limit=0.01, rate_burst=2)
    with UvicornThread(app) as srv, httpx.Client(base_url=srv.url) as client:
        body = infer_body(images(1))
        codes = [client.post("/v2/models/api-000/infer", json=body) for _ in range(3)]
        assert [r.status_code for r in codes] == [200, 200, 429]
        assert int(codes[2].headers["retry-after"]) >= 1
        assert "rate limit" in codes[2].json()["error"]
        assert client.get("/v2/models/api-000").status_code == 200  # only infer is limited


def test_create_app_rejects_bad_configs(apis):
    with pytest.raises(ConfigError, match="unique"):
        create_app([apis[0], apis[0]])
    probs = LocalAPI(apis[0]._model, dataclasses.replace(apis[0].info, output="probs"))
    with pytest.raises(ConfigError, match="cannot be served"):
        create_app([probs], output="logits")


def test_serve_cli_prints_urls_and_stops_on_sigterm(tmp_path):
    zoo = write_tiny_zoo(tmp_path / "zoo")
    code = "from apimeta.cli import app; app()"
    cmd = [sys.executable, "-c", code, "serve", "--zoo", str(zoo), "--port", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "60"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        assert any("/v2/models/api-001" in ln for ln in lines), lines
        base = lines[-1].split(" at ")[1].split(" ")[0]
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=20) == 0
        assert "server stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
