from __future__ import annotations

import torch
from PIL import Image

from apimeta.report import (
    fmt_acc,
    image_grid,
    markdown_table,
    plot_learning_curve,
    read_jsonl,
    save_image_grid,
    write_report,
)


def test_image_grid_layout_and_values(tmp_path):
    x = torch.zeros(5, 1, 4, 4)
    x[0] = 1.0
    img = image_grid(x, nrow=3, pad=1, scale=1)
    # 3 columns, 2 rows of 4-px images with 1-px padding
    assert img.size == (3 * 5 + 1, 2 * 5 + 1)
    assert img.getpixel((1, 1)) == (255, 255, 255)  # first image is white
    assert img.getpixel((6, 1)) == (0, 0, 0)  # second image is black
    save_image_grid(torch.rand(6, 3, 8, 8), tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").format == "PNG"


def test_learning_curve_and_report(tmp_path):
    rows = [{"step": i, "train_acc": 0.2 + i / 100, "queries": 1000 * i} for i in range(30)]
    rows.append({"step": 30, "val_acc_1": 0.4})
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    assert len(read_jsonl(p)) == 31
    assert plot_learning_curve(read_jsonl(p), tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size[0] > 100
    assert not plot_learning_curve([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    table = markdown_table(["method", "1-shot"], [["random", fmt_acc({"mean": 30.0, "ci95": 1.0})]])
    assert "| random | 30.00 ± 1.00 |" in table
    assert fmt_acc(None) == "—"
    write_report(tmp_path / "report.md", "Run", [("Results", table)])
    assert (tmp_path / "report.md").read_text().startswith("# Run\n\n## Results")
