"""A base for the small feature extractors the metrics' tests register with torch-fidelity."""

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase


class TestExtractor(FeatureExtractorBase):
    """The part of torch-fidelity's extractor interface a test extractor does not change: never compiled, probed
    with one 4 x 4 image."""

    __test__ = False  # a helper, not a test class

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
