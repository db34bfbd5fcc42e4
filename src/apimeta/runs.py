"""Run directories: resolved config, metrics JSONL, checkpoints and evaluation JSON.

Layout of ``runs/<method>-<UTC timestamp>/`` (or ``cfg.out``)::

    config.yaml      resolved RunConfig (written at start; re-read by --resume)
    metrics.jsonl    one JSON object per line (one per meta-update, plus eval records)
    last.pt          latest training state (resume point)
    best.pt          state at the best meta-validation score
    test.json        final meta-test results (best and final checkpoints)
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

from apimeta.config import save_config
from apimeta.errors import CheckpointError, ConfigError
from apimeta.io import atomic_write_json, atomic_write_text
from apimeta.run_config import RunConfig, load_run_config


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # tensors / numpy scalars
        try:
            return _jsonable(v.item())
        except (ValueError, RuntimeError):
            return _jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


class RunDir:
    """A run directory; see the module docstring for its layout."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = not self.path.exists()  # made by this object (discard_if_empty may remove)
        self.path.mkdir(parents=True, exist_ok=True)

    def discard_if_empty(self) -> None:
        """Remove the directory again if this object created it and nothing was written."""
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    @classmethod
    def create(cls, cfg: RunConfig, root: str | Path = "runs", *, resume: bool = False) -> RunDir:
        """The run directory for ``cfg``: ``cfg.out`` or ``root/<method>-<timestamp>``.

        ``resume=True`` needs an existing directory with ``last.pt``; otherwise an existing
        non-empty run directory is refused (pass --resume or another --out).
        """
        if cfg.out:
            path = Path(cfg.out)
        else:
            if resume:
                raise ConfigError("--resume needs the run directory: pass --out runs/<name>")
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            path = Path(root) / f"{cfg.method}-{stamp}"
            i = 2
            while path.exists():
                path = Path(root) / f"{cfg.method}-{stamp}-{i}"
                i += 1
        if resume:
            if not (path / "last.pt").is_file():
                raise CheckpointError(
                    f"cannot resume: {path / 'last.pt'} does not exist; start a new run instead"
                )
        elif (path / "last.pt").exists() or (path / cls.METRICS).exists():
            raise ConfigError(
                f"run directory {path} already holds a run; pass --resume to continue it "
                "or choose another --out"
            )
        return cls(path)

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.path / "best.pt"

    def file(self, name: str) -> Path:
        """Path of an arbitrary file inside the run directory."""
        return self.path / name

    # config
    def save_config(self, cfg: RunConfig) -> None:
        save_config(cfg, self.config_path)

    def load_config(self) -> RunConfig:
        """The run's ``config.yaml`` (written by this or an older apimeta)."""
        return load_run_config(self.config_path)

    # metrics
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and flush it."""
        line = json.dumps(_jsonable(record), allow_nan=False)
        with self.metrics_path.open("a") as f:
            f.write(line + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]

    def truncate_metrics(self, max_step: int) -> None:
        """Drop records with ``step > max_step`` (written after the checkpoint we resume from)."""
        records = [r for r in self.read_metrics() if int(r.get("step", 0)) <= max_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write_json(path, _jsonable(obj))
        return path

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


__all__ = ["RunDir"]
