"""The official Triton HTTP client (``tritonclient.http``) against ``apimeta serve``: the calls
the server implements work, the ones it does not are clear errors (README, "Serving")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from apimeta.apis.server import create_app
from apimeta.testing import UvicornThread, tiny_apis


@pytest.fixture(scope="module")
def served():
    apis = tiny_apis()
    with UvicornThread(create_app(apis, max_batch=8)) as srv:
        client = triton.InferenceServerClient(srv.url.removeprefix("http://"))
        yield client, apis
        client.close()


def test_health_metadata_and_repository(served):
    client, _ = served
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("api-000") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "apimeta" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("api-001")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert [m["name"] for m in client.get_model_repository_index()] == ["api-000", "api-001"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_binary_and_json(served, binary):
    client, apis = served
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy(), binary_data=binary)
    out = triton.InferRequestedOutput("scores", binary_data=binary)
    got = client.infer("api-000", [inp], outputs=[out], request_id="r1")
    assert got.get_response()["id"] == "r1"
    np.testing.assert_allclose(got.as_numpy("scores"), apis[0].query(x).numpy(), atol=1e-6)


def test_what_is_not_implemented_says_so(served):
    client, _ = served
    for call in (client.get_model_config, client.get_inference_statistics):
        with pytest.raises(InferenceServerException, match="404"):
            call("api-000")
    x = np.zeros((1, 3, 32, 32), np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = triton.InferRequestedOutput("scores", class_count=2)
    with pytest.raises(InferenceServerException, match="classification extension"):
        client.infer("api-000", [inp], outputs=[out])
    big = np.zeros((9, 3, 32, 32), np.float32)
    inp = triton.InferInput("input", list(big.shape), "FP32")
    inp.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException, match="max batch size 8"):
        client.infer("api-000", [inp])
