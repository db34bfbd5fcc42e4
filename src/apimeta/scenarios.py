"""API scenarios of the paper (docs/design.md 2): which API answers each API event.

* ``SS`` (same dataset, same architecture): uniform over all APIs.
* ``SH`` (same dataset, heterogeneous architectures): architecture uniform, then uniform among it.
* ``MH`` (multiple datasets, heterogeneous architectures): dataset uniform, then architecture
  uniform, then uniform among those APIs.

APIs are drawn with replacement. Architecture comes from ``info.tags["arch"]`` (zoo metadata).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apimeta.apis.base import BlackBoxAPI
from apimeta.errors import ConfigError

SCENARIOS = ("SS", "SH", "MH")


def _arch(api: BlackBoxAPI) -> str:
    return str(api.info.tags.get("arch", "unknown"))


def infer_scenario(apis: Sequence[BlackBoxAPI]) -> str:
    """SS for one dataset and one architecture, SH for one dataset and several, MH otherwise."""
    if not apis:
        raise ConfigError("the zoo holds no APIs; build one with `apimeta zoo build`")
    datasets = {a.info.dataset for a in apis}
    archs = {_arch(a) for a in apis}
    if len(datasets) > 1:
        return "MH"
    return "SH" if len(archs) > 1 else "SS"


class APIPool:
    """Draws the API of each API event according to ``scenario`` with an explicit generator."""

    def __init__(
        self,
        apis: Sequence[BlackBoxAPI],
        scenario: str = "auto",
        generator: torch.Generator | None = None,
    ):
        if not apis:
            raise ConfigError("the zoo holds no APIs; build one with `apimeta zoo build`")
        self.apis = list(apis)
        self.scenario = infer_scenario(self.apis) if scenario == "auto" else scenario.upper()
        if self.scenario not in SCENARIOS:
            raise ConfigError(
                f"scenario must be auto or one of {', '.join(SCENARIOS)}, got {scenario!r}"
            )
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        # nested groups: dataset -> arch -> [index into apis]
        self._groups: dict[str, dict[str, list[int]]] = {}
        for i, a in enumerate(self.apis):
            self._groups.setdefault(a.info.dataset, {}).setdefault(_arch(a), []).append(i)

    def _choice(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.generator))

    def draw(self) -> BlackBoxAPI:
        """The API of the next event."""
        if self.scenario == "SS":
            return self.apis[self._choice(len(self.apis))]
        if self.scenario == "SH":
            by_arch: dict[str, list[int]] = {}
            for arches in self._groups.values():
                for arch, idx in arches.items():
                    by_arch.setdefault(arch, []).extend(idx)
            keys = sorted(by_arch)
            idx = by_arch[keys[self._choice(len(keys))]]
            return self.apis[idx[self._choice(len(idx))]]
        datasets = sorted(self._groups)
        arches = self._groups[datasets[self._choice(len(datasets))]]
        keys = sorted(arches)
        idx = arches[keys[self._choice(len(keys))]]
        return self.apis[idx[self._choice(len(idx))]]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
