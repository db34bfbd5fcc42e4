"""Run artefacts a person looks at: image grids, learning curves and ``report.md``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from apimeta.io import atomic_write, atomic_write_text


def image_grid(
    images: Tensor, nrow: int | None = None, pad: int = 2, scale: int = 2
) -> Image.Image:
    """(N, C, H, W) float in [0, 1] (or uint8) -> a PIL RGB grid image, ``nrow`` images a row."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    canvas = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[:, top : top + h, left : left + w] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_image_grid(images: Tensor, path: Path, nrow: int | None = None) -> None:
    """Write :func:`image_grid` as PNG atomically."""
    img = image_grid(images, nrow=nrow)
    atomic_write(Path(path), lambda p: img.save(p, format="PNG"))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curve(
    metrics: Sequence[dict[str, Any]], path: Path, title: str = "learning curve"
) -> bool:
    """Plot training accuracy/loss and meta-val accuracy against the meta-update step.

    Reads rows with ``step`` and any of ``train_acc``, ``loss``, ``val_acc``/``val_acc_<shot>``,
    ``queries``; returns False (and writes nothing) when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "step" in m]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    train = [(m["step"], m["train_acc"]) for m in rows if m.get("train_acc") is not None]
    if train:
        s, a = zip(*train, strict=True)
        k = max(1, len(a) // 50)
        smooth = np.convolve(a, np.ones(k) / k, mode="valid")
        axes[0].plot(s[k - 1 :], smooth, label="train acc (smoothed)")
    val_keys = sorted({k for m in rows for k in m if k.startswith("val_acc")})
    for key in val_keys:
        pts = [(m["step"], m[key]) for m in rows if m.get(key) is not None]
        if pts:
            s, a = zip(*pts, strict=True)
            axes[0].plot(s, a, marker="o", label=key.replace("_", " "))
    axes[0].set_xlabel("meta-update")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].grid(alpha=0.3)
    q = [(m["step"], m["queries"]) for m in rows if m.get("queries") is not None]
    if q:
        s, v = zip(*q, strict=True)
        axes[1].plot(s, np.asarray(v) / 1e6)
        axes[1].set_ylabel("API queries (millions)")
    else:
        loss = [(m["step"], m["loss"]) for m in rows if m.get("loss") is not None]
        if loss:
            s, v = zip(*loss, strict=True)
            axes[1].plot(s, v)
            axes[1].set_ylabel("loss")
    axes[1].set_xlabel("meta-update")
    axes[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return True


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def fmt_acc(result: dict[str, Any] | None) -> str:
    """``{"mean": 45.12, "ci95": 0.81}`` (percent, as the evaluator reports) -> ``"45.12 ± 0.81"``."""
    if not result:
        return "—"
    return f"{result['mean']:.2f} ± {result['ci95']:.2f}"


def write_report(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> None:
    """Write ``report.md`` from (heading, markdown body) sections, atomically."""
    text = f"# {title}\n\n" + "\n".join(f"## {h}\n\n{b.rstrip()}\n" for h, b in sections)
    atomic_write_text(Path(path), text)
