"""The recipe that trains an API classifier (docs/design.md 3.3): holdout split, model, training.

Paper recipe: cross-entropy, batch 128, lr 0.01, gradient-norm clip 50; Adam for conv4 (lr x0.2
at epoch 70), SGD momentum 0.9 wd 5e-4 for ResNets (lr x0.2 at epochs 30, 50, 80); ours adds
early stopping on a 20% holdout and keeps the best-holdout weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apimeta.errors import EpisodeError
from apimeta.models import build_backbone
from apimeta.transforms import crop_flip

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.2


def default_width(arch: str, conv4_width: int, resnet_width: float) -> float:
    """The width passed to :func:`build_backbone`: filters for conv4, multiplier for ResNets."""
    return float(conv4_width) if arch == "conv4" else float(resnet_width)


def split_holdout(
    images: Tensor, labels: Tensor, classes: Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per class, first 80% (storage order) -> train, last 20% -> holdout; labels become local.

    ``images``: (M, C, H, W) uint8; returns train_x, train_y, hold_x, hold_y (x uint8, y int64 in
    [0, len(classes))).
    """
    tx, ty, hx, hy = [], [], [], []
    for local, c in enumerate(classes):
        imgs = images[labels == c]
        n = int(imgs.shape[0])
        n_hold = max(1, round(n * HOLDOUT_FRACTION))
        if n - n_hold < 1:
            raise EpisodeError(
                f"class {c} has only {n} images; a zoo API needs >= 2 per class "
                "(80% train / 20% holdout). Use a dataset with more images per class."
            )
        tx.append(imgs[: n - n_hold])
        hx.append(imgs[n - n_hold :])
        ty.append(torch.full((n - n_hold,), local, dtype=torch.long))
        hy.append(torch.full((n_hold,), local, dtype=torch.long))
    return torch.cat(tx), torch.cat(ty), torch.cat(hx), torch.cat(hy)


def build_api_model(
    arch: str,
    n_classes: int,
    channels: int,
    image_size: int,
    width: float,
    mean: Sequence[float],
    std: Sequence[float],
) -> nn.Module:
    """An API classifier: ``arch`` with standard (running-statistics) BN and its normalization."""
    return build_backbone(
        arch,
        num_classes=n_classes,
        in_channels=channels,
        image_size=image_size,
        width=width,
        bn="standard",
        mean=list(mean),
        std=list(std),
    )


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> tuple[float, float]:
    """(accuracy, mean CE loss) of ``model`` in eval mode on uint8 images ``x`` (N, C, H, W)."""
    model.eval()
    correct, loss, n = 0, 0.0, int(x.shape[0])
    for xb, yb in zip(x.split(512), y.split(512), strict=True):
        logits = model(xb.to(device).float().div_(255.0))
        yb = yb.to(device)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return correct / max(n, 1), loss / max(n, 1)


def train_api(
    model: nn.Module,
    train: tuple[Tensor, Tensor],
    holdout: tuple[Tensor, Tensor],
    *,
    arch: str,
    epochs: int,
    batch_size: int = 128,
    lr: float = 0.01,
    grad_clip: float = 50.0,
    patience: int | None = None,
    augment: bool = True,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[float, int]:
    """Train one API classifier in place; load the best-holdout weights back at the end.

    Paper recipe: cross-entropy, batch 128, lr 0.01, gradient-norm clip 50; Adam for conv4 (lr x0.2
    at epoch 70), SGD momentum 0.9 wd 5e-4 for ResNets (lr x0.2 at epochs 30, 50, 80). ``train`` /
    ``holdout``: (uint8 images (N, C, H, W), local labels (N,)). Stops after ``patience`` epochs
    without holdout improvement (None: never). Returns (best holdout accuracy, epochs run).
    """
    device = torch.device(device)
    model.to(device)
    if arch == "conv4":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        milestones = [70]
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        milestones = [30, 50, 80]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
    tx, ty = train
    hx, hy = holdout
    best: tuple[float, float] = (-1.0, float("inf"))
    best_state: dict[str, Tensor] = {}
    since_best, epochs_run = 0, 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(tx.shape[0], generator=generator)
        for idx in order.split(batch_size):
            if idx.numel() < 2 and tx.shape[0] >= 2:  # BN needs 2+ images; drop a last single one
                continue
            xb = tx[idx].to(device).float().div_(255.0)
            if augment:
                xb = crop_flip(xb, generator)
            loss = F.cross_entropy(model(xb), ty[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
        sched.step()
        epochs_run = epoch + 1
        acc, hloss = _accuracy(model, hx, hy, device)
        if acc > best[0] or (acc == best[0] and hloss < best[1]):
            best = (acc, hloss)
            # a true copy (docs/design.md section 9, item 9), not a reference to the live weights
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            since_best = 0
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(epochs_run, acc)
        if patience is not None and since_best >= patience:
            logger.debug("early stop after %d epochs (best holdout acc %.3f)", epochs_run, best[0])
            break
    if best_state:
        model.load_state_dict(best_state)
    model.eval()
    return max(best[0], 0.0), epochs_run


__all__ = ["HOLDOUT_FRACTION", "build_api_model", "default_width", "split_holdout", "train_api"]
