"""LocalAPI throughput vs the raw forward pass of the same module on the same batches.

    .venv/bin/python benchmarks/bench_local_api.py [--reps 30] [--width 32] [--threads 1,2]

Prints a markdown table: images/s of ``model(x)`` under ``torch.inference_mode`` and of
``LocalAPI.query(x)`` (validation + ledger + output restriction + copy), the end-to-end overhead
in %, and the wrapper's own cost measured in isolation (``LocalAPI`` around a module that returns
precomputed logits) as a % of the forward pass. Timings are medians over interleaved repetitions
(alternating which runs first); on a shared, contended machine the end-to-end difference is
dominated by noise, the isolated wrapper cost is not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from apimeta.apis import APIInfo, LocalAPI, QueryLedger
from apimeta.models import build_backbone


def _time(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def bench(batch: int, threads: int, reps: int, width: int, output: str) -> dict[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_backbone("conv4", num_classes=5, width=width, bn="standard").eval()
    info = APIInfo("bench", "synthetic", (0, 1, 2, 3, 4), tuple("abcde"), 3, 32, output=output)
    api = LocalAPI(model, info, QueryLedger())
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def raw(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    with torch.inference_mode():
        fixed = model(x)
    stub = LocalAPI(_Fixed(fixed), info, QueryLedger())  # wrapper work only, no network
    for _ in range(3):  # warm-up
        raw(x)
        api.query(x)
        stub.query(x)
    t_raw, t_api, t_stub = [], [], []
    for i in range(reps):  # interleaved, so both see the same machine load
        if i % 2:
            t_raw.append(_time(raw, x))
            t_api.append(_time(api.query, x))
        else:
            t_api.append(_time(api.query, x))
            t_raw.append(_time(raw, x))
        t_stub.append(_time(stub.query, x))
    r, a, w = (statistics.median(t) for t in (t_raw, t_api, t_stub))
    return {
        "raw_ips": batch / r,
        "api_ips": batch / a,
        "overhead": 100 * (a - r) / r,
        "wrapper_ms": 1e3 * w,
        "wrapper_pct": 100 * w / r,
    }


class _Fixed(torch.nn.Module):
    """Returns precomputed logits (B, 5): isolates LocalAPI's own cost."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--width", type=int, default=32, help="conv4 filters (paper: 32)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="100,1000")
    p.add_argument("--output", default="logits", help="API output mode")
    args = p.parse_args()
    print(f"conv4 width {args.width}, 32x32, output {args.output}, median of {args.reps} reps\n")
    print(
        "| threads | batch | raw forward img/s | LocalAPI img/s | end-to-end overhead "
        "| wrapper cost (isolated) |"
    )
    print("|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            reps = max(5, args.reps * 100 // batch) if batch > 100 else args.reps
            r = bench(batch, threads, reps, args.width, args.output)
            print(
                f"| {threads} | {batch} | {r['raw_ips']:,.0f} | {r['api_ips']:,.0f} "
                f"| {r['overhead']:+.1f}% | {r['wrapper_ms']:.2f} ms = {r['wrapper_pct']:.2f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
