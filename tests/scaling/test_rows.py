"""Data that cannot determine a law is refused, naming the cells and the requirement; cells that differ in any
training setting off the law's axes (data set, objective, learning rate, batch, ...) do not share a law unless
told, or fitted as their best-per-size envelope."""

import json

import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import RECORD_STEPS

from harness.core.config import compose, training_settings
from harness.results import envelope
from harness.scaling.heldout import holdout_check
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import fit_joint_table
from harness.scaling.loss_to_fid import fit_loss_to_fid
from harness.scaling.rows import MIN_SIZES, validation_points


def test_bad_input_is_refused_naming_the_cells(sweep):
    val, ev = sweep
    two_sizes = val[val["gflops"].isin(sorted(val["gflops"].unique())[:2])]
    with pytest.raises(ValueError, match=f"at least {MIN_SIZES} distinct sizes"):
        fit_joint_table(two_sizes, n_resamples=0)
    one_record = val[(val["step"] == RECORD_STEPS[-1]) | (val["model"] != "XL")]
    with pytest.raises(ValueError, match=r"records .* per cell.*DiT-XL-2"):
        fit_joint_table(one_record, n_resamples=0)
    for col, value in (("val_loss_ema", 0.0), ("val_loss_ema", np.nan), ("gflops", -1.0), ("images_seen", np.nan)):
        bad = val.copy()
        bad.loc[bad["cell_id"] == "DiT-B-4_adaln_zero_synth_s0", col] = value
        with pytest.raises(ValueError, match=f"{col} must be finite and positive.*DiT-B-4_adaln_zero_synth_s0"):
            fit_joint_table(bad, n_resamples=0)
    with pytest.raises(ValueError, match="lacks columns"):
        fit_joint_table(val.drop(columns="images_seen"))
    with pytest.raises(ValueError, match="at least 3 distinct losses"):
        fit_loss_to_fid([0.1, 0.1, 0.2, 0.2], [10, 11, 20, 21])
    with pytest.raises(ValueError, match="holding out"):
        holdout_check(val[val["gflops"].isin(sorted(val["gflops"].unique())[:3])], n_holdout=1)
    far = pd.DataFrame(
        {
            "cell_id": np.repeat(["a", "b", "c"], 2),
            "gflops": np.repeat([1.0, 100.0, 10_000.0], 2),
            "images_seen": [1e6, 2e6] * 3,
            "val_loss_ema": [1.0, 0.9] * 3,
        }
    )
    with pytest.raises(ValueError, match="no training budget is reached by 3"):
        isoflop_profiles(far)


@pytest.mark.parametrize("column", ["data", "objective"])
def test_mixed_data_sets_or_objectives_are_refused_unless_allowed(sweep, column):
    val = sweep[0].copy()
    val[column] = np.where(val["model"] == "S", "other", "first")
    with pytest.raises(ValueError, match=f"refusing to fit one law of val_loss_ema across {column}"):
        fit_joint_table(val, n_resamples=0)
    with pytest.raises(ValueError, match="refusing"):
        isoflop_profiles(val, n_resamples=0)
    assert fit_joint_table(val, n_resamples=0, allow_mixed=True).n_cells == 12



# ---- no hidden mixing: a law fits cells that differ only along its axes ----

BASE = ["model=demo-S", "data=digits", "data.image_size=8", "train=demo"]
# (override of one cell, the setting a refusal must name): the settings a compute-optimal study varies by mistake
MIXED = [
    ("train.lr=3e-4", "train.lr"),
    ("train.global_batch=32", "train.global_batch"),
    ("train.ema_decay=0.999", "train.ema_decay"),
    ("train.weight_decay=0.01", "train.weight_decay"),
    ("train.class_dropout_prob=0.2", "train.class_dropout_prob"),
    ("train.precision=bf16", "train.precision"),
    ("cond=adaln", "cond"),
    ("data.image_size=16", "data.image_size"),
    ("model.parametrization=mup model.mup_base_width=32", "model.parametrization"),
    ("objective=flow", "objective.name"),
    ("train.val_batch=64", "train.val_batch"),
]


def _table(variant: list[str]) -> pd.DataFrame:
    """A validation table of 4 cells (3 sizes, the last cell of the largest size trained with `variant`), its
    settings read from composed configs as the results table reads them."""
    rows = []
    for k, (width, extra) in enumerate(((32, []), (64, []), (96, []), (96, variant))):
        cfg = compose([*BASE, f"model.hidden_size={width}", "model.num_heads=2", *extra])
        settings = json.dumps(training_settings(cfg), sort_keys=True, default=str)
        for images in (1e5, 2e5):
            rows.append({"cell_id": f"c{k}", "gflops": width / 100 * (1.01 if k == 3 else 1), "images_seen": images,
                         "val_loss_ema": 0.2 + 1 / width + 1e4 / images, "settings": settings, "cond": "adaln_zero"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("override,setting", MIXED, ids=[s for _, s in MIXED])
def test_cells_that_differ_off_the_laws_axes_are_refused_naming_the_setting(override, setting):
    table = _table(override.split())
    with pytest.raises(ValueError) as e:
        validation_points(table, cond=None)
    message = str(e.value)
    assert "\n" not in message and f"{setting}: " in message and "allow_mixed" in message and "envelope" in message
    assert validation_points(table, cond=None, allow_mixed=True)["cell_id"].nunique() == 4
    # the law's own axes (size, duration, seed) never refuse
    same = _table([])
    assert validation_points(same, cond=None)["cell_id"].nunique() == 4


def test_the_envelope_fits_the_best_cell_at_each_size_and_duration():
    """A learning-rate sweep: at each size the middle rate is best; the envelope picks it at every record and
    names one curve per size."""
    rows = []
    for width in (32, 64, 96):
        for lr, penalty in ((1e-4, 0.05), (3e-4, 0.0), (1e-3, 0.08)):
            cfg = compose([*BASE, f"model.hidden_size={width}", "model.num_heads=2", f"train.lr={lr}"])
            settings = json.dumps(training_settings(cfg), sort_keys=True, default=str)
            for images in (1e5, 2e5, 4e5):
                rows.append({"cell_id": f"w{width}_lr{lr:g}", "gflops": width / 100, "images_seen": images,
                             "val_loss_ema": 0.2 + 1 / width + 1e4 / images + penalty, "settings": settings})
    table = pd.DataFrame(rows)
    with pytest.raises(ValueError, match="train.lr: 0.0001 .3 cells., 0.0003 .3 cells., 0.001 .3 cells."):
        validation_points(table, cond=None)
    env = validation_points(table, cond=None, envelope=True)
    assert len(env) == 9 and env["cell_id"].nunique() == 3 and env["cell_id"].str.startswith("envelope@").all()
    best = envelope(table, "val_loss_ema")
    assert set(best["envelope_of"]) == {"w32_lr0.0003", "w64_lr0.0003", "w96_lr0.0003"}


def test_laws_warn_when_they_fit_records_past_four_epochs():
    table = _table([]).assign(epochs=[1.0, 2.0, 3.0, 6.0, 1.0, 2.0, 5.0, 9.0])
    with pytest.warns(UserWarning, match="past 4 epochs"):
        validation_points(table, cond=None)


def test_a_training_batch_loss_is_fitted_only_when_asked_for_by_name():
    table = _table([]).rename(columns={"val_loss_ema": "train_batch_loss_ema"}).assign(val_loss_ema=np.nan)
    with pytest.raises(ValueError, match="only a fixed training-batch loss.*metric='train_batch_loss'"):
        validation_points(table, cond=None)
    assert len(validation_points(table, metric="train_batch_loss_ema", cond=None)) == 8
