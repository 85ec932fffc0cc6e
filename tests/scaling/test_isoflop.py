"""IsoFLOP profiles agree with the joint law within their intervals, interpolate each cell's curve in log images
without extrapolating, and say when a parabola has no minimum inside the sizes trained."""

import math

import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import TRUE_A, dense_sweep, true_budget
from test_powerlaw import assert_json_ready

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import fit_joint_law


def test_isoflop_and_joint_law_agree_within_their_intervals():
    df = dense_sweep()
    iso = isoflop_profiles(df, budgets=true_budget(np.geomspace(2, 20, 6)), n_resamples=200)
    law = fit_joint_law(df["gflops"], df["images_seen"], df["val_loss_ema"], df["cell_id"], n_resamples=200)
    assert iso.determined, iso.describe()
    i_lo, i_hi = iso.exponent_ci
    (j_lo, j_hi), _ = law.allocation_exponents_ci
    assert i_lo <= TRUE_A <= i_hi and j_lo <= TRUE_A <= j_hi
    assert max(i_lo, j_lo) <= min(i_hi, j_hi)  # the intervals overlap
    for p in iso.minima:  # a minimum counts only inside the sizes trained at that budget
        assert p["points"]["size"].min() <= p["size_opt"] <= p["points"]["size"].max()
        assert p["coefficients"][2] > 0
    c = iso.budgets
    np.testing.assert_allclose(iso.size_opt(c) * iso.images_opt(c) * FORWARD_BACKWARD_FACTOR, c, rtol=1e-9)
    assert_json_ready(iso.to_dict())
    assert iso.to_dict()["exponent_point"] == pytest.approx(iso.exponent)


def test_isoflop_interpolates_in_log_images_and_never_extrapolates():
    # Three cells; at a budget C, cell "mid" spends it at images 2e6, between its records at 1e6 and 4e6.
    df = pd.DataFrame(
        {
            "cell_id": ["small"] * 2 + ["mid"] * 2 + ["big"] * 2,
            "gflops": [1.0] * 2 + [2.0] * 2 + [4.0] * 2,
            "images_seen": [1e6, 8e6, 1e6, 4e6, 1e6, 2e6],
            "val_loss_ema": [1.0, 0.7, 1.0, 0.8, 0.9, 0.85],
        }
    )
    budget = FORWARD_BACKWARD_FACTOR * 2.0 * 2e6
    iso = isoflop_profiles(df, budgets=[budget], n_resamples=0)
    pts = iso.profiles[0]["points"].set_index("cell_id")
    assert pts.loc["mid", "metric"] == pytest.approx(1.0 + (0.8 - 1.0) * math.log(2) / math.log(4))
    assert pts.loc["small", "images"] == pytest.approx(4e6)  # C / (3 x 1 Gflops)
    assert pts.loc["big", "images"] == pytest.approx(1e6)  # its first record, exactly
    later = isoflop_profiles(df, budgets=[budget * 1.5], n_resamples=0).profiles[0]
    assert "big" in set(later["points"]["cell_id"])  # 1.5e6 images: between its records
    beyond = isoflop_profiles(df, budgets=[FORWARD_BACKWARD_FACTOR * 4.0 * 3e6], n_resamples=0).profiles[0]
    assert "big" not in set(beyond["points"]["cell_id"])  # after its last record: no point, no extrapolation
    assert beyond["size_opt"] is None and "parabola needs 3" in beyond["reason"]


def test_isoflop_says_when_the_parabola_has_no_minimum_inside():
    sizes = np.geomspace(1, 100, 5)
    images = np.geomspace(1e6, 1e8, 6)
    g, d = np.meshgrid(sizes, images, indexing="ij")
    budgets = FORWARD_BACKWARD_FACTOR * 10.0 * np.geomspace(3e6, 3e7, 3)
    for values, why in (
        (1.0 + 1.0 / g**0.5 + 0 * d, "above the largest size"),  # falls with size at every budget
        (10.0 - np.log(g) ** 2 / 10 + 0 * d, "opens downwards"),
    ):
        df = pd.DataFrame(
            {
                "cell_id": np.repeat([f"c{i}" for i in range(5)], 6),
                "gflops": g.ravel(),
                "images_seen": d.ravel(),
                "val_loss_ema": values.ravel(),
            }
        )
        iso = isoflop_profiles(df, budgets=budgets, n_resamples=20)
        assert not iso.minima and not iso.determined
        assert all(why in p["reason"] for p in iso.profiles if p["coefficients"] is not None)
        assert "not determined" in iso.describe() and iso.to_dict()["exponent"] is None
        assert iso.to_dict()["exponent_point"] is None  # no minima: no line either

