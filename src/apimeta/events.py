"""When an API event happens (docs/design.md 4.8): the event schedule of API learners.

An :class:`EventSchedule` starts with an event due; after each meta-update it is told that
update's training accuracy (:meth:`EventSchedule.update`) and decides whether the next update
should start with an API event. Triggers (registry :data:`TRIGGERS`, ``events.trigger``):

* ``plateau`` (the paper): due after ``patience`` updates without a new running maximum of the
  training accuracy (the maximum restarts after each event);
* ``every`` (extension, bbkd's schedule): due every ``patience`` updates, whatever the accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from apimeta.episodes import APIEpisode
from apimeta.registry import Registry
from apimeta.report import save_image_grid
from apimeta.runs import RunDir

#: trigger name -> whether a new accuracy maximum resets the count
TRIGGERS: Registry[bool] = Registry("event trigger")
TRIGGERS.register("plateau")(True)
TRIGGERS.register("every")(False)


class EventSchedule:
    """Plateau or periodic API events; ``due`` says whether the next episode is an API event."""

    def __init__(self, trigger: str = "plateau", patience: int = 25):
        self.resets_on_max = TRIGGERS.get(trigger)
        self.patience = int(patience)
        self.due = True
        self.running_max = -1.0
        self.plateau = 0

    def event_done(self) -> None:
        """An API event happened: none is due until the schedule says so again."""
        self.due = False

    def update(self, acc: float) -> None:
        """After a meta-update with mean training accuracy ``acc`` (a fraction)."""
        if self.resets_on_max and acc > self.running_max:
            self.running_max, self.plateau = acc, 0
            return
        self.plateau += 1
        if self.plateau >= self.patience:
            self.due = True
            self.running_max, self.plateau = -1.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"event_due": self.due, "running_max": self.running_max, "plateau": self.plateau}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.due = bool(state["event_due"])
        self.running_max = float(state["running_max"])
        self.plateau = int(state["plateau"])


@dataclass
class APIEvent:
    """One API event as a method records it: ``index`` (0-based count of events), the
    :class:`APIEpisode` it recovered and ``record``, the line ``metrics.jsonl`` gets (its
    ``step`` is the meta-update the event belongs to, 1-based like train records)."""

    index: int
    episode: APIEpisode
    record: dict[str, Any]


EventHook = Callable[[APIEvent], None]
"""Called with each :class:`APIEvent` a method records."""


def save_recovered_grid(run: RunDir, per_class: int = 8) -> EventHook:
    """A hook writing ``recovered/event-NNNN.png``: up to ``per_class`` support images of each
    class of the event, one row per class."""

    def hook(event: APIEvent) -> None:
        ep = event.episode
        rows = [ep.support_x[ep.support_y == i][:per_class] for i in range(len(ep.classes))]
        path = run.file(f"recovered/event-{event.index:04d}.png")
        save_image_grid(torch.cat(rows), path, per_class)

    return hook


__all__ = ["TRIGGERS", "APIEvent", "EventHook", "EventSchedule", "save_recovered_grid"]
