"""Meta-learning methods, by name (``apimeta train --method NAME``).

``METHODS.get(name)()`` gives a :class:`Method`; ``METHODS.names()`` lists them. Methods built
on the shared template subclass :class:`MetaTrainer` (see ``apimeta.methods.base``).
"""

from __future__ import annotations

import importlib

from apimeta.methods.base import (
    MetaTrainer,
    Method,
    ProgressFn,
    TrainResult,
    build_meta_model,
    load_meta_model,
)
from apimeta.methods.maml_real import MAMLReal
from apimeta.methods.random_init import RandomInit
from apimeta.registry import Registry

METHODS: Registry[type[Method]] = Registry("method")
METHODS.add(MAMLReal.name, MAMLReal)
METHODS.add(RandomInit.name, RandomInit)

# Methods in their own modules register themselves on import (``METHODS.add(...)``).
for _mod in ("bidf_mkd", "bbkd"):
    try:
        importlib.import_module(f"apimeta.methods.{_mod}")
    except ModuleNotFoundError as _e:  # not written yet
        if _e.name != f"apimeta.methods.{_mod}":
            raise

__all__ = [
    "METHODS",
    "MAMLReal",
    "MetaTrainer",
    "Method",
    "ProgressFn",
    "RandomInit",
    "TrainResult",
    "build_meta_model",
    "load_meta_model",
]
