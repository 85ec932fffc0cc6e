"""The cells-per-size simulation: a study's own law replicated per size through the IsoFLOP bootstrap. One cell
per size fails resamples even on noise-free values, more cells per size fail fewer, the simulated studies find
the law's exponent, and bad settings are refused before any fit."""

import math

import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import law_value

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.scaling.design import DESIGN_COLUMNS, isoflop_replicates


def staggered_study(rng: np.random.Generator, n_sizes: int = 7) -> tuple[pd.DataFrame, dict]:
    """Returns (validation table, law) of one cell per size of a random law, each size trained from three sizes'
    optimal budgets below its own to one and a half above (as the CPU study staggers its sizes: about four
    sizes reach each budget)."""
    law = {"E": rng.uniform(0.02, 0.2), "A": rng.uniform(0.005, 0.05), "B": rng.uniform(3.0, 30.0),
           "alpha": rng.uniform(0.35, 0.7), "beta": rng.uniform(0.3, 0.6)}
    a = law["beta"] / (law["alpha"] + law["beta"])
    g = (law["alpha"] * law["A"] / (law["beta"] * law["B"])) ** (1 / (law["alpha"] + law["beta"]))
    sizes = np.geomspace(1.0, 30.0, n_sizes)
    step = (sizes[1] / sizes[0]) ** (1 / a)  # from one size's optimal budget to the next's
    rows = []
    for i, size in enumerate(sizes):
        optimal_at = FORWARD_BACKWARD_FACTOR * (size / g) ** (1 / a)  # the budget at which this size is optimal
        for c in np.geomspace(optimal_at / step**3, optimal_at * step**1.5, 8):
            images = c / (FORWARD_BACKWARD_FACTOR * size)
            rows.append({"cell_id": f"w{i}", "gflops": size, "images_seen": images,
                         "val_loss_ema": float(law_value(size, images, law))})
    return pd.DataFrame(rows), law


@pytest.mark.parametrize("draw", range(5))
def test_more_cells_per_size_fail_fewer_resamples_and_find_the_law(draw):
    df, law = staggered_study(np.random.default_rng(draw))
    out = isoflop_replicates(df, cells_per_size=(1, 4), cell_sd=0.0, record_sd=0.0, repeats=1, n_resamples=200,
                             cond=None).set_index("cells_per_size")
    assert list(out.reset_index().columns) == list(DESIGN_COLUMNS)
    one, four = out.loc[1], out.loc[4]
    assert 0 <= four["failed_fraction_mean"] < one["failed_fraction_mean"] <= 1
    assert one["failed_fraction_mean"] > 0.025  # noise-free, one cell per size: the design alone fails resamples
    assert four["determined_fraction"] == 1 and four["width_median"] < 0.1
    assert out["cells"].tolist() == [7, 28]
    true_a = law["beta"] / (law["alpha"] + law["beta"])
    assert out["law_exponent"].iloc[0] == pytest.approx(true_a, abs=0.02)  # the joint law recovers its truth
    assert abs(four["slope_mean"] - true_a) < 0.05  # and the replicated studies find it


def test_seed_spread_moves_the_slope_and_widens_the_interval():
    df, _ = staggered_study(np.random.default_rng(1))
    kw = dict(cells_per_size=(4,), repeats=4, n_resamples=200, cond=None)
    clean = isoflop_replicates(df, cell_sd=0.0, record_sd=0.0, **kw).iloc[0]
    noisy = isoflop_replicates(df, cell_sd=0.003, record_sd=0.001, **kw).iloc[0]
    assert clean["slope_sd"] == 0  # noise-free repeats differ only in their resamples, not in their minima
    assert clean["fitted_fraction"] == 1 and noisy["fitted_fraction"] > 0
    assert noisy["slope_sd"] > 0
    assert math.isnan(noisy["width_median"]) or noisy["width_median"] > clean["width_median"]
    swamped = isoflop_replicates(df, cell_sd=0.3, record_sd=0.1, **kw).iloc[0]  # far beyond the profiles' depth
    assert swamped["determined_fraction"] < 1
    again = isoflop_replicates(df, cell_sd=0.003, record_sd=0.001, **kw).iloc[0]
    pd.testing.assert_series_equal(noisy, again)  # the same seed draws the same studies


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"cells_per_size": (0, 2)}, "cells_per_size"),
        ({"cells_per_size": (1.5,)}, "cells_per_size"),
        ({"cell_sd": -0.1}, "cell_sd"),
        ({"record_sd": float("nan")}, "record_sd"),
        ({"repeats": 0}, "repeats"),
        ({"n_resamples": 0}, "n_resamples"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        isoflop_replicates(pd.DataFrame(), **kwargs)  # refused before the (empty) table is read
