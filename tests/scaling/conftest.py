"""The synthetic sweep the compute-optimal tests share (tests/fixtures_scaling.py): drawn once, read only."""

import pytest
from fixtures_scaling import sweep_tables


@pytest.fixture(scope="session")
def sweep():
    """Returns (validation table, results table) of the DiT-like synthetic sweep from the known law."""
    return sweep_tables()
