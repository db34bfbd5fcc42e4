"""Meta-learning methods, by name (``apimeta train --method NAME``).

``METHODS.get(name)()`` gives a :class:`Method`; ``METHODS.names()`` lists them. Methods built
on the shared loop subclass :class:`MetaTrainer` (``methods/trainer.py``); methods that learn
from APIs subclass :class:`APILearner` (``methods/api_learner.py``). A method module registers
itself with ``@METHODS.register(name)``; add its import below (docs/architecture.md).
"""

from __future__ import annotations

from apimeta.methods import bbkd, bidf_mkd, maml_real, maml_zoo, random_init  # noqa: F401
from apimeta.methods.api_learner import APILearner
from apimeta.methods.interface import METHODS, Method, ProgressFn, TrainResult
from apimeta.methods.trainer import MetaTrainer, TrainerState, check_run_config

__all__ = [
    "METHODS",
    "APILearner",
    "MetaTrainer",
    "Method",
    "ProgressFn",
    "TrainResult",
    "TrainerState",
    "check_run_config",
]
