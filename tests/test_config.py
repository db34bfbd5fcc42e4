"""Typed configs: YAML loading, dotted overrides, unknown keys and type errors, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apimeta.config import apimeta_home, load_config, parse_overrides, save_config
from apimeta.errors import ConfigError
from apimeta.run_config import (
    LEGACY_KEYS,
    RunConfig,
    load_run_config,
    migrate_legacy,
    resolve_config,
)


def test_defaults() -> None:
    cfg = load_config(RunConfig)
    assert cfg == RunConfig()
    assert cfg.zo.q == 10 and cfg.memory.enabled is True


def test_yaml_file_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("way: 10\nshot: 5\nzo:\n  q: 20\n  mu: 0.01\ndataset: kanji\n")
    cfg = load_config(RunConfig, f, ["zo.q=30", "episodes=100", "memory.enabled=false"])
    assert (cfg.way, cfg.shot, cfg.dataset, cfg.episodes) == (10, 5, "kanji", 100)
    assert cfg.zo.q == 30 and cfg.zo.mu == 0.01  # override wins; file keeps the rest
    assert cfg.zo.estimator == "forward"  # untouched nested default
    assert cfg.memory.enabled is False


def test_base_is_below_file(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("way: 3\n")
    cfg = load_config(RunConfig, f, base={"way": 7, "shot": 2})
    assert (cfg.way, cfg.shot) == (3, 2)


@pytest.mark.parametrize(
    ("overrides", "value"),
    [
        (["query_budget=none"], None),
        (["query_budget=1e6"], 1_000_000),
        (["query_budget=250"], 250),
        (["threads=null"], None),
        (["recovery.early_stop_prob=0.9"], 0.9),
        (["data_root=/tmp/x"], "/tmp/x"),
    ],
)
def test_override_value_parsing(overrides: list[str], value) -> None:
    cfg = load_config(RunConfig, overrides=overrides)
    obj = cfg
    for part in overrides[0].split("=")[0].split("."):
        obj = getattr(obj, part)
    assert obj == value


def test_scalar_coercion() -> None:
    cfg = load_config(RunConfig, overrides=["outer_lr=1", "first_order=yes", "seed=7"])
    assert cfg.outer_lr == 1.0 and isinstance(cfg.outer_lr, float)
    assert cfg.first_order is True and cfg.seed == 7


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["wayy=5"], r"unknown config key\(s\) wayy"),
        (["zo.qq=5"], r"zo\.qq"),
        (["way=five"], "way: expected an integer"),
        (["way=2.5"], "way: expected an integer"),
        (["outer_lr=fast"], "outer_lr: expected a number"),
        (["first_order=maybe"], "first_order: expected true/false"),
        (["zo=3"], "zo: expected a mapping"),
        (["way"], "key=value"),
        (["way.sub=1"], "way: expected an integer"),
    ],
)
def test_override_errors(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(RunConfig, overrides=overrides)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_config(RunConfig, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("zo:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r"zo\.nope.*valid keys"):
        load_config(RunConfig, unknown)
    code = tmp_path / "code.yaml"
    code.write_text("way: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="never code"):  # one line, no traceback
        load_config(RunConfig, code)
    broken = tmp_path / "broken.yaml"
    broken.write_text("way: [1, 2\nshot: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line \d+.*not valid YAML"):
        load_config(RunConfig, broken)
    with pytest.raises(ConfigError, match="plain YAML"):
        load_config(RunConfig, overrides=["way=!!python/object/apply:os.system ['true']"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", ".inf"])
def test_non_finite_numbers_are_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="outer_lr: expected a finite number"):
        load_config(RunConfig, overrides=[f"outer_lr={value}"])


def test_empty_yaml_file_is_defaults(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(RunConfig, f) == RunConfig()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(RunConfig, overrides=["zo.q=3", "query_budget=none", "dataset=emoji,kanji"])
    out = tmp_path / "sub" / "config.yaml"
    save_config(cfg, out)
    assert load_config(RunConfig, out) == cfg
    assert not list(out.parent.glob("*.tmp"))


def test_parse_overrides_nested() -> None:
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {
        "a": {"b": {"c": 1}, "d": "x"},
        "e": [1, 2],
    }
    assert parse_overrides(["s="]) == {"s": ""}


def test_apimeta_home_follows_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("APIMETA_HOME", str(tmp_path))
    assert apimeta_home() == tmp_path
    monkeypatch.delenv("APIMETA_HOME")
    assert apimeta_home() == Path.home() / ".cache" / "apimeta"


# ----------------------------------------------------------------------------- flat layout


def test_every_legacy_key_maps_to_an_existing_key() -> None:
    data = {k: v for k, v in vars(RunConfig()).items()}
    for old, new in LEGACY_KEYS.items():
        assert "." not in old or old.startswith("zo.")
        if new is not None:
            section, name = new.split(".")
            assert hasattr(data[section], name), new
            assert not hasattr(RunConfig(), old), old  # the old name is gone from the top level


def test_flat_keys_are_read_with_a_warning_naming_the_new_key(tmp_path: Path, caplog) -> None:
    f = tmp_path / "old.yaml"
    f.write_text("recover_iters: 7\nadv_start: 3\napi_patience: 9\neval_tasks: 4\n")
    with caplog.at_level("WARNING"):
        cfg = resolve_config(config=f, sets=["kd_inner_steps=2", "zo.q=3"])
    assert (cfg.recovery.iters, cfg.kd.adv_start, cfg.events.patience) == (7, 3, 9)
    assert (cfg.eval.tasks, cfg.kd.inner_steps, cfg.zo.q) == (4, 2, 3)
    assert "'recover_iters' is now 'recovery.iters'" in caplog.text
    assert "'kd_inner_steps' is now 'kd.inner_steps'" in caplog.text


def test_flat_and_new_key_together_or_a_removed_key_are_errors() -> None:
    with pytest.raises(ConfigError, match=r"'adv' and 'kd\.adv' both given"):
        migrate_legacy({"adv": 0.0, "kd": {"adv": 1.0}})
    assert migrate_legacy({"adv": 1.0, "kd": {"adv": 1.0}}, quiet=True) == {"kd": {"adv": 1.0}}
    assert migrate_legacy({"zo": {"device": "data", "q": 2}}, quiet=True) == {"zo": {"q": 2}}
    with pytest.raises(ConfigError, match=r"'zo\.device' was removed"):
        migrate_legacy({"zo": {"device": "cpu"}})


def test_a_run_directory_of_the_flat_layout_loads_and_resumes(tmp_path: Path) -> None:
    """config.yaml as apimeta wrote it before the sections (every key flat but zo/memory/http)."""
    old = {
        "method": "bidf-mkd",
        "episodes": 40,
        "recover_per_class": 3,
        "test_steps": 2,
        "select_split": "val",
        "event_trigger": "every",
        "zo": {"q": 4, "device": "data"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_run_config(tmp_path / "config.yaml")
    assert (cfg.recovery.per_class, cfg.eval.test_steps, cfg.events.trigger) == (3, 2, "every")
    again = resolve_config(resume_from=tmp_path, direct={"episodes": 80})
    assert again.episodes == 80 and again.recovery.per_class == 3 and again.zo.q == 4


def test_deterministic_kernels_only_touch_cuda_settings(monkeypatch):
    import torch

    from apimeta.seeding import deterministic_kernels

    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)  # restored afterwards
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not deterministic_kernels("cpu") and not calls
    assert deterministic_kernels("cuda:0")  # no GPU needed to set the flags
    assert calls == [{"warn_only": True}] and torch.backends.cudnn.benchmark is False
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic is True


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["eval.test_lr=0"], "eval.test_lr must be > 0"),
        (["eval.test_steps=-1"], "test_steps"),
        (["eval.reinit=-1"], r"eval\.reinit must be >= 0"),
    ],
)
def test_eval_protocol_values_are_checked(overrides: list[str], match: str) -> None:
    from apimeta.methods.trainer import check_run_config

    check_run_config(load_config(RunConfig, overrides=["eval.test_lr=0.1"]))  # a valid one
    assert load_config(RunConfig, overrides=["eval.test_lr=none"]).eval.test_lr is None
    with pytest.raises(ConfigError, match=match):
        check_run_config(load_config(RunConfig, overrides=overrides))


def test_a_method_variant_enters_below_direct_options_and_sets() -> None:
    """The cpu preset names ``bbkd:colour-leaves-ink-lr5``: its changes sit above the preset and
    below --method / direct options / --set; the resolved config names the plain method."""
    from apimeta.bench import variants

    cfg = resolve_config(preset="cpu")
    assert (cfg.method, cfg.recovery.source, cfg.kd.contrastive) == ("bbkd", "leaves-ink", 1.0)
    assert (cfg.kd.union_ce, cfg.kd.union_ce_min_prob, cfg.kd.contrastive_colour) == (
        1.0,
        0.8,
        True,
    )
    assert (cfg.episodes, cfg.query_budget, cfg.eval.reinit) == (4000, 50_000, 2)
    assert cfg.outer_lr == 0.005  # the variant's, over the preset's 0.001
    assert cfg.zo.q == 10  # the preset's keys the variant leaves alone
    cfg = resolve_config(preset="cpu", direct={"query_budget": 7}, sets=["eval.reinit=1"])
    assert (cfg.query_budget, cfg.eval.reinit, cfg.episodes) == (7, 1, 4000)
    paper = resolve_config(preset="cpu", direct={"method": "bidf-mkd"})
    assert (paper.method, paper.kd.contrastive, paper.recovery.source) == (
        "bidf-mkd",
        0.0,
        "generator",
    )
    assert paper.query_budget == 5_000_000 and paper.episodes == 8000 and paper.outer_lr == 0.001
    assert paper.kd.contrastive_colour is False
    named = resolve_config(direct={"method": "bbkd:dead-leaves"})
    assert (named.method, named.recovery.source, named.kd.contrastive) == (
        "bbkd",
        "dead-leaves",
        0.0,
    )
    assert resolve_config(preset="cpu", expand=False).method == "bbkd:colour-leaves-ink-lr5"
    with pytest.raises(ConfigError, match="no extension named 'nope'"):
        resolve_config(direct={"method": "bbkd:nope"})
    # with the bench's table, a variant must be one its method declares
    with pytest.raises(ConfigError, match="unknown method variant 'bidf-mkd:contrastive-leaves'"):
        resolve_config(direct={"method": "bidf-mkd:contrastive-leaves"}, variants=variants())


def test_a_resumed_run_keeps_its_own_config_not_the_variants(tmp_path: Path) -> None:
    """config.yaml stores the expanded config under the plain method: resuming does not apply
    the variant again over what the run was started with."""
    from apimeta.config import to_dict

    first = resolve_config(preset="cpu", sets=["kd.contrastive=0.5", "episodes=40"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(first)))
    again = resolve_config(resume_from=tmp_path)
    assert (again.method, again.kd.contrastive, again.episodes) == ("bbkd", 0.5, 40)
