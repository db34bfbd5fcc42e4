"""Typed errors. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class ApimetaError(Exception):
    """Base class of every error apimeta raises on purpose."""


class ConfigError(ApimetaError, ValueError):
    """A configuration value or CLI option is invalid."""


class DatasetNotFoundError(ApimetaError, FileNotFoundError):
    """A dataset file, folder or data package is missing."""


class EpisodeError(ApimetaError, ValueError):
    """An episode cannot be built (too few classes/images) or has inconsistent shapes."""


class InvalidQueryError(ApimetaError, ValueError):
    """A query sent to an API has the wrong shape, dtype or value range."""


class QueryBudgetExceeded(ApimetaError):
    """The query that was about to be sent would exceed the ledger's hard budget.

    Raised *before* the query is sent: nothing was charged for it.
    """

    def __init__(self, requested: int, used: int, budget: int, api: str | None = None):
        self.requested, self.used, self.budget, self.api = requested, used, budget, api
        where = f" to API {api!r}" if api else ""
        super().__init__(
            f"query of {requested} images{where} would exceed the budget: "
            f"{used} of {budget} already used ({budget - used} left). "
            "Raise the budget (--query-budget) or reduce recovery cost (recovery.iters, zo.q)."
        )


class APIError(ApimetaError, RuntimeError):
    """An API backend failed (unreachable, protocol mismatch, bad output)."""


class APIUnavailableError(APIError):
    """A training run stopped because an API kept failing; ``last.pt`` holds the state before the
    failed meta-update, so ``apimeta train --resume --out DIR`` continues exactly.

    ``step``: the meta-update the checkpoint resumes at; ``run_dir``: the run directory.
    """

    def __init__(self, message: str, step: int, run_dir: str):
        super().__init__(message)
        self.step, self.run_dir = step, run_dir


class CheckpointError(ApimetaError, RuntimeError):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingInterrupted(ApimetaError):
    """A training run stopped on SIGINT/SIGTERM after saving ``last.pt``; ``apimeta train
    --resume --out DIR`` continues exactly. ``signal``: the signal number (2 or 15)."""

    def __init__(self, message: str, step: int, run_dir: str, signal: int = 2):
        super().__init__(message)
        self.step, self.run_dir, self.signal = step, run_dir, signal
