"""The paired bootstrap on synthetic accuracies with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from apimeta.stats import paired_bootstrap


def test_a_constant_shift_is_found_exactly():
    rng = np.random.default_rng(0)
    b = rng.uniform(20, 80, size=200)  # one seed per row: only the (paired) task noise
    d = paired_bootstrap(b + 2.0, b, n_boot=300)
    assert d.mean == pytest.approx(2.0) and d.lo == pytest.approx(2.0)
    assert d.hi == pytest.approx(2.0) and d.better and not d.worse


def test_pairing_by_task_removes_the_task_noise():
    rng = np.random.default_rng(1)
    task = rng.uniform(20, 80, size=400)  # task difficulty, shared by both rows
    a = task + 1.0 + rng.normal(0, 1, size=(3, 400))
    b = task + rng.normal(0, 1, size=(3, 400))
    d = paired_bootstrap(a, b, n_boot=500)
    assert d.better and 0.5 < d.mean < 1.5 and d.hi - d.lo < 1.0
    # unpaired (tasks shuffled for one row) the same effect drowns in the task spread
    u = paired_bootstrap(a, b[:, rng.permutation(400)], n_boot=500)
    assert u.hi - u.lo > 3 * (d.hi - d.lo)


def test_seed_noise_widens_the_interval_and_no_effect_is_covered():
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(100):  # same distribution: the 95% interval covers 0 most of the time
        a = rng.normal(50, 10, size=(3, 100)) + rng.normal(0, 2, size=(3, 1))
        b = rng.normal(50, 10, size=(3, 100)) + rng.normal(0, 2, size=(3, 1))
        d = paired_bootstrap(a, b, n_boot=300, seed=trial)
        covered += d.lo <= 0 <= d.hi
    assert covered >= 80
    one = paired_bootstrap(a[:1], b[:1], n_boot=300)
    three = paired_bootstrap(a, b, n_boot=300)
    assert str(three).count("[") == 1 and one.level == 0.95


def test_mismatched_tasks_are_refused():
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))
