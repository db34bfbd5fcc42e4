"""Queries/s of one API behind each backend: in-process torch (LocalAPI), ONNX (onnxruntime) and
HTTP over loopback (``apimeta serve`` in a subprocess; binary tensor extension and plain JSON).

    .venv/bin/python benchmarks/bench_backends.py [--batches 1,32,256,1024] [--threads 1]

Models: conv4 (width 32, the paper's) and resnet18 at width multiplier 0.25 (CPU size), 5
classes, 3 x 32 x 32 inputs, random weights (speed does not depend on training). Every backend
uses ``--threads`` compute threads; the server is a separate process. Goal: HTTP >= 50% of
in-process throughput at batch >= 256.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.apis.http import HttpAPI
from apimeta.apis.onnx import OnnxAPI, export_onnx
from apimeta.models import build_backbone

MODELS = {"conv4": 32.0, "resnet18": 0.25}


def write_zoo(root: Path) -> list[dict]:
    from safetensors.torch import save_file

    entries = []
    for i, (arch, width) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = build_backbone(arch, num_classes=5, width=width, bn="standard").eval()
        name = f"{arch}"
        save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()},
            str(root / f"{name}.safetensors"),
        )
        export_onnx(model, root / f"{name}.onnx", 3, 32, dynamo=False)
        entries.append(
            {
                "name": name,
                "file": f"{name}.safetensors",
                "onnx_file": f"{name}.onnx",
                "arch": arch,
                "width": width,
                "dataset": "synthetic",
                "classes": list(range(5)),
                "class_names": [f"c{c}" for c in range(5)],
                "channels": 3,
                "image_size": 32,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "holdout_acc": None,
            }
        )
    (root / "zoo.json").write_text(json.dumps({"version": 1, "build_args": {}, "apis": entries}))
    return entries


def start_server(zoo: Path, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-c",
        "from apimeta.cli import app; app()",
        "serve",
        "--zoo",
        str(zoo),
        "--port",
        "0",
        "--backend",
        "torch",
        "--threads",
        str(threads),
        "--max-batch",
        "1024",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "COLUMNS": "300"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("ready"):
            return proc, line.split(" at ")[1].split(" ")[0]
    raise RuntimeError("server did not start")


def rates(backends: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Images/s per backend: median over ``reps`` rounds, backends interleaved in each round so
    that load from other processes on the shared machine hits all of them alike."""
    for api in backends.values():  # warm up
        api.query(x[:1])
        api.query(x)
    times: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(reps):
        for name, api in backends.items():
            t0 = time.perf_counter()
            api.query(x)
            times[name].append(time.perf_counter() - t0)
    return {k: x.shape[0] / statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32,256,1024")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=1.0, help="target seconds per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        entries = write_zoo(root)
        proc, url = start_server(root, args.threads)
        try:
            rows = []
            for e in entries:
                from apimeta.apis.local import load_api_model
                from apimeta.apis.manifest import entry_info

                info: APIInfo = entry_info(e)
                backends = {
                    "local": LocalAPI(load_api_model(root, e), info, QueryLedger()),
                    "onnx": OnnxAPI(root / e["onnx_file"], info, threads=args.threads),
                    "http-binary": HttpAPI(url, e["name"], binary=True),
                    "http-json": HttpAPI(url, e["name"], binary=False),
                }
                for b in batches:
                    x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))
                    t0 = time.perf_counter()
                    backends["local"].query(x)
                    one = time.perf_counter() - t0
                    reps = max(3, min(50, int(args.budget_s / max(one, 1e-4))))
                    row = {"model": e["name"], "batch": b, "reps": reps, **rates(backends, x, reps)}
                    rows.append(row)
                    print(
                        f"{e['name']:9s} b={b:5d} reps={reps:3d}  "
                        + "  ".join(f"{k}={row[k]:9.0f}/s" for k in backends)
                        + f"  http-binary/local={row['http-binary'] / row['local']:.0%}"
                        + f"  http-json/local={row['http-json'] / row['local']:.0%}",
                        flush=True,
                    )
                for api in backends.values():
                    if hasattr(api, "close"):
                        api.close()
            print(json.dumps(rows))
        finally:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
