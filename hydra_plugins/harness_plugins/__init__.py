"""Hydra plugins of the harness: the `sweeps/` folder on the search path and the grid sweeper.

Hydra discovers plugins by importing the `hydra_plugins` namespace package; keep this import light.
"""

from dataclasses import dataclass, field

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper

from harness.core.config import REPO_ROOT  # its `sweeps/` folder becomes the config group `sweeps` (named grids)


class HarnessSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="harness-sweeps", path=f"file://{REPO_ROOT}")


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
