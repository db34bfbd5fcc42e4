"""The v2 wire codec shared by client and server: round trips, and the [0, 1] input range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.apis.base import RANGE_TOL
from apimeta.apis.v2 import (
    HEADER_LENGTH,
    ProtocolError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from apimeta.errors import InvalidQueryError

SPEC = dict(model="m", channels=3, image_size=4, max_batch=8)


def _images(n: int = 5) -> np.ndarray:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)).numpy()


def _header_len(headers: dict[str, str]) -> int | None:
    hl = {k.lower(): v for k, v in headers.items()}.get(HEADER_LENGTH)
    return int(hl) if hl is not None else None


@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip(binary):
    x = _images()
    body, headers = encode_request(x, binary)
    got, req, binary_out = decode_request(body, _header_len(headers), **SPEC)
    assert torch.equal(got, torch.from_numpy(x)) and binary_out is binary
    assert req["inputs"][0]["shape"] == [5, 3, 4, 4]


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip(binary):
    scores = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    body, headers, media = encode_response("m", "1", {"id": "r1"}, scores, binary)
    shape, dtype, values = decode_response(body, _header_len(headers))
    assert (shape, dtype) == ([5, 7], "FP32")
    assert np.array_equal(values.reshape(shape), scores)
    assert media == ("application/octet-stream" if binary else "application/json")


@pytest.mark.parametrize(
    ("delta", "ok"),
    [(0.5 * RANGE_TOL, True), (2 * RANGE_TOL, False), (1e-2, False)],
)
def test_range_tolerance_is_tight_for_client_and_server(delta, ok):
    """Values may exceed [0, 1] by float rounding (1e-4), not by more: 1 + 2e-4 is refused."""
    for x in (torch.full((2, 3, 4, 4), 1.0 + delta), torch.full((2, 3, 4, 4), -delta)):
        info = APIInfo("api", "toy", (0, 1), ("a", "b"), 3, 4)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
        api = LocalAPI(model, info, QueryLedger())
        body, headers = encode_request(x.numpy(), binary=True)
        if ok:
            api.query(x)
            decode_request(body, _header_len(headers), **SPEC)
        else:
            with pytest.raises(InvalidQueryError, match=r"\[0, 1\]"):
                api.query(x)
            with pytest.raises(ProtocolError, match=r"\[0, 1\]") as e:
                decode_request(body, _header_len(headers), **SPEC)
            assert e.value.status == 400
        assert api.ledger.used == (2 if ok else 0)
    assert RANGE_TOL == 1e-4
