"""``HttpAPI``: a model behind an Open Inference Protocol v2 REST server, as a black-box API.

Talks to ``apimeta serve`` (see :mod:`apimeta.apis.server`) or any v2 server (KServe, Triton). The
client keeps one keep-alive ``httpx.Client``; splits batches to the server's max batch size; uses
the binary tensor extension when the server advertises it (JSON otherwise); retries connection
errors, timeouts, 429 (honouring ``Retry-After``), 502, 503 and 504 with exponential backoff and
seeded jitter, and never retries other 4xx. When retries run out it raises an :class:`APIError`
subclass, so a training run stops cleanly (and resumes from its checkpoint and query cache).

Ledger rules: a batch is charged as a whole *before* any of its chunks is sent (so
:class:`QueryBudgetExceeded` stops before spending anything); each re-send is recorded with
``charge(..., retry=True, billed=bill_retries)``, so retries are visible and the budget is
never silently exceeded.

Model discovery (:func:`load_http_zoo`) uses the model repository extension,
``POST /v2/repository/index`` (JSON body ``{}``), which ``apimeta serve`` implements; to use a
server without it, point at one model: ``http://host:port/v2/models/NAME``.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import torch
from torch import Tensor

from apimeta.apis.base import (
    API_SOURCES,
    APIInfo,
    parse_output_mode,
    restrict_output,
    validate_query,
)
from apimeta.apis.cache import QueryCache, cached_query
from apimeta.apis.describe import FLOAT_TYPES, InputAdapter, ModelSpec
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.v2 import HEADER_LENGTH, decode_response, encode_request
from apimeta.errors import APIError, ConfigError, InvalidQueryError

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 502, 503, 504})
API_KEY_ENV = "APIMETA_API_KEY"


class HttpAPIError(APIError):
    """An HTTP API request failed; ``status`` is the last HTTP status (None: no response)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class APIUnreachableError(HttpAPIError):
    """The server could not be reached (or kept failing) after every retry."""


class ModelNotFoundError(HttpAPIError):
    """The server does not serve the requested model (HTTP 404)."""


class ProtocolMismatchError(HttpAPIError):
    """The server's answers do not follow the Open Inference Protocol v2."""


class BadOutputError(HttpAPIError):
    """The server answered, but its scores are malformed (shape, datatype, NaN)."""


def _retry_after(resp: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or HTTP date), or None."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict) and "error" in body:
            return str(body["error"])
    except (ValueError, UnicodeDecodeError):
        pass
    return resp.text[:200]


class HttpSession:
    """One server: base URL, a keep-alive ``httpx.Client``, API key and the retry policy.

    ``api_key``: sent as ``Authorization: Bearer KEY``; None reads ``$APIMETA_API_KEY``.

    Shared by every :class:`HttpAPI` of a server. ``max_retries``: re-sends after the first
    attempt. Backoff before re-send ``k`` (0-based) is ``b = min(max_backoff, backoff * 2**k)``
    drawn uniformly in ``[b/2, b]`` from ``random.Random(seed)``; a 429 waits its ``Retry-After``
    (at most ``max_retry_after`` s) instead. ``binary``: use the binary tensor extension (None:
    when the server advertises it). ``stats`` counts requests, attempts, retries (by reason) and
    the total backoff wait.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        max_retry_after: float = 60.0,
        seed: int = 0,
        binary: bool | None = None,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"API server URL must look like http://host:port, got {base_url!r}")
        if max_retries < 0 or backoff < 0 or timeout <= 0:
            raise ConfigError(
                f"need max_retries >= 0, backoff >= 0, timeout > 0; got {max_retries}, "
                f"{backoff}, {timeout}"
            )
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.max_retry_after = max_retry_after
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._own_client = client is None
        self.client = client or httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            headers=headers,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )
        if not self._own_client and api_key:
            self.client.headers.update(headers)
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._server: dict[str, Any] | None = None
        self._binary = binary

    # ---- low level --------------------------------------------------------------------------
    def _count(self, **incs: float) -> None:
        with self._stats_lock:
            for k, v in incs.items():
                self.stats[k] += v

    def _delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * (2**attempt))
        with self._rng_lock:
            return base / 2 + self._rng.uniform(0, base / 2)

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        before_retry: Callable[[], None] | None = None,
        what: str = "request",
    ) -> httpx.Response:
        """Send with retries; returns a 2xx/3xx response or raises an :class:`HttpAPIError`.

        ``before_retry`` runs before every re-send (the ledger charge of a retry).
        """
        self._count(requests=1)
        last = ""
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            if attempt > 0:
                if before_retry is not None:
                    before_retry()
                self._count(retries=1)
            self._count(attempts=1)
            wait: float | None = None
            try:
                resp = self.client.request(method, path, content=content, headers=headers)
            except httpx.TransportError as e:  # connect errors, timeouts, dropped connections
                reason = type(e).__name__
                last, status = f"{reason}: {e}", None
            else:
                if resp.status_code < 400:
                    return resp
                status = resp.status_code
                if status not in RETRY_STATUS:
                    raise self._status_error(resp, path, what)
                reason = str(status)
                last = f"HTTP {status}: {_error_text(resp)}"
                if status == 429:
                    ra = _retry_after(resp)
                    if ra is not None:
                        wait = min(ra, self.max_retry_after)
            self._count(**{f"fail_{reason}": 1})
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = self._delay(attempt)
            self._count(wait_s=wait)
            logger.debug("%s %s failed (%s); retry %d in %.3fs", method, path, last, attempt, wait)
            if wait > 0:
                self._sleep(wait)
        self._count(failed=1)
        hint = (
            "Is the server running (`apimeta serve --zoo DIR`) and the URL right?"
            if status is None
            else "The server is overloaded or failing; try again later or raise max_retries."
        )
        raise APIUnreachableError(
            f"{what} {method} {self.base_url}{path} failed after {self.max_retries + 1} "
            f"attempts (last: {last}). {hint}",
            status,
        )

    def _status_error(self, resp: httpx.Response, path: str, what: str) -> HttpAPIError:
        code, msg = resp.status_code, _error_text(resp)
        where = f"{what} {self.base_url}{path}"
        if code == 401:
            return HttpAPIError(
                f"{where}: unauthorized ({msg}); pass the server's API key (api_key=..., "
                "--api-key-file)",
                code,
            )
        if code == 404:
            return ModelNotFoundError(f"{where}: not found ({msg})", code)
        if code == 413:
            return HttpAPIError(
                f"{where}: request too large ({msg}); lower max_batch or the image size", code
            )
        return HttpAPIError(f"{where}: HTTP {code}: {msg}", code)

    def get_json(self, path: str, what: str, method: str = "GET", body: Any | None = None) -> Any:
        """``method path`` (with ``body`` as JSON, if given) -> the parsed JSON answer."""
        content = headers = None
        if body is not None:
            content, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        resp = self.request(method, path, content=content, headers=headers, what=what)
        try:
            return resp.json()
        except (ValueError, UnicodeDecodeError):
            raise ProtocolMismatchError(
                f"{what} {self.base_url}{path} did not answer JSON; is this an Open Inference "
                "Protocol v2 server?"
            ) from None

    # ---- protocol ---------------------------------------------------------------------------
    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2`` (cached): name, version, extensions."""
        if self._server is None:
            meta = self.get_json("/v2", "server metadata")
            if not isinstance(meta, dict) or "extensions" not in meta:
                raise ProtocolMismatchError(
                    f"{self.base_url}/v2 is not Open Inference Protocol v2 server metadata "
                    f"(got {str(meta)[:120]!r})"
                )
            self._server = meta
        return self._server

    @property
    def binary(self) -> bool:
        """Whether to send/receive tensors with the binary tensor data extension."""
        if self._binary is None:
            self._binary = "binary_tensor_data" in self.server_metadata().get("extensions", [])
        return self._binary

    def model_names(self) -> list[str]:
        """Names of the READY models (model repository extension, ``POST /v2/repository/index``)."""
        try:  # a JSON body: servers that validate it (Triton, KServe) refuse an empty one
            index = self.get_json("/v2/repository/index", "model index", method="POST", body={})
        except HttpAPIError as e:
            if e.status is None or not 400 <= e.status < 500 or e.status in (401, 413):
                raise
            raise ProtocolMismatchError(
                f"{self.base_url} did not list its models (POST /v2/repository/index answered "
                f"HTTP {e.status}; the model repository extension is optional); give one model "
                "as http://host:port/v2/models/NAME",
                e.status,
            ) from None
        if not isinstance(index, list):
            raise ProtocolMismatchError(
                f"{self.base_url}/v2/repository/index did not answer a list"
            )
        return [m["name"] for m in index if m.get("state", "READY") == "READY" and "name" in m]

    def close(self) -> None:
        if self._own_client:
            self.client.close()


def _tensor_specs(meta: Any, name: str, base_url: str) -> tuple[dict, dict]:
    """(input spec, output spec) of v2 model metadata: the model's own tensor names, shapes and
    datatypes. One input; the first output is read unless a description names another."""
    try:
        inputs, outputs = meta["inputs"], meta["outputs"]
        if len(inputs) != 1:
            raise ValueError(
                f"{len(inputs)} inputs ({', '.join(str(i.get('name')) for i in inputs)})"
            )
        inp, out = inputs[0], outputs[0]
        str(inp["name"]), str(out["name"])
        if inp.get("datatype", "FP32") not in FLOAT_TYPES:
            raise ValueError(
                f"input datatype {inp.get('datatype')!r}; apimeta sends FP32, FP16 or FP64"
            )
        return inp, out
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise ProtocolMismatchError(
            f"model metadata of {name!r} at {base_url} names no usable input and output tensor "
            f"({type(e).__name__}: {e})"
        ) from None


#: the metadata ``parameters`` a model must carry to be used without a description
OWN_PARAMETERS = ("dataset", "classes", "output")


def _info_from_metadata(meta: Any, name: str, base_url: str) -> tuple[APIInfo, int | None]:
    """APIInfo (and the server's max batch, if given) from the v2 model metadata of an
    apimeta-style server (``parameters`` say dataset, classes and output)."""
    p = meta.get("parameters") if isinstance(meta, dict) else None
    p = p if isinstance(p, dict) else {}
    missing = [k for k in OWN_PARAMETERS if k not in p]
    if missing:
        raise ConfigError(
            f"model {name!r} at {base_url} does not say its {', '.join(missing)} (its metadata "
            "has no such parameters); describe it in an API description file and pass that "
            "as the zoo (see the README, 'Bring your own API')"
        )
    try:
        shape_in = [int(s) for s in meta["inputs"][0]["shape"]]
        shape_out = [int(s) for s in meta["outputs"][0]["shape"]]
        if len(shape_in) != 4 or len(shape_out) != 2 or shape_in[2] != shape_in[3]:
            raise ValueError(f"input shape {shape_in}, output shape {shape_out}")

        def lst(key: str, default: list) -> list:
            v = p.get(key)
            return json.loads(v) if isinstance(v, str) else (v if v is not None else default)

        classes = lst("classes", [])
        info = APIInfo(
            name=name,
            dataset=str(p["dataset"]),
            classes=tuple(int(c) for c in classes),
            class_names=tuple(str(c) for c in lst("class_names", [str(c) for c in classes])),
            channels=shape_in[1],
            image_size=shape_in[2],
            output=str(p["output"]),
            mean=tuple(float(m) for m in lst("mean", [])),
            std=tuple(float(s) for s in lst("std", [])),
            tags={**dict(lst("tags", {})), "server": base_url},
        )
        parse_output_mode(info.output)
        if info.n_classes != shape_out[1]:
            raise ValueError(f"{info.n_classes} classes but output shape {shape_out}")
        mb = p.get("max_batch_size")
        return info, (int(mb) if mb is not None else None)
    except (KeyError, IndexError, TypeError, ValueError, InvalidQueryError) as e:
        raise ProtocolMismatchError(
            f"model metadata of {name!r} at {base_url} is not usable v2 metadata for an image "
            f"classifier (input [-1, C, S, S], output [-1, n_classes]): {e}"
        ) from None


def _max_batch_of(meta: Any) -> int | None:
    p = meta.get("parameters") if isinstance(meta, dict) else None
    mb = p.get("max_batch_size") if isinstance(p, dict) else None
    try:
        return int(mb) if mb is not None and int(mb) > 0 else None
    except (TypeError, ValueError):
        return None


class HttpAPI:
    """A model served over HTTP, as a :class:`~apimeta.apis.base.BlackBoxAPI`.

    ``info`` comes from the model metadata, or from ``spec`` (an API description, for models
    whose metadata does not say their classes; see :mod:`apimeta.apis.describe`), checked
    against the metadata's shapes. ``output``: None takes the server's output mode; a
    further restriction of a ``logits`` server is applied client-side (a client can never get
    more than the server serves). ``concurrency``: chunks in flight at once (thread pool).
    ``max_batch``: images per request (default: the server's ``max_batch_size``).
    ``cache``: a :class:`QueryCache`; cached images are neither sent nor billed.
    Other keyword arguments (timeout, retries, backoff, seed, binary, api_key) configure the
    :class:`HttpSession` unless ``session`` is given.
    """

    def __init__(
        self,
        base_url: str,
        model_name: str,
        *,
        ledger: QueryLedger | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        max_retry_after: float = 60.0,
        concurrency: int = 1,
        bill_retries: bool = False,
        cache: QueryCache | None = None,
        output: str | None = None,
        max_batch: int | None = None,
        binary: bool | None = None,
        seed: int = 0,
        session: HttpSession | None = None,
        check_range: bool = True,
        spec: ModelSpec | None = None,
    ):
        self._own_session = session is None
        self.session = session or HttpSession(
            base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            max_retry_after=max_retry_after,
            seed=seed,
            binary=binary,
        )
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.ledger = ledger if ledger is not None else QueryLedger()
        self.bill_retries, self.concurrency, self.cache = bill_retries, concurrency, cache
        self.check_range = check_range
        self.model_name = model_name
        self._path = f"/v2/models/{model_name}"
        self.session.server_metadata()  # fail early on a wrong URL or a non-v2 server
        try:
            meta = self.session.get_json(self._path, "model metadata")
        except ModelNotFoundError:
            try:
                known = ", ".join(self.session.model_names()) or "none"
            except HttpAPIError:
                known = "unknown"
            raise ModelNotFoundError(
                f"{self.session.base_url} serves no model {model_name!r} (served: {known})", 404
            ) from None
        base = self.session.base_url
        tin, tout = _tensor_specs(meta, model_name, base)
        if spec is None:
            served, server_batch = _info_from_metadata(meta, model_name, base)
            self.adapter = InputAdapter()
        else:
            if spec.output_name is not None:
                named = [o for o in meta["outputs"] if o.get("name") == spec.output_name]
                if not named:
                    raise ConfigError(
                        f"model {model_name!r} at {base} has no output {spec.output_name!r} "
                        f"(outputs: {', '.join(str(o.get('name')) for o in meta['outputs'])})"
                    )
                tout = named[0]
            if spec.input_name is not None and spec.input_name != tin["name"]:
                raise ConfigError(
                    f"model {model_name!r} at {base} takes input {tin['name']!r}, not "
                    f"{spec.input_name!r} as described"
                )
            served = spec.complete(
                tin.get("shape"), tout.get("shape"), f"model {model_name!r} at {base}",
                tags={"server": base},
            )  # fmt: skip
            server_batch = _max_batch_of(meta)
            self.adapter = dataclasses.replace(spec.adapter, dtype=tin.get("datatype", "FP32"))
        self.input_name, self.output_name = str(tin["name"]), str(tout["name"])
        self.server_output = served.output
        self._extra: str | None = None
        if output is not None and output != served.output:
            parse_output_mode(output)
            if served.output != "logits":
                raise ConfigError(
                    f"{self.session.base_url} serves {model_name!r} as {served.output!r}; a "
                    f"client cannot get {output!r} from it (the server restricts outputs)"
                )
            self._extra = output
            served = dataclasses.replace(served, output=output)
        self.info = served
        limits = [b for b in (max_batch, server_batch) if b]
        self.max_batch = min(limits) if limits else 256
        self._pool: ThreadPoolExecutor | None = None

    @property
    def stats(self) -> Counter[str]:
        """Request/attempt/retry counters of this API's :class:`HttpSession`."""
        return self.session.stats

    def query(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, n_classes) scores, detached, on x's device."""
        validate_query(x, self.info, self.check_range)
        if self.cache is not None:
            return cached_query(self.cache, self.info, self.ledger, x, self._fetch)
        return self._fetch(x)

    def _fetch(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return torch.empty(0, self.info.n_classes, device=x.device)
        # the whole batch is charged before any chunk is sent: a batch the budget cannot pay
        # for is refused with nothing spent (as LocalAPI does)
        self.ledger.charge(self.info.name, int(x.shape[0]))
        arr = self.adapter(x)  # the model's layout, scaling and datatype
        chunks = [arr[i : i + self.max_batch] for i in range(0, arr.shape[0], self.max_batch)]
        if self.concurrency > 1 and len(chunks) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="httpapi")
            parts = list(self._pool.map(self._send, chunks))
        else:
            parts = [self._send(c) for c in chunks]
        out = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
        if self._extra is not None:
            out = restrict_output(out, self._extra)
        return out.to(x.device)

    def _send(self, arr: np.ndarray) -> np.ndarray:
        """POST one chunk (n, ...) -> (n, n_classes) float32 (already charged by
        :meth:`_fetch`; re-sends are charged as retries)."""
        n, name = int(arr.shape[0]), self.info.name
        body, headers = encode_request(arr, self.session.binary, self.input_name, self.output_name)

        def before_retry() -> None:
            self.ledger.charge(name, n, retry=True, billed=self.bill_retries)

        resp = self.session.request(
            "POST",
            f"{self._path}/infer",
            content=body,
            headers=headers,
            before_retry=before_retry,
            what=f"query of {n} images to {name!r}:",
        )
        return self._decode(resp, n)

    def _decode(self, resp: httpx.Response, n: int) -> np.ndarray:
        hl = resp.headers.get(HEADER_LENGTH)
        where = f"{self.session.base_url}{self._path}/infer"
        try:
            shape, dtype, scores = decode_response(resp.content, hl, self.output_name)
        except (ValueError, KeyError, TypeError, StopIteration) as e:
            raise ProtocolMismatchError(
                f"{where} answered something that is not a v2 inference response with output "
                f"{self.output_name!r} ({type(e).__name__}: {e})"
            ) from None
        want = [n, self.info.n_classes]
        if dtype not in FLOAT_TYPES or shape != want or scores.size != n * self.info.n_classes:
            raise BadOutputError(
                f"{where} returned {dtype} scores of shape {shape} with {scores.size} values; "
                f"expected FP32 (or FP16, FP64) {want}"
            )
        scores = scores.astype(np.float32, copy=True).reshape(want)
        if not np.isfinite(scores).all():
            raise BadOutputError(f"{where} returned NaN or infinite scores for {n} images")
        return scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._own_session:
            self.session.close()

    def __enter__(self) -> HttpAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpAPI({self.session.base_url!r}, {self.model_name!r})"


_SESSION_KEYS = (
    "api_key",
    "timeout",
    "max_retries",
    "backoff",
    "max_backoff",
    "max_retry_after",
    "seed",
    "binary",
)


def load_http_zoo(
    url: str,
    ledger: QueryLedger | None = None,
    output: str | None = None,
    specs: list[ModelSpec] | None = None,
    **options: Any,
) -> list[HttpAPI]:
    """All READY models of the server at ``url`` as :class:`HttpAPI` s sharing one session.

    ``url``: ``http://host:port`` (models listed by ``POST /v2/repository/index``) or
    ``http://host:port/v2/models/NAME`` (that model only). ``output``: None or the server's mode
    takes what the server serves; ``"logits"`` (the default of ``load_zoo``) also accepts a more
    restricted server; a stricter mode than the server's is applied client-side. ``specs``: the
    described models (an API description): exactly these are used. ``options``:
    :class:`HttpAPI` keyword arguments.
    """
    ledger = ledger if ledger is not None else QueryLedger()
    session = HttpSession(url, **{k: options.pop(k) for k in _SESSION_KEYS if k in options})
    path = urlsplit(url).path.rstrip("/")
    by_name = {m.name: m for m in specs or []}
    if specs:
        names = list(by_name)
    elif path.startswith("/v2/models/"):
        names = [path.split("/")[3]]
    elif path in ("", "/v2"):
        names = session.model_names()
    else:
        raise ConfigError(
            f"URL {url!r} must be http://host:port or http://host:port/v2/models/NAME"
        )
    apis = []
    for name in names:
        spec = by_name.get(name)
        api = HttpAPI(session.base_url, name, ledger=ledger, session=session, spec=spec, **options)
        if output is not None and output != api.info.output:
            if output == "logits":
                logger.info("%s serves %s; using that", name, api.info.output)
            else:
                api = HttpAPI(
                    session.base_url,
                    name,
                    ledger=ledger,
                    session=session,
                    output=output,
                    spec=spec,
                    **options,
                )
        apis.append(api)
    if not apis:
        raise APIError(f"the server at {session.base_url} serves no ready models")
    return apis


@API_SOURCES.register("http")
class HttpZoo:
    """The models of an Open Inference Protocol v2 server: ``http(s)://host:port[/v2/models/N]``."""

    priority = 0
    handles_cache = True

    @staticmethod
    def matches(source: str) -> bool:
        return is_http(source)

    @staticmethod
    def load(
        source: str, *, ledger: QueryLedger, output: str, device: str = "cpu", **options: Any
    ) -> list[HttpAPI]:
        options.pop("max_batch", None)  # the server's max_batch_size applies
        return load_http_zoo(source, ledger=ledger, output=output, **options)


def is_http(source: object) -> bool:
    """Whether ``source`` is an http(s) URL."""
    return isinstance(source, str) and source.startswith(("http://", "https://"))


__all__ = [
    "APIUnreachableError",
    "BadOutputError",
    "HttpAPI",
    "HttpAPIError",
    "HttpSession",
    "HttpZoo",
    "ModelNotFoundError",
    "ProtocolMismatchError",
    "is_http",
    "load_http_zoo",
]
