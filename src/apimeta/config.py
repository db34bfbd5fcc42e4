"""Typed configs: dataclasses loaded from YAML, overridden with ``key.sub=value`` strings.

Configs are data, never code: only YAML scalars, lists and mappings are accepted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from apimeta.errors import ConfigError

C = TypeVar("C")


def apimeta_home() -> Path:
    """Cache root: ``$APIMETA_HOME`` or ``~/.cache/apimeta``."""
    return Path(os.environ.get("APIMETA_HOME") or Path.home() / ".cache" / "apimeta")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(inner, v, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Any or origin is dict or tp is dict:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, checking keys and types."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in sorted(unknown))}; "
            f"valid keys: {', '.join(sorted(prefix + n for n in names))}"
        )
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    d[parts[-1]] = value


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["zo.q=20", "episodes=100"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. zo.q=20)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(
                f"override {item!r}: the value is not a plain YAML scalar, list or mapping"
            ) from None
        _set_dotted(out, key.strip(), value)
    return out


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    migrate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> C:
    """Defaults of ``cls`` <- ``base`` <- YAML file at ``path`` <- ``overrides`` (last wins).

    ``migrate``: applied to the file's and the overrides' mappings before merging (old layouts).
    """
    fix = migrate or (lambda d: d)
    data = to_dict(cls())
    if base:
        data = merge(data, base)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a YAML mapping")
        data = merge(data, fix(loaded))
    for item in overrides or ():  # one at a time: a later override wins
        data = merge(data, fix(parse_overrides([item])))
    return from_dict(cls, data)


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path`` (None if empty); broken YAML and YAML tags that would build
    Python objects are a :class:`ConfigError` naming the file and line."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.constructor.ConstructorError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ConfigError(
            f"{path}{where}: the tag {e.problem.split()[-1] if e.problem else ''} is not allowed; "
            "configs are data, never code: use plain values, lists and mappings"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); fix the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from apimeta.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
