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


def _tuned_dirs(tmp_path, name: str, offset: float, tasks: int = 6) -> str:
    """A bench row directory with seed-*/tuned.json whose accuracies are known."""
    import json

    row = tmp_path / name
    for seed in (2022, 2023):
        accs = [40.0 + offset + t for t in range(tasks)]  # the same for both seeds
        cell = {"setting": {"lr": 0.1}, "val": {"lr=0.1": 50.0 + offset}, "mean": sum(accs) / tasks}
        cell["accs"] = accs
        (row / f"seed-{seed}").mkdir(parents=True)
        (row / f"seed-{seed}" / "tuned.json").write_text(
            json.dumps({"tasks": tasks, "shots": [1], "results": {"d": {"1-shot": cell}}})
        )
    return str(row)


def test_the_cross_bench_script_pairs_rows_on_their_tasks(tmp_path, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "paired_rows.py"
    main = runpy.run_path(str(script))["main"]
    a, b = _tuned_dirs(tmp_path, "a", 0.0), _tuned_dirs(tmp_path, "b", 5.0)
    main([f"a={a}", f"b={b}"])
    out = capsys.readouterr().out
    assert "b - a: +5.00 [+5.00, +5.00]" in out  # +5 on every task of every seed
    assert "2022: val 55.00 test" in out
    other = _tuned_dirs(tmp_path, "c", 0.0, tasks=4)
    with pytest.raises(SystemExit, match="other tasks"):
        main([f"a={a}", f"c={other}"])
