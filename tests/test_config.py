"""Typed configs: YAML loading, dotted overrides, unknown keys and type errors, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apimeta.config import apimeta_home, load_config, parse_overrides, save_config
from apimeta.errors import ConfigError
from apimeta.run_config import RunConfig


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
        (["early_stop_prob=0.9"], 0.9),
        (["data_root=/tmp/x"], "/tmp/x"),
    ],
)
def test_override_value_parsing(overrides: list[str], value) -> None:
    cfg = load_config(RunConfig, overrides=overrides)
    key = overrides[0].split("=")[0]
    assert getattr(cfg, key) == value


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
    with pytest.raises(yaml.YAMLError):  # configs are data, never code
        load_config(RunConfig, code)


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
