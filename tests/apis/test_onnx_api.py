"""ONNX export: parity with torch (1e-5), OnnxAPI contract, zoo export + CLI + load_zoo."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from typer.testing import CliRunner

from apimeta.apis import QueryLedger, load_zoo
from apimeta.apis.local import load_api_model
from apimeta.apis.manifest import entry_info, read_manifest
from apimeta.apis.onnx import OnnxAPI, export_onnx, export_zoo_onnx, load_onnx_zoo
from apimeta.errors import ConfigError, InvalidQueryError
from apimeta.testing import write_tiny_zoo


@pytest.fixture(scope="module")
def onnx_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    src = write_tiny_zoo(root / "zoo")
    out = export_zoo_onnx(src, root / "zoo-onnx", dynamo=False)  # fast; dynamo tested below
    return src, out


def images(n: int, c: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_exported_zoo_matches_torch(onnx_zoo):
    src, out = onnx_zoo
    data = read_manifest(out)
    assert [e["onnx_file"] for e in data["apis"]] == ["api-000.onnx", "api-001.onnx"]
    assert all((out / e["file"]).is_file() for e in data["apis"])  # a complete zoo
    ledger = QueryLedger()
    apis = load_onnx_zoo(out, ledger=ledger)
    for api, entry in zip(apis, data["apis"], strict=True):
        model = load_api_model(src, entry)
        assert api.info == entry_info(entry)
        for b in (1, 7, 33):  # dynamic batch axis
            x = images(b, api.info.channels, api.info.image_size, seed=b)
            with torch.no_grad():
                want = model(x)
            torch.testing.assert_close(api.query(x), want, atol=1e-5, rtol=1e-5)
    assert ledger.used == 2 * (1 + 7 + 33)
    # load_zoo picks the ONNX backend when the manifest has ONNX files
    assert all(isinstance(a, OnnxAPI) for a in load_zoo(out))


def test_onnx_api_restricts_output_and_validates(onnx_zoo):
    src, out = onnx_zoo
    (entry, _) = read_manifest(out)["apis"]
    model = load_api_model(src, entry)
    api = OnnxAPI(out / entry["onnx_file"], entry_info(entry, "topk:2"), QueryLedger(budget=5))
    x = images(5, 3, 32)
    got = api.query(x)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    assert ((got > 0).sum(1) == 2).all()
    torch.testing.assert_close(got.max(1).values, probs.max(1).values, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidQueryError):
        api.query(images(2, 1, 32))
    with pytest.raises(InvalidQueryError):
        api.query(x * 2)
    assert api.ledger.used == 5


def test_default_dynamo_exporter_parity(onnx_zoo, tmp_path):
    src, _ = onnx_zoo
    entry = read_manifest(src)["apis"][1]
    model = load_api_model(src, entry)
    path = export_onnx(model, tmp_path / "d.onnx", 1, 28)
    api = OnnxAPI(path, entry_info(entry))
    for b in (1, 5):
        x = images(b, 1, 28, seed=b)
        with torch.no_grad():
            want = model(x)
        torch.testing.assert_close(api.query(x), want, atol=1e-5, rtol=1e-5)


def test_legacy_exporter_resnet_parity(tmp_path):
    from apimeta.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("resnet10", num_classes=4, width=0.125, bn="standard").eval()
    path = export_onnx(model, tmp_path / "r.onnx", 3, 32, dynamo=False)
    info = entry_info(
        {
            "name": "r",
            "dataset": "synthetic",
            "classes": [0, 1, 2, 3],
            "class_names": list("abcd"),
            "channels": 3,
            "image_size": 32,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "arch": "resnet10",
        }
    )
    x = images(4, 3, 32)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(OnnxAPI(path, info).query(x), want, atol=1e-5, rtol=1e-5)


def test_cli_export_in_place_and_missing_onnx_error(tmp_path):
    from apimeta.cli import app

    src = write_tiny_zoo(tmp_path / "zoo")
    with pytest.raises(ConfigError, match="export-onnx"):
        load_onnx_zoo(src)
    res = CliRunner().invoke(app, ["zoo", "export-onnx", str(src), "--legacy-exporter"])
    assert res.exit_code == 0, res.output
    data = json.loads((src / "zoo.json").read_text())
    assert all((src / e["onnx_file"]).is_file() for e in data["apis"])
    assert len(load_onnx_zoo(src)) == 2


def test_onnx_apis_can_be_served(onnx_zoo):
    from apimeta.apis.http import HttpAPI
    from apimeta.apis.server import create_app
    from apimeta.testing import UvicornThread

    src, out = onnx_zoo
    apis = load_onnx_zoo(out)
    with UvicornThread(create_app(apis, output="probs")) as srv:
        meta = httpx.get(f"{srv.url}/v2/models/api-001").json()
        assert meta["platform"] == "onnxruntime_onnx"
        client = HttpAPI(srv.url, "api-001", backoff=0.001)
        x = images(3, 1, 28)
        with torch.no_grad():
            want = torch.softmax(load_api_model(src, read_manifest(src)["apis"][1])(x), 1)
        torch.testing.assert_close(client.query(x), want, atol=1e-5, rtol=1e-5)
        client.close()


def test_onnx_execution_providers_follow_the_device(monkeypatch, caplog):
    import onnxruntime as ort

    from apimeta.apis.onnx import providers_for

    assert providers_for("cpu") == providers_for(None) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("WARNING"):
        assert providers_for("cuda:0") == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in caplog.text and "apimeta[gpu]" in caplog.text
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
