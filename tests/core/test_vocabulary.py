"""The metric vocabulary: one label per (metric, sample count, extractor), the same for a record, a table and a
figure; the vocabulary loads nothing heavy."""

import subprocess
import sys

import pytest

from harness.core.vocabulary import (
    DIGITS_EXTRACTOR,
    DINOV2_EXTRACTOR,
    INCEPTION_EXTRACTOR,
    METRIC_OF_KEY,
    METRICS,
    VALUE_KEYS,
    format_samples,
    metric_label,
)


def test_metric_labels_for_every_metric():
    assert [metric_label(m, extractor=INCEPTION_EXTRACTOR) for m in METRICS if m != "fd_dinov2"] \
        == ["FID", "IS", "KID", "precision/recall", "sFID"]
    assert metric_label("fid", extractor=DIGITS_EXTRACTOR) == "FID (digits extractor)"
    assert metric_label("sfid", extractor=DIGITS_EXTRACTOR) == "sFID (digits extractor)"
    assert metric_label("fd_dinov2", extractor=DINOV2_EXTRACTOR) == "FD-DINOv2"
    assert metric_label("fd_dinov2", extractor="dinov2-vit-s-14") == "FD-DINOv2 (dinov2-vit-s-14)"
    assert metric_label("fid", extractor=DINOV2_EXTRACTOR) == "FID (dinov2-vit-l-14 extractor)"  # not the paper's FID
    with pytest.raises(ValueError, match="allowed"):
        metric_label("lpips", extractor=INCEPTION_EXTRACTOR)


def test_metric_labels_name_sample_count_and_extractor():
    assert metric_label("fid", 50_000, "inception-v3-compat") == "FID-50K"
    assert metric_label("fid", 5_000, "digits-cnn") == "FID-5K (digits extractor)"
    assert metric_label("val_loss") == "validation loss"
    # FD-DINOv2 is measured in DINOv2's space whatever extractor the record's FID used
    assert metric_label("fd_dinov2", 500, "digits-cnn") == "FD-DINOv2-500"
    assert metric_label("fid", float("nan"), None) == "FID"  # a table's missing values leave the name alone
    assert [format_samples(n) for n in (50_000, 1500, 800)] == ["50K", "1.5K", "800"]


def test_every_recorded_value_belongs_to_a_metric_that_can_be_asked_for():
    assert set(METRIC_OF_KEY) == set(VALUE_KEYS) and set(METRIC_OF_KEY.values()) == set(METRICS)


@pytest.mark.process
def test_the_vocabulary_imports_nothing_heavy():
    """The torch-free analysis reads its labels here: importing it must not load torch or torch-fidelity."""
    code = ("import sys; import harness.core.vocabulary; "
            "print(sorted(m for m in ('torch', 'torch_fidelity', 'torchvision', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
