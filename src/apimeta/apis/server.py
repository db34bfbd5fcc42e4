"""Serve black-box APIs over the Open Inference Protocol (KServe/Triton "v2") REST API.

Endpoints (all JSON; errors are ``{"error": "message"}``):

- ``GET  /v2/health/live``, ``GET /v2/health/ready`` (never need an API key)
- ``GET  /v2``: server metadata (``name``, ``version``, ``extensions``)
- ``POST /v2/repository/index``: the model list (Triton's *model repository* extension):
  ``[{"name", "version", "state": "READY"}]``
- ``GET  /v2/models/{name}``: model metadata. Input ``input`` FP32 ``[-1, C, H, W]`` (images in
  [0, 1]), output ``scores`` FP32 ``[-1, n_classes]``. ``parameters`` carries the apimeta info;
  protocol parameters must be scalars, so lists (``classes``, ``class_names``, ``mean``, ``std``,
  ``tags``) are JSON-encoded strings.
- ``GET  /v2/models/{name}/ready``
- ``POST /v2/models/{name}/infer`` (also ``/versions/1/infer``): the protocol's JSON tensors, or
  the *binary tensor data* extension (request header ``Inference-Header-Content-Length`` = length
  of the JSON header, followed by raw little-endian FP32 bytes; ask for binary output with
  ``"parameters": {"binary_data_output": true}`` or per output ``{"binary_data": true}``).

The output restriction is applied here, server-side: a client never sees more than ``output``.
Status codes: 400 bad request (shape, datatype, NaN, range, JSON), 401 missing/wrong API key,
404 unknown model, 413 batch or body too large, 429 rate limited (with ``Retry-After``), 403
server-side quota exhausted. One JSON access-log line per request goes to logger
``apimeta.server.access``.

Not implemented (a client asking for them gets 404, or 400 for ``class_count``): the model
configuration, statistics and model control endpoints, and the classification extension.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from apimeta.apis.base import APIInfo, BlackBoxAPI, parse_output_mode, restrict_output
from apimeta.apis.v2 import (
    HEADER_LENGTH,
    INPUT_NAME,
    OUTPUT_NAME,
    ProtocolError,
    decode_request,
    encode_response,
    json_dumps,
)
from apimeta.errors import ConfigError, InvalidQueryError, QueryBudgetExceeded

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("apimeta.server.access")

SERVER_NAME = "apimeta"
PROTOCOL_VERSION = "1"
MODEL_VERSION = "1"
EXTENSIONS = ("model_repository", "binary_tensor_data", "apimeta")


def key_id(key: str | None) -> str | None:
    """A short, non-reversible id of an API key for logs: first 12 hex of its sha256."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:12]


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json_dumps({"error": message}), status, headers=headers, media_type="application/json"
    )


class TokenBucket:
    """Per-key token buckets: ``rate`` requests/s, at most ``burst`` at once."""

    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ConfigError(f"rate limit must be > 0 requests/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one token for ``key``; 0.0 if allowed, else seconds until a token is available."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._state[key] = (tokens - 1.0, now)
                return 0.0
            self._state[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


@dataclasses.dataclass
class ServedModel:
    """One served API: ``api`` answers in ``api.info.output``; ``extra`` restricts further."""

    api: BlackBoxAPI
    info: APIInfo
    extra: str | None
    platform: str

    def metadata(self, max_batch: int) -> dict[str, Any]:
        i = self.info
        return {
            "name": i.name,
            "versions": [MODEL_VERSION],
            "platform": self.platform,
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "datatype": "FP32",
                    "shape": [-1, i.channels, i.image_size, i.image_size],
                }
            ],
            "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, i.n_classes]}],
            "parameters": {
                "dataset": i.dataset,
                "n_classes": i.n_classes,
                "classes": json.dumps(list(i.classes)),
                "class_names": json.dumps(list(i.class_names)),
                "channels": i.channels,
                "image_size": i.image_size,
                "output": i.output,
                "mean": json.dumps(list(i.mean)),
                "std": json.dumps(list(i.std)),
                "tags": json.dumps(i.tags, default=str),
                "max_batch_size": max_batch,
                "input_range": "[0, 1]",
            },
        }

    def infer(self, x: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, n_classes) float32 scores, restricted."""
        with torch.inference_mode():
            out = self.api.query(x)
            if self.extra is not None:
                out = restrict_output(out.float(), self.extra)
            return out.detach().to("cpu", torch.float32).contiguous().numpy()


def _served(api: BlackBoxAPI, output: str | None) -> ServedModel:
    own = api.info.output
    platform = str(getattr(api, "platform", "pytorch"))
    if output is None or output == own:
        return ServedModel(api, api.info, None, platform)
    parse_output_mode(output)
    if own != "logits":
        raise ConfigError(
            f"API {api.info.name!r} answers in {own!r} mode and cannot be served as {output!r}; "
            "load the zoo with output='logits' and let the server restrict it"
        )
    return ServedModel(api, dataclasses.replace(api.info, output=output), output, platform)


def default_max_body_bytes(apis: Sequence[BlackBoxAPI], max_batch: int) -> int:
    """Room for a JSON request of ``max_batch`` of the largest images (<= 24 bytes a value, as
    Python's ``json`` writes float64 values)."""
    per_image = max((a.info.channels * a.info.image_size**2 for a in apis), default=3 * 84 * 84)
    return max_batch * per_image * 24 + (1 << 20)


class _AccessLog:
    """Pure ASGI middleware: one JSON log line per HTTP request."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    json.dumps(
                        {
                            "ts": round(time.time(), 3),
                            "method": scope.get("method"),
                            "path": scope.get("path"),
                            "status": status["code"],
                            "model": state.get("model"),
                            "batch": state.get("batch"),
                            "latency_ms": round((time.perf_counter() - t0) * 1000, 3),
                            "key": state.get("key_id"),
                        }
                    )
                )


def create_app(
    apis: Sequence[BlackBoxAPI],
    *,
    output: str | None = None,
    api_keys: Sequence[str] | None = None,
    max_batch: int = 1024,
    max_body_bytes: int | None = None,
    rate_limit: float | None = None,
    rate_burst: float | None = None,
) -> FastAPI:
    """An Open Inference Protocol v2 app serving ``apis`` (e.g. the LocalAPIs of a zoo).

    ``output``: the restriction clients get (logits | probs | topk:K | label); None serves each
    API in its own ``info.output`` mode (APIs must answer logits to be restricted further).
    ``api_keys``: if given, every non-health endpoint needs ``Authorization: Bearer KEY`` or
    ``x-api-key: KEY``. ``max_batch``: images per request (413 above). ``max_body_bytes``:
    request size limit (default fits a JSON batch of ``max_batch``). ``rate_limit``: infer
    requests/s per key (per client host without keys), token bucket of ``rate_burst`` (default
    ``max(1, rate_limit)``); 429 with ``Retry-After`` when exceeded.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    models: dict[str, ServedModel] = {}
    for api in apis:
        if api.info.name in models:
            raise ConfigError(f"two APIs are named {api.info.name!r}; API names must be unique")
        models[api.info.name] = _served(api, output)
    body_limit = (
        int(max_body_bytes)
        if max_body_bytes is not None
        else default_max_body_bytes(list(apis), max_batch)
    )
    keys = [k for k in (api_keys or []) if k]
    bucket = TokenBucket(rate_limit, rate_burst) if rate_limit is not None else None
    from importlib.metadata import PackageNotFoundError, version

    try:
        server_version = version("apimeta")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        server_version = "0"

    app = FastAPI(title="apimeta inference server", docs_url=None, redoc_url=None)
    app.state.models = models
    app.state.max_batch = max_batch

    @app.exception_handler(ProtocolError)
    async def _protocol_error(request: Request, exc: ProtocolError) -> Response:
        return _error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = "not found" if exc.status_code == 404 else str(exc.detail)
        return _error_response(exc.status_code, f"{msg}: {request.method} {request.url.path}")

    def authorize(request: Request) -> str:
        """Check the API key; returns the bucket key (key id, or client host)."""
        given = None
        auth = request.headers.get("authorization")
        if auth and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        given = given or request.headers.get("x-api-key")
        request.state.key_id = key_id(given)
        if keys:
            if not given:
                raise ProtocolError(
                    401,
                    "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                    {"WWW-Authenticate": "Bearer"},
                )
            if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
                raise ProtocolError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
            return f"key:{request.state.key_id}"
        return f"host:{request.client.host if request.client else '?'}"

    def get_model(request: Request, name: str, version: str | None = None) -> ServedModel:
        request.state.model = name
        model = models.get(name)
        if model is None:
            raise ProtocolError(
                404, f"unknown model {name!r}; POST /v2/repository/index lists the served models"
            )
        if version is not None and version != MODEL_VERSION:
            raise ProtocolError(
                404, f"model {name!r} has no version {version!r} (versions: [{MODEL_VERSION}])"
            )
        return model

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(json_dumps({"live": True}), media_type="application/json")

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(json_dumps({"ready": True}), media_type="application/json")

    @app.get("/v2")
    async def server_metadata(request: Request) -> Response:
        authorize(request)
        meta = {"name": SERVER_NAME, "version": server_version, "extensions": list(EXTENSIONS)}
        return Response(json_dumps(meta), media_type="application/json")

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        authorize(request)
        index = [{"name": n, "version": MODEL_VERSION, "state": "READY"} for n in models]
        return Response(json_dumps(index), media_type="application/json")

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
        authorize(request)
        model = get_model(request, name, version)
        return Response(json_dumps(model.metadata(max_batch)), media_type="application/json")

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
        authorize(request)
        get_model(request, name, version)
        return Response(json_dumps({"name": name, "ready": True}), media_type="application/json")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > body_limit:
            raise ProtocolError(
                413, f"request body of {length} bytes exceeds the limit of {body_limit} bytes"
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > body_limit:
                    raise ProtocolError(
                        413, f"request body exceeds the limit of {body_limit} bytes"
                    )
                chunks.append(chunk)
        except ClientDisconnect:  # the client went away: not a server error (499, as nginx)
            raise ProtocolError(499, "client disconnected before sending its request") from None
        return b"".join(chunks)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        bucket_key = authorize(request)
        model = get_model(request, name, version)
        if bucket is not None:
            wait = bucket.take(bucket_key)
            if wait > 0:
                raise ProtocolError(
                    429,
                    f"rate limit of {bucket.rate:g} requests/s exceeded; retry in {wait:.2f}s",
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
        body = await read_body(request)
        hl = request.headers.get(HEADER_LENGTH)
        try:
            header_len = int(hl) if hl is not None else None
        except ValueError:
            raise ProtocolError(
                400, f"Inference-Header-Content-Length {hl!r} is not an integer"
            ) from None

        def run() -> tuple[bytes, dict[str, str], str, int]:
            info = model.info
            x, req, binary_out = decode_request(
                body,
                header_len,
                model=info.name,
                channels=info.channels,
                image_size=info.image_size,
                max_batch=max_batch,
            )
            try:
                scores = model.infer(x)
            except InvalidQueryError as e:
                raise ProtocolError(400, str(e)) from None
            except QueryBudgetExceeded as e:
                raise ProtocolError(403, f"server-side query quota exhausted: {e}") from None
            content, headers, media = encode_response(
                model.info.name, MODEL_VERSION, req, scores, binary_out
            )
            return content, headers, media, int(x.shape[0])

        content, headers, media, batch = await run_in_threadpool(run)
        request.state.batch = batch
        return Response(content, headers=headers, media_type=media)

    app.add_middleware(_AccessLog)
    return app
