"""Data that cannot determine a law is refused, naming the cells and the requirement; rows of several data sets
or objectives do not share a law unless told."""

import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import RECORD_STEPS

from harness.scaling.heldout import holdout_check
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import fit_joint_table
from harness.scaling.loss_to_fid import fit_loss_to_fid
from harness.scaling.rows import MIN_SIZES


def test_bad_input_is_refused_naming_the_cells(sweep):
    val, ev = sweep
    two_sizes = val[val["gflops"].isin(sorted(val["gflops"].unique())[:2])]
    with pytest.raises(ValueError, match=f"at least {MIN_SIZES} distinct sizes"):
        fit_joint_table(two_sizes, n_resamples=0)
    one_record = val[(val["step"] == RECORD_STEPS[-1]) | (val["model"] != "XL")]
    with pytest.raises(ValueError, match=r"records .* per cell.*DiT-XL-2"):
        fit_joint_table(one_record, n_resamples=0)
    for col, value in (("val_loss", 0.0), ("val_loss", np.nan), ("gflops", -1.0), ("images_seen", np.nan)):
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
            "val_loss": [1.0, 0.9] * 3,
        }
    )
    with pytest.raises(ValueError, match="no training budget is reached by 3"):
        isoflop_profiles(far)


@pytest.mark.parametrize("column", ["data", "objective"])
def test_mixed_data_sets_or_objectives_are_refused_unless_allowed(sweep, column):
    val = sweep[0].copy()
    val[column] = np.where(val["model"] == "S", "other", "first")
    with pytest.raises(ValueError, match=f"refusing to fit one law of val_loss across {column}"):
        fit_joint_table(val, n_resamples=0)
    with pytest.raises(ValueError, match="refusing"):
        isoflop_profiles(val, n_resamples=0)
    assert fit_joint_table(val, n_resamples=0, allow_mixed=True).n_cells == 12

