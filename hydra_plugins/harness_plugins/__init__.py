"""Hydra plugin of the harness: the grid sweeper.

Hydra discovers plugins by importing the `hydra_plugins` namespace package; keep this import light. The named grids
of `sweeps/` are not found through a search path: harness.core.config registers each with Hydra's ConfigStore as an
option of the group `sweeps`, so Hydra's search path holds conf/ and nothing else of the repository (a search path
at the repository root exposed every folder under it, .venv/ and outputs/ included, to --help and completion).
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper

import harness.core.config  # noqa: F401 - registers the schema and the named grids with Hydra's ConfigStore


class GridSweeper(Sweeper):
    """Hydra's entry point for `harness.sweep.GridSweep` (plugins must live in hydra_plugins)."""

    def __init__(self, max_batch_size=None, params=None):
        from harness.sweep import GridSweep  # here: plugin discovery imports this module, the sweep loads torch

        self.impl = GridSweep(params=params)

    def setup(self, *, hydra_context, task_function, config):
        self.impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments):
        return self.impl.sweep(arguments)


@dataclass
class GridSweeperConf:
    _target_: str = "hydra_plugins.harness_plugins.GridSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = field(default=None)


ConfigStore.instance().store(group="hydra/sweeper", name="harness_grid", node=GridSweeperConf, provider="harness")
