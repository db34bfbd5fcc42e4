"""Statistics of comparisons: a paired bootstrap over training seeds and shared meta-test tasks.

Every row of a comparison is meta-tested on the same seeded tasks, so two rows are *paired* by
task; their training seeds are independent draws (seed 2023 of one method has nothing to do
with seed 2023 of another). :func:`paired_bootstrap` resamples both sources of noise: tasks
jointly for the two rows, seeds separately per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    """``mean`` difference a - b (percentage points) with its ``level`` bootstrap interval
    [``lo``, ``hi``]; ``better``/``worse``: the interval excludes 0."""

    mean: float
    lo: float
    hi: float
    level: float = 0.95

    @property
    def better(self) -> bool:
        return self.lo > 0

    @property
    def worse(self) -> bool:
        return self.hi < 0

    def __str__(self) -> str:
        return f"{self.mean:+.2f} [{self.lo:+.2f}, {self.hi:+.2f}]"


def paired_bootstrap(
    a: np.ndarray | list,
    b: np.ndarray | list,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Difference:
    """The difference of two rows' mean accuracies with a bootstrap CI.

    ``a``: (seeds_a, tasks) accuracies of one row (one line per training seed), ``b``:
    (seeds_b, tasks) of the other, on the same tasks in the same order (a 1-D array is one
    seed). Each bootstrap draw resamples the tasks (the same draw for both rows) and, per row,
    its seeds, all with replacement; the interval is the percentile interval of the drawn
    differences. With one seed per row only the task noise is covered.
    """
    a2, b2 = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a2.shape[1] != b2.shape[1] or a2.shape[1] == 0:
        raise ValueError(
            f"both rows need accuracies on the same tasks; got {a2.shape[1]} and {b2.shape[1]}"
        )
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    n_tasks = a2.shape[1]
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        tasks = rng.integers(0, n_tasks, n_tasks)
        sa = rng.integers(0, a2.shape[0], a2.shape[0])
        sb = rng.integers(0, b2.shape[0], b2.shape[0])
        diffs[i] = a2[np.ix_(sa, tasks)].mean() - b2[np.ix_(sb, tasks)].mean()
    tail = (1 - level) / 2
    lo, hi = np.quantile(diffs, [tail, 1 - tail])
    return Difference(float(a2.mean() - b2.mean()), float(lo), float(hi), level)


__all__ = ["Difference", "paired_bootstrap"]
