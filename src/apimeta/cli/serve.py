"""``apimeta serve``: serve a zoo over the Open Inference Protocol v2."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import typer

from apimeta.cli.app import app
from apimeta.cli.common import console, err_console, friendly_errors, set_threads
from apimeta.errors import ConfigError


def read_api_keys(path: Path) -> list[str]:
    """API keys from a file: one per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read API key file {path}: {e}") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"API key file {path} holds no keys (one key per line)")
    return keys


@app.command("serve")
def serve(
    zoo: Path = typer.Option(..., "--zoo", help="API zoo directory (zoo.json) to serve."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    port: int = typer.Option(8000, "--port", help="TCP port (0: pick a free one)."),
    output: str = typer.Option(
        "logits", "--output", help="What clients get: logits | probs | topk:K | label."
    ),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="File with accepted API keys, one per line."
    ),
    max_batch: int = typer.Option(1024, "--max-batch", help="Most images per request."),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", help="Infer requests per second per API key (token bucket)."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto | torch | onnx."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the models."),
) -> None:
    """Serve every API of a zoo over the Open Inference Protocol v2 (REST)."""
    import uvicorn

    from apimeta.apis.base import parse_output_mode
    from apimeta.apis.server import create_app
    from apimeta.apis.sources import load_zoo

    with friendly_errors():
        set_threads(threads)
        parse_output_mode(output)
        keys = read_api_keys(api_key_file) if api_key_file else None
        apis = load_zoo(zoo, output="logits", device=device, backend=backend)
        web = create_app(
            apis, output=output, api_keys=keys, max_batch=max_batch, rate_limit=rate_limit
        )
    access = logging.getLogger("apimeta.server.access")  # pure JSON lines on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    config = uvicorn.Config(web, host=host, port=port, log_level="warning", access_log=False)

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown; we exit 0 instead
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
            await super().startup(sockets)
            if not self.started:
                return
            bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
            base = f"http://{host}:{bound[1]}"
            for api in apis:
                console.print(
                    f"  {api.info.name}: {base}/v2/models/{api.info.name}", soft_wrap=True
                )
            auth = "API key required" if keys else "no API key"
            console.print(
                f"ready: {len(apis)} models at {base} (output {output}, max batch {max_batch}, "
                f"{auth}); Ctrl-C to stop",
                highlight=False,
                soft_wrap=True,
            )

    server = _Server(config)
    server.run()
    if not server.started:
        err_console.print(f"[bold red]error:[/] could not serve on {host}:{port}")
        raise typer.Exit(1)
    console.print("server stopped")
