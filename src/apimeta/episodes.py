"""Few-shot episodes and the N-way K-shot task sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from apimeta.errors import EpisodeError


def _check_set(part: str, x: Tensor, y: Tensor) -> None:
    """Images (B, C, H, W) and int64 labels (B,) of one set (``part``: support or query)."""
    if x.dim() != 4:
        raise EpisodeError(f"{part}_x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise EpisodeError(f"{part}_y must be (B,) with B={x.shape[0]}, got shape {tuple(y.shape)}")
    if y.dtype != torch.long:
        raise EpisodeError(f"{part}_y must be int64, got {y.dtype}")


@dataclass
class Episode:
    """One N-way K-shot task with an explicit support/query split.

    Shapes: ``support_x`` (N*K, C, H, W) float in [0, 1]; ``support_y`` (N*K,) int64 in [0, N);
    ``query_x`` (N*Q, C, H, W); ``query_y`` (N*Q,); ``class_ids``: the N global class ids, where
    local label i stands for ``class_ids[i]``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    class_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        self.class_ids = tuple(int(c) for c in self.class_ids)
        n = len(self.class_ids)
        if n < 1:
            raise EpisodeError("an episode needs at least one class")
        for part in ("support", "query"):
            x, y = getattr(self, f"{part}_x"), getattr(self, f"{part}_y")
            _check_set(part, x, y)
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n):
                raise EpisodeError(f"{part}_y must lie in [0, {n}), got [{y.min()}, {y.max()}]")
        if self.support_x.shape[1:] != self.query_x.shape[1:]:
            raise EpisodeError(
                f"support and query images differ in shape: {tuple(self.support_x.shape[1:])} "
                f"vs {tuple(self.query_x.shape[1:])}"
            )

    @property
    def way(self) -> int:
        return len(self.class_ids)

    def to(self, device: torch.device | str) -> Episode:
        return Episode(
            self.support_x.to(device),
            self.support_y.to(device),
            self.query_x.to(device),
            self.query_y.to(device),
            self.class_ids,
        )


@dataclass
class APIEpisode:
    """What one API event recovered from one API: a support set S and a query set Q.

    Labels are the API's local labels: label i stands for class ``classes[i]`` of ``dataset``.
    Shapes: ``support_x`` (B, C, s, s) and ``query_x`` (B', C, s, s) float in [0, 1] (the kept
    generator outputs, before augmentation); ``support_y`` (B,), ``query_y`` (B',) int64 in
    [0, n_classes); ``query_keep`` (B',) bool: the query images the task memory may store
    (all of them unless ``memory.filter_query``).
    """

    api: str
    dataset: str
    classes: tuple[int, ...]
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    query_keep: Tensor

    def __post_init__(self) -> None:
        self.classes = tuple(int(c) for c in self.classes)
        n = len(self.classes)
        if n < 1:
            raise EpisodeError("an API episode needs at least one class")
        for part in ("support", "query"):
            _check_set(part, getattr(self, f"{part}_x"), getattr(self, f"{part}_y"))
        if self.query_keep.shape != self.query_y.shape or self.query_keep.dtype != torch.bool:
            raise EpisodeError(
                f"query_keep must be a bool mask of shape {tuple(self.query_y.shape)}, got "
                f"{self.query_keep.dtype} {tuple(self.query_keep.shape)}"
            )

    @property
    def keys(self) -> list[tuple[str, int]]:
        """The memory keys ``(dataset, class id)`` of the local labels."""
        return [(self.dataset, c) for c in self.classes]


def _as_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


class TaskSampler:
    """Samples N-way K-shot Q-query episodes from a labelled image pool.

    ``images``: (M, C, H, W) uint8 or float in [0, 1]; ``labels``: (M,) global class ids.
    Classes are drawn uniformly without replacement, then K+Q images per class uniformly
    without replacement; local labels follow draw order. All randomness comes from ``generator``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        way: int,
        shot: int,
        query: int,
        generator: torch.Generator | None = None,
    ):
        if images.shape[0] != labels.shape[0]:
            raise EpisodeError(
                f"{images.shape[0]} images but {labels.shape[0]} labels; they must match"
            )
        if way < 1 or shot < 1 or query < 0:
            raise EpisodeError(f"need way >= 1, shot >= 1, query >= 0; got {way}/{shot}/{query}")
        self.images, self.labels = images, labels.long()
        self.way, self.shot, self.query = way, shot, query
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        classes, counts = torch.unique(self.labels, return_counts=True)
        need = shot + query
        usable = classes[counts >= need]
        if usable.numel() < way:
            raise EpisodeError(
                f"{way}-way {shot}-shot {query}-query needs {way} classes with >= {need} images "
                f"each; this pool has {usable.numel()} such classes "
                f"(of {classes.numel()}; smallest class has {int(counts.min())} images). "
                "Lower --way/--shot/--query or use a larger split."
            )
        self.classes = usable
        self._index = {int(c): torch.nonzero(self.labels == c).flatten() for c in usable}

    def sample_indices(self) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        """The next task as indices into ``images``: support (N*K,), query (N*Q,) and the N
        class ids; :meth:`sample` is ``episode_at(*sample_indices())``."""
        g = self.generator
        pick = self.classes[torch.randperm(self.classes.numel(), generator=g)[: self.way]]
        s_idx, q_idx = [], []
        for c in pick.tolist():
            idx = self._index[c]
            perm = idx[torch.randperm(idx.numel(), generator=g)[: self.shot + self.query]]
            s_idx.append(perm[: self.shot])
            q_idx.append(perm[self.shot :])
        return torch.cat(s_idx), torch.cat(q_idx), tuple(pick.tolist())

    def sample(self) -> Episode:
        return episode_at(self.images, *self.sample_indices(), shot=self.shot, query=self.query)

    def __iter__(self):
        while True:
            yield self.sample()


def episode_at(
    images: Tensor, s: Tensor, q: Tensor, class_ids: tuple[int, ...], *, shot: int, query: int
) -> Episode:
    """The episode of support indices ``s`` (N*K,) and query indices ``q`` (N*Q,) into
    ``images`` (M, C, H, W), classes in ``class_ids`` order (local label i = class_ids[i])."""
    dev = images.device
    ar = torch.arange(len(class_ids), device=dev)
    return Episode(
        support_x=_as_float(images[s.to(dev)]),
        support_y=ar.repeat_interleave(shot),
        query_x=_as_float(images[q.to(dev)]),
        query_y=ar.repeat_interleave(query),
        class_ids=class_ids,
    )
