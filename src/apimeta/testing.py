"""Test and benchmark helpers: uvicorn in a thread, a fault-injecting HTTP proxy, tiny zoos.

Used by the test suite and `benchmarks/` (`from apimeta.testing import FaultyProxy`); servers bind to
127.0.0.1 only. Not imported by the rest of the library."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from torch.optim.optimizer import register_optimizer_step_post_hook

from apimeta.apis import APIInfo, LocalAPI
from apimeta.config import from_dict, merge, to_dict
from apimeta.run_config import RunConfig, migrate_legacy


class UvicornThread:
    """Run an ASGI app with a real uvicorn on 127.0.0.1 (free port) in a daemon thread."""

    def __init__(self, app: Any):
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="error", access_log=False, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_FORWARD = ("content-type", "inference-header-content-length", "authorization", "x-api-key")
_BACK = ("content-type", "inference-header-content-length", "retry-after")


class FaultyProxy:
    """An HTTP proxy in front of a v2 server that injects scripted faults into infer requests.

    ``faults``: actions consumed one per ``.../infer`` request (then ``"ok"``): ``"ok"``,
    ``"503"`` (any status code), ``"429:SECONDS"`` (with Retry-After), ``"slow:SECONDS"`` (sleep,
    then forward), ``"drop"`` (close the connection without an answer), ``"nan"`` (binary NaN
    scores), ``"badshape"`` (one score too many per row). ``default``: the action when the
    queue is empty. ``log`` lists (path, action) of every infer request; ``counts`` counts actions.
    """

    def __init__(self, upstream: str, faults: Iterable[str] = (), default: str = "ok"):
        self.upstream = upstream
        self.faults: deque[str] = deque(faults)
        self.default = default
        self.log: list[tuple[str, str]] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.client = httpx.Client(base_url=upstream, timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._handle()

            def do_POST(self) -> None:
                self._handle()

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout): nothing to do
                    self.close_connection = True

            def _forward(self, body: bytes) -> httpx.Response:
                headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARD}
                return proxy.client.request(self.command, self.path, content=body, headers=headers)

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                action = proxy.next_action(self.path)
                if action == "drop":
                    self.close_connection = True
                    return
                if action.startswith("slow:"):
                    time.sleep(float(action.split(":")[1]))
                    action = "ok"
                if action == "ok" or action in ("nan", "badshape"):
                    resp = self._forward(body)
                    out = resp.content
                    headers = {k: v for k, v in resp.headers.items() if k.lower() in _BACK}
                    if action != "ok" and resp.status_code == 200:
                        out, headers = proxy.corrupt(resp, action)
                    self._send(resp.status_code, out, headers)
                    return
                if action.startswith("429"):
                    wait = action.split(":")[1] if ":" in action else "0"
                    err = json.dumps({"error": "injected rate limit"}).encode()
                    self._send(429, err, {"Content-Type": "application/json", "Retry-After": wait})
                    return
                err = json.dumps({"error": f"injected {action}"}).encode()
                self._send(int(action), err, {"Content-Type": "application/json"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def next_action(self, path: str) -> str:
        with self.lock:
            if not path.endswith("/infer"):
                return "ok"
            action = self.faults.popleft() if self.faults else self.default
            self.log.append((path, action))
            self.counts[action] += 1
            return action

    def set_faults(self, faults: Iterable[str], default: str = "ok") -> None:
        with self.lock:
            self.faults = deque(faults)
            self.default = default
            self.log.clear()
            self.counts.clear()

    @staticmethod
    def corrupt(resp: httpx.Response, action: str) -> tuple[bytes, dict[str, str]]:
        hl = resp.headers.get("inference-header-content-length")
        head = json.loads(resp.content[: int(hl)] if hl else resp.content)
        out = head["outputs"][0]
        n, c = out["shape"]
        if action == "badshape":
            out.pop("parameters", None)
            out["shape"], out["data"] = [n, c + 1], [0.0] * (n * (c + 1))
            return json.dumps(head).encode(), {"Content-Type": "application/json"}
        raw = np.full(n * c, np.nan, dtype="<f4").tobytes()
        out.pop("data", None)
        out["parameters"] = {"binary_data_size": len(raw)}
        h = json.dumps(head).encode()
        return h + raw, {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(h)),
        }

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.client.close()
        self.thread.join(timeout=10)


def tiny_model(seed: int, channels: int = 3, image_size: int = 32, n_classes: int = 5):
    """A seeded conv4 (width 8, standard BN with non-trivial running stats) in eval mode."""
    from apimeta.models import build_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_backbone(
            "conv4",
            num_classes=n_classes,
            in_channels=channels,
            image_size=image_size,
            width=8,
            bn="standard",
            mean=[0.5] * channels,
            std=[0.25] * channels,
        )
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def tiny_info(name: str, channels: int = 3, image_size: int = 32, n_classes: int = 5) -> APIInfo:
    return APIInfo(
        name=name,
        dataset="synthetic",
        classes=tuple(range(10, 10 + n_classes)),
        class_names=tuple(f"class-{c}" for c in range(10, 10 + n_classes)),
        channels=channels,
        image_size=image_size,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        tags={"arch": "conv4"},
    )


def tiny_apis() -> list[LocalAPI]:
    """Two LocalAPIs: ``api-000`` (3 x 32 x 32) and ``api-001`` (1 x 28 x 28), 5 classes."""
    return [
        LocalAPI(tiny_model(0), tiny_info("api-000")),
        LocalAPI(tiny_model(1, 1, 28), tiny_info("api-001", 1, 28)),
    ]


def write_tiny_zoo(root: Path) -> Path:
    """A hand-made 2-API zoo (safetensors + zoo.json) in the format of apimeta.apis.zoo."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (c, s) in enumerate(((3, 32), (1, 28))):
        name = f"api-{i:03d}"
        model = tiny_model(i, c, s)
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(root / f"{name}.safetensors"),
        )
        info = tiny_info(name, c, s)
        entries.append(
            {
                "name": name,
                "file": f"{name}.safetensors",
                "arch": "conv4",
                "width": 8.0,
                "dataset": info.dataset,
                "classes": list(info.classes),
                "class_names": list(info.class_names),
                "channels": c,
                "image_size": s,
                "mean": list(info.mean),
                "std": list(info.std),
                "holdout_acc": 0.5,
            }
        )
    (root / "zoo.json").write_text(json.dumps({"version": 1, "build_args": {}, "apis": entries}))
    return root


def foreign_v2_app(
    models: dict[str, torch.nn.Module],
    channels: int,
    image_size: int,
    *,
    input_name: str = "pixel_values",
    output_name: str = "probabilities",
    scale: float = 255.0,
) -> Any:
    """A third-party-style v2 server (FastAPI) for tests: none of apimeta's conventions.

    Each model takes ``input_name`` flat FP32 ``[B, C*S*S]`` pixel values in ``[0, scale]`` and
    returns two outputs, ``label`` (INT64 argmax, listed first) and ``output_name`` (softmax
    probabilities). No ``parameters`` in the metadata (so no classes), no extensions (JSON
    only: a binary request is a 400), no model repository (``POST /v2/repository/index`` is a
    404); the app counts images received in ``app.state.images``.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.images = 0
    width = channels * image_size * image_size

    def meta(name: str, model: torch.nn.Module) -> dict[str, Any]:
        n = int(model(torch.zeros(1, channels, image_size, image_size)).shape[1])
        return {
            "name": name,
            "versions": ["1"],
            "platform": "sklearn",
            "inputs": [{"name": input_name, "datatype": "FP32", "shape": [-1, width]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": output_name, "datatype": "FP32", "shape": [-1, n]},
            ],
        }

    with torch.no_grad():
        metas = {name: meta(name, m.eval()) for name, m in models.items()}

    @app.get("/v2")
    def server_meta() -> dict[str, Any]:
        return {"name": "thirdparty", "version": "0.1", "extensions": []}

    @app.get("/v2/models/{name}")
    def model_meta(name: str) -> Any:
        if name not in metas:
            return JSONResponse({"error": f"no model {name}"}, 404)
        return metas[name]

    async def infer(name: str, request: Request) -> Any:
        if name not in metas:
            return JSONResponse({"error": f"no model {name}"}, 404)
        if request.headers.get("inference-header-content-length") is not None:
            return JSONResponse({"error": "binary data is not supported"}, 400)
        req = await request.json()
        (tin,) = req["inputs"]
        if tin["name"] != input_name or tin["datatype"] != "FP32":
            return JSONResponse({"error": f"expected FP32 input {input_name}"}, 400)
        shape = tin["shape"]
        if len(shape) != 2 or shape[1] != width:
            return JSONResponse({"error": f"expected shape [B, {width}], got {shape}"}, 400)
        x = torch.tensor(tin["data"], dtype=torch.float32).view(shape[0], width)
        if float(x.min()) < 0 or float(x.max()) > scale * (1 + 1e-5):
            return JSONResponse({"error": f"pixel values must lie in [0, {scale}]"}, 400)
        app.state.images += shape[0]
        with torch.no_grad():
            x = (x / scale).view(-1, channels, image_size, image_size)
            probs = torch.softmax(models[name](x), 1)
        return {
            "model_name": name,
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [shape[0]],
                 "data": probs.argmax(1).tolist()},
                {"name": output_name, "datatype": "FP32", "shape": list(probs.shape),
                 "data": probs.reshape(-1).tolist()},
            ],
        }  # fmt: skip

    infer.__annotations__["request"] = Request  # a real class (annotations here are strings)
    app.post("/v2/models/{name}/infer")(infer)
    return app


@contextlib.contextmanager
def ctrl_c_after_steps(n: int) -> Iterator[None]:
    """Inside the block, Ctrl-C (SIGINT to this process) lands inside the ``n``-th
    ``optimizer.step()`` of any optimizer and raises KeyboardInterrupt as in a terminal (also
    in a process started with SIGINT ignored); hook and handler are restored on leaving."""
    steps: list[int] = []

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        steps.append(1)
        if len(steps) == n:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # a Python handler runs here, between bytecodes

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        signal.signal(signal.SIGINT, old)


def make_config(base: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """A :class:`RunConfig` from ``base`` <- ``overrides``, each in the sectioned or the flat
    (legacy) layout, e.g. ``make_config(episodes=4, adv_start=1, zo=ZOConfig(q=2))``. A
    section given as a dataclass replaces that section whole; flat keys and mappings merge."""

    def plain(d: dict[str, Any]) -> dict[str, Any]:
        d = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()}
        return migrate_legacy(d, quiet=True)

    whole = {k for k, v in overrides.items() if dataclasses.is_dataclass(v)}
    data = merge(to_dict(RunConfig()), plain(base or {}))
    for k, v in plain(overrides).items():
        data[k] = merge(data[k], v) if isinstance(v, dict) and k not in whole else v
    return from_dict(RunConfig, data)


def count_host_syncs(fn: Callable[[], Any], *, count_indices: bool = False) -> int:
    """Tensor -> Python conversions (``item``, ``float``, ``bool``, ``int``, ``tolist``) made by
    apimeta code while ``fn`` runs: each is a host sync when the tensor lives on a GPU.

    Torch's own calls (e.g. Adam's step counters, kept on the CPU) are not counted. Integer
    tensors are not counted unless ``count_indices``: apimeta draws task and memory indices on
    the CPU from CPU generators on every device, so converting them never waits for a GPU;
    every float and bool tensor counts."""
    import sys

    names = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")
    old = {n: getattr(torch.Tensor, n) for n in names}
    count = [0]

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        def g(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            is_index = not (self.is_floating_point() or self.dtype == torch.bool)
            if "/apimeta/" in caller and (count_indices or not is_index):
                count[0] += 1
            return f(self, *a, **k)

        return g

    for n in names:
        setattr(torch.Tensor, n, wrap(old[n]))
    try:
        fn()
    finally:
        for n in names:
            setattr(torch.Tensor, n, old[n])
    return count[0]
