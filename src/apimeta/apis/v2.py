"""The Open Inference Protocol v2 wire format, shared by the client (:mod:`apimeta.apis.http`)
and the server (:mod:`apimeta.apis.server`). No web framework here.

An infer request carries one FP32 input ``input`` of shape [B, C, H, W] (images in [0, 1]) and
asks for the output ``scores`` [B, n_classes]. Tensors travel either as JSON ``data`` lists or
with the *binary tensor data* extension: the JSON header, then raw little-endian FP32 bytes; the
header's length is sent in ``Inference-Header-Content-Length`` and each binary tensor carries
``parameters.binary_data_size``. Clients ask for binary outputs with
``"parameters": {"binary_data_output": true}`` or per output ``{"binary_data": true}``.

Decoding a request raises :class:`ProtocolError` (an HTTP status and a message); decoding a
response raises ``ValueError``/``KeyError``/``TypeError``/``StopIteration`` (the client maps them
to its own errors).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from apimeta.apis.base import check_image_range
from apimeta.errors import InvalidQueryError

try:  # orjson parses/serializes the ~MB JSON tensors several times faster than json
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; keep a fallback anyway
    _orjson = None

INPUT_NAME = "input"
OUTPUT_NAME = "scores"
HEADER_LENGTH = "inference-header-content-length"


class ProtocolError(Exception):
    """A request the server answers as ``{"error": message}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def json_dumps(obj: Any) -> bytes:
    """Serialize to compact JSON bytes (numpy arrays allowed)."""
    if _orjson is not None:
        return _orjson.dumps(obj, option=_orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(obj, default=lambda o: o.tolist()).encode()


def json_loads(data: bytes | str) -> Any:
    """Parse JSON bytes (orjson when available)."""
    if _orjson is not None:
        return _orjson.loads(data)
    return json.loads(data)


#: float datatypes on the wire -> little-endian numpy dtype
WIRE_TYPES = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8"}


def datatype_of(arr: np.ndarray) -> str:
    """The v2 datatype of a float array (FP32, FP16, FP64)."""
    for name, code in WIRE_TYPES.items():
        if arr.dtype == np.dtype(code):
            return name
    raise TypeError(f"no v2 float datatype for {arr.dtype}")


def _with_binary(
    head: dict[str, Any], tensor: dict[str, Any], arr: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    raw = arr.astype(WIRE_TYPES[tensor["datatype"]], copy=False).tobytes()
    tensor["parameters"] = {**tensor.get("parameters", {}), "binary_data_size": len(raw)}
    body = json_dumps(head)
    return body + raw, {"Inference-Header-Content-Length": str(len(body))}


# ----------------------------------------------------------------------------- requests


def _check_parameters(obj: dict[str, Any], what: str) -> None:
    """``parameters``, where given, must be a JSON object (400 otherwise)."""
    params = obj.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ProtocolError(400, f"'parameters' of {what} must be an object, got {params!r}")


def encode_request(
    images: np.ndarray,
    binary: bool,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> tuple[bytes, dict[str, str]]:
    """An infer request for float ``images`` in the model's input shape and datatype (e.g.
    (B, C, H, W) float32) -> (body, HTTP headers). The tensor names are the model's (its
    metadata)."""
    spec: dict[str, Any] = {
        "name": input_name,
        "shape": list(images.shape),
        "datatype": datatype_of(images),
    }
    if binary:
        head = {
            "inputs": [spec],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        }
        body, headers = _with_binary(head, spec, images)
        return body, {**headers, "Content-Type": "application/octet-stream"}
    spec["data"] = images.reshape(-1)
    body = json_dumps({"inputs": [spec], "outputs": [{"name": output_name}]})
    return body, {"Content-Type": "application/json"}


def decode_request(
    body: bytes,
    header_len: int | None,
    *,
    model: str,
    channels: int,
    image_size: int,
    max_batch: int,
) -> tuple[torch.Tensor, dict[str, Any], bool]:
    """Decode an infer request -> (images (B, C, H, W) float32 checked to lie in [0, 1], the
    request JSON, whether binary output was asked for). Raises :class:`ProtocolError`."""
    if header_len is not None:
        if header_len < 0 or header_len > len(body):
            raise ProtocolError(
                400,
                f"Inference-Header-Content-Length is {header_len} but the body has "
                f"{len(body)} bytes",
            )
        head, binary = body[:header_len], memoryview(body)[header_len:]
    else:
        head, binary = body, None
    try:
        req = json_loads(head)
    except (ValueError, TypeError) as e:
        raise ProtocolError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise ProtocolError(400, "request JSON must be an object with an 'inputs' list")
    _check_parameters(req, "the request")
    if len(req["inputs"]) != 1 or not isinstance(req["inputs"][0], dict):
        raise ProtocolError(400, f"model {model!r} takes exactly one input named {INPUT_NAME!r}")
    tin = req["inputs"][0]
    _check_parameters(tin, f"input {INPUT_NAME!r}")
    if tin.get("name") != INPUT_NAME:
        raise ProtocolError(
            400, f"unknown input {tin.get('name')!r}; model {model!r} takes {INPUT_NAME!r}"
        )
    if tin.get("datatype") != "FP32":
        raise ProtocolError(
            400, f"input {INPUT_NAME!r} must have datatype FP32, got {tin.get('datatype')!r}"
        )
    shape = tin.get("shape")
    want = [channels, image_size, image_size]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
        or shape[0] < 1
        or shape[1:] != want
    ):
        raise ProtocolError(
            400,
            f"input {INPUT_NAME!r} of model {model!r} must have shape [B, {want[0]}, "
            f"{want[1]}, {want[2]}] with B >= 1, got {shape!r}",
        )
    if shape[0] > max_batch:
        raise ProtocolError(
            413, f"batch of {shape[0]} images exceeds this server's max batch size {max_batch}"
        )
    n = math.prod(shape)
    params = tin.get("parameters") or {}
    if binary is not None and "binary_data_size" in params:
        size = params["binary_data_size"]
        if size != n * 4 or len(binary) != size:
            raise ProtocolError(
                400,
                f"binary input must hold {n} FP32 values = {n * 4} bytes; header says "
                f"{size!r}, body carries {len(binary)}",
            )
        arr = np.frombuffer(binary, dtype="<f4").astype(np.float32, copy=True)
    else:
        data = tin.get("data")
        if data is None:
            raise ProtocolError(400, f"input {INPUT_NAME!r} has no 'data' (and no binary data)")
        try:
            raw = np.asarray(data)
            if raw.dtype.kind not in "iuf":  # strings, booleans, null, ragged lists
                raise TypeError(raw.dtype)
            arr = raw.astype(np.float32).reshape(-1)
        except (ValueError, TypeError):
            raise ProtocolError(
                400,
                f"input {INPUT_NAME!r} 'data' must be a (flat or nested) list of numbers "
                "(no strings, booleans or null)",
            ) from None
        if arr.size != n:
            raise ProtocolError(
                400, f"input {INPUT_NAME!r} has {arr.size} values but shape {shape} needs {n}"
            )
    x = torch.from_numpy(arr).view(*shape)
    try:
        check_image_range(x, f"input {INPUT_NAME!r}")
    except InvalidQueryError as e:
        raise ProtocolError(400, str(e)) from None
    outputs = req.get("outputs")
    binary_out = bool((req.get("parameters") or {}).get("binary_data_output", False))
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ProtocolError(400, "'outputs' must be a list of objects")
        for o in outputs:
            _check_parameters(o, f"output {o.get('name')!r}")
            if {"class_count", "classification"} & set(o.get("parameters") or {}):
                raise ProtocolError(
                    400,
                    "the classification extension (class_count) is not implemented by this "
                    f"server; ask for the {OUTPUT_NAME!r} tensor and take the top classes of it",
                )
            if o.get("name") != OUTPUT_NAME:
                raise ProtocolError(
                    400,
                    f"unknown output {o.get('name')!r}; model {model!r} has only {OUTPUT_NAME!r}",
                )
            binary_out = bool((o.get("parameters") or {}).get("binary_data", binary_out))
    return x, req, binary_out


# ----------------------------------------------------------------------------- responses


def encode_response(
    model: str, version: str, req: dict[str, Any], scores: np.ndarray, binary: bool
) -> tuple[bytes, dict[str, str], str]:
    """The infer response for ``scores`` (B, K) float32 -> (body, headers, media type)."""
    out: dict[str, Any] = {"name": OUTPUT_NAME, "shape": list(scores.shape), "datatype": "FP32"}
    resp: dict[str, Any] = {"model_name": model, "model_version": version}
    if "id" in req:
        resp["id"] = req["id"]
    resp["outputs"] = [out]
    if binary:
        body, headers = _with_binary(resp, out, scores)
        return body, headers, "application/octet-stream"
    out["data"] = scores.reshape(-1)
    return json_dumps(resp), {}, "application/json"


def decode_response(
    body: bytes, header_len: int | str | None, output_name: str = OUTPUT_NAME
) -> tuple[list[int], Any, np.ndarray]:
    """(shape, datatype, values as a flat float32 array) of the output ``output_name``.

    ``header_len``: the ``Inference-Header-Content-Length`` header (None: all JSON). Binary
    outputs may be FP32, FP16 or FP64. Raises ``StopIteration`` when the response has no such
    output."""
    head_len = int(header_len) if header_len is not None else len(body)
    head = json_loads(body[:head_len])
    out = next(o for o in head["outputs"] if o.get("name") == output_name)
    shape, dtype = [int(s) for s in out["shape"]], out.get("datatype")
    params = out.get("parameters") or {}
    if "binary_data_size" in params:
        size = int(params["binary_data_size"])
        if dtype not in WIRE_TYPES:
            raise ValueError(f"binary output of datatype {dtype!r}; expected FP32, FP16 or FP64")
        raw = np.frombuffer(body[head_len : head_len + size], dtype=WIRE_TYPES[dtype])
        scores = raw.astype(np.float32)
    else:
        scores = np.asarray(out["data"], dtype=np.float32)
    return shape, dtype, scores


__all__ = [
    "HEADER_LENGTH",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "WIRE_TYPES",
    "ProtocolError",
    "datatype_of",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "json_dumps",
    "json_loads",
]
