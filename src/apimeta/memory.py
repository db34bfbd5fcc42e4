"""Task memory: recovered images per class, replayed as interpolated tasks (docs/design.md 4.7).

In RAM, per class a FIFO of at most ``capacity_batches`` recovery batches (one batch = the
images of that class from one recovery call). Classes are keyed by a hashable key, e.g.
``("cifar_fs", 12)`` or ``"cifar_fs:12"``; images of one class coming from different APIs are
pooled. Each key also gets a stable integer id (in order of first appearance) for
:class:`~apimeta.episodes.Episode.class_ids`; :meth:`TaskMemory.key_of` maps it back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from apimeta.episodes import APIEpisode, Episode
from apimeta.errors import CheckpointError, EpisodeError
from apimeta.models.wrappers import match_channels
from apimeta.transforms import resize, to_uint8


def _encode_key(key: Hashable) -> Any:
    if isinstance(key, str | int):
        return key
    if isinstance(key, tuple) and all(isinstance(k, str | int) for k in key):
        return {"tuple": list(key)}
    raise TypeError(
        f"memory keys must be str, int or tuples of str/int (for checkpoints), got {key!r}"
    )


def _decode_key(obj: Any) -> Hashable:
    if isinstance(obj, dict):
        return tuple(obj["tuple"])
    return obj


def within_class_diversity(feats: Tensor, labels: Tensor) -> Tensor:
    """Mean over classes of the mean pairwise cosine distance (1 - cos) between the (B, D)
    features of one class's images; 0-dim tensor in [0, 2]. 0: every image of a class is the
    same direction (near-copies). Classes with one image are skipped (0 if none has two)."""
    f = torch.nn.functional.normalize(feats.flatten(1).float(), dim=1)
    same = labels.view(-1, 1) == labels.view(1, -1)
    same.fill_diagonal_(False)
    dist = 1.0 - f @ f.t()
    per_class_pairs = same.sum(1)  # per image: other images of its class
    per_image = (dist * same).sum(1) / per_class_pairs.clamp(min=1)
    has = per_class_pairs > 0
    return (per_image * has).sum() / has.sum().clamp(min=1)


class TaskMemory:
    """Per-class FIFO ring buffer of recovered images; samples interpolated N-way tasks.

    ``capacity_batches``: batches kept per class (docs/design.md: 20). ``quantize_uint8``: store
    images as uint8 (the reference's PNG precision, 4x less RAM) instead of float32.
    ``device``: where the images live and sampled tasks are built (the run's device: replay
    copies nothing to it); checkpoints hold them on the CPU.
    """

    def __init__(
        self,
        capacity_batches: int = 20,
        quantize_uint8: bool = False,
        device: torch.device | str | None = None,
    ):
        if capacity_batches < 1:
            raise ValueError(f"capacity_batches must be >= 1, got {capacity_batches}")
        self.capacity_batches = int(capacity_batches)
        self.quantize_uint8 = bool(quantize_uint8)
        self.device = torch.device(device if device is not None else "cpu")
        self._batches: dict[Hashable, deque[Tensor]] = {}
        self._ids: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []

    # ------------------------------------------------------------------ storage
    def add(self, key: Hashable, images: Tensor) -> None:
        """Store one batch (n, C, H, W) float in [0, 1] (or uint8) for class ``key``.

        The oldest batch of the class is dropped once it holds ``capacity_batches``.
        """
        _encode_key(key)  # validate early
        if images.dim() != 4 or images.shape[0] == 0:
            raise EpisodeError(f"memory batches must be non-empty (n, C, H, W), got {images.shape}")
        img = images.detach().to(self.device)
        if self.quantize_uint8:
            if img.dtype != torch.uint8:
                img = to_uint8(img)
        else:
            img = img.float().div(255.0) if img.dtype == torch.uint8 else img.float().clone()
        if key not in self._ids:
            self._ids[key] = len(self._keys)
            self._keys.append(key)
            self._batches[key] = deque()
        q = self._batches[key]
        q.append(img)
        while len(q) > self.capacity_batches:
            q.popleft()

    def add_labelled(self, keys: list[Hashable], images: Tensor, labels: Tensor) -> None:
        """Store a recovery batch with local ``labels`` (n,) standing for ``keys[label]``:
        one memory batch per class."""
        for i, key in enumerate(keys):
            sel = labels == i
            if bool(sel.any()):
                self.add(key, images[sel.to(images.device)])

    def add_episode(self, episode: APIEpisode) -> None:
        """Store what an API event recovered: its support set, then the kept query images,
        under the keys ``(dataset, class id)``."""
        keys: list[Hashable] = list(episode.keys)
        self.add_labelled(keys, episode.support_x, episode.support_y)
        keep = episode.query_keep
        self.add_labelled(keys, episode.query_x[keep], episode.query_y[keep])

    def classes(self) -> list[Hashable]:
        """Keys currently stored, in order of first appearance."""
        return [k for k in self._keys if self._batches.get(k)]

    def n_images(self, key: Hashable) -> int:
        return sum(int(b.shape[0]) for b in self._batches.get(key, ()))

    def n_batches(self, key: Hashable) -> int:
        return len(self._batches.get(key, ()))

    def batches(self, key: Hashable) -> list[Tensor]:
        """The stored batches of ``key``, oldest first (as stored: float or uint8)."""
        return list(self._batches.get(key, ()))

    def id_of(self, key: Hashable) -> int:
        return self._ids[key]

    def key_of(self, class_id: int) -> Hashable:
        """The key behind an integer class id of a sampled :class:`Episode`."""
        try:
            return self._keys[class_id]
        except IndexError:
            raise KeyError(f"no memory class with id {class_id}") from None

    def __len__(self) -> int:
        return sum(self.n_images(k) for k in self._keys)

    def __repr__(self) -> str:
        return (
            f"TaskMemory(classes={len(self.classes())}, images={len(self)}, "
            f"capacity_batches={self.capacity_batches})"
        )

    # ------------------------------------------------------------------ sampling
    def sample_task(
        self,
        way: int,
        shot: int,
        query: int,
        generator: torch.Generator,
        image_size: int | None = None,
        channels: int | None = None,
    ) -> Episode:
        """An interpolated N-way K-shot task (docs/design.md 4.7).

        ``way`` classes uniformly without replacement among classes holding >= shot + query
        images (possibly from different APIs/datasets), then shot + query images per class
        uniformly without replacement; local labels follow draw order; ``class_ids`` are the
        memory's integer ids (:meth:`key_of`). Images are converted to ``channels`` and resized
        to ``image_size``; None means those of the first drawn class's newest batch.
        Returns float images in [0, 1] on the memory's device (indices are drawn on the CPU
        from ``generator``, so the draw is the same on every device). Raises :class:`EpisodeError` if too few
        classes qualify.
        """
        if way < 1 or shot < 1 or query < 0:
            raise EpisodeError(f"need way >= 1, shot >= 1, query >= 0; got {way}/{shot}/{query}")
        need = shot + query
        eligible = [k for k in self._keys if self.n_images(k) >= need]
        if len(eligible) < way:
            raise EpisodeError(
                f"task memory has {len(eligible)} classes with >= {need} images "
                f"({len(self.classes())} classes stored); a {way}-way {shot}-shot {query}-query "
                "task needs more. Recover more images per class or run more API events first."
            )
        pick = torch.randperm(len(eligible), generator=generator)[:way].tolist()
        keys = [eligible[i] for i in pick]
        if channels is None or image_size is None:
            ref = self._batches[keys[0]][-1]
            channels = channels if channels is not None else int(ref.shape[1])
            image_size = image_size if image_size is not None else int(ref.shape[-1])
        sup, qry = [], []
        for key in keys:
            imgs = self._draw(key, need, generator, channels, image_size)
            sup.append(imgs[:shot])
            qry.append(imgs[shot:])
        ar = torch.arange(way, device=self.device)
        return Episode(
            support_x=torch.cat(sup),
            support_y=ar.repeat_interleave(shot),
            query_x=torch.cat(qry),
            query_y=ar.repeat_interleave(query),
            class_ids=tuple(self._ids[k] for k in keys),
        )

    def _draw(
        self, key: Hashable, n: int, generator: torch.Generator, channels: int, size: int
    ) -> Tensor:
        """n images of ``key`` uniformly without replacement, in draw order, (n, C, s, s)."""
        batches = list(self._batches[key])
        sizes = torch.tensor([int(b.shape[0]) for b in batches])
        offsets = torch.cumsum(sizes, 0) - sizes
        flat = torch.randperm(int(sizes.sum()), generator=generator)[:n]
        which = torch.searchsorted(offsets, flat, right=True) - 1
        out = torch.empty(n, channels, size, size, device=self.device)
        for w in torch.unique(which).tolist():  # CPU index tensors: no device sync
            pos = torch.nonzero(which == w).flatten()
            img = batches[w][(flat[pos] - offsets[w]).to(self.device)]
            pos = pos.to(self.device)
            img = img.float().div(255.0) if img.dtype == torch.uint8 else img
            out[pos] = resize(match_channels(img, channels), size)
        return out.clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Only tensors and primitives (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "capacity_batches": self.capacity_batches,
            "quantize_uint8": self.quantize_uint8,
            "keys": [_encode_key(k) for k in self._keys],
            "batches": [[b.cpu() for b in self._batches[k]] for k in self._keys],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            keys = [_decode_key(k) for k in state["keys"]]
            batches = state["batches"]
            if len(keys) != len(batches):
                raise ValueError("keys and batches differ in length")
            self.capacity_batches = int(state["capacity_batches"])
            self.quantize_uint8 = bool(state["quantize_uint8"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"invalid task-memory state ({e}); the checkpoint is corrupt"
            ) from e
        self._keys = keys
        self._ids = {k: i for i, k in enumerate(keys)}
        self._batches = {
            k: deque(t.to(self.device) for t in list(b)[-self.capacity_batches :])
            for k, b in zip(keys, batches, strict=True)
        }


__all__ = ["TaskMemory"]
