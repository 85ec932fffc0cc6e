"""What the metrics' tests share: the digits at 16 x 16 as the evaluator sees them, built once per session."""

import pytest

from harness.core.config import DataConfig
from harness.metrics import references


@pytest.fixture(scope="session")
def digits_sets():
    """(test split, train split) of the digits at 16 x 16, uint8 (N, 16, 16, 3)."""
    cfg = DataConfig(name="digits", image_size=16)
    return references.reference_images(cfg, "test"), references.reference_images(cfg, "train")
