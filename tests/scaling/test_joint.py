"""Compute-optimal scaling: the joint law, IsoFLOP profiles and loss -> FID recover known laws and agree with
each other; the optimum meets its budget and is the argmin; data that cannot determine a law is refused or
reported as not determined; every result is JSON-ready, also on many random small data sets."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import (
    FID_EXPONENT,
    FID_REF,
    LOSS_REF,
    RECORD_STEPS,
    TRUE,
    TRUE_A,
    dense_sweep,
    law_value,
    sweep_tables,
    true_budget,
)
from test_powerlaw import assert_json_ready

from harness import scaling
from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.scaling import HUBER_DELTA
from harness.scaling.joint import (
    JOINT_PARAMS,
    MIN_SIZES,
    _joint_loss_grad,
    compute_optimal_summary,
    fit_joint_law,
    fit_joint_table,
    fit_loss_to_fid,
    fit_loss_to_fid_table,
    format_compute_optimal_markdown,
    holdout_check,
    isoflop_profiles,
)


@pytest.fixture(scope="module")
def sweep():
    return sweep_tables()


@pytest.fixture(scope="module")
def sweep_law(sweep):
    return fit_joint_table(sweep[0], n_resamples=300)


# ------------------------------------------------------------------------------------------------ joint law
def test_joint_law_recovers_a_known_law_within_its_intervals(sweep_law):
    law = sweep_law
    assert law.converged and law.n_cells == 12 and law.n_points == 12 * len(RECORD_STEPS)
    assert all(law.determined.values()), law.describe()
    for k in ("alpha", "beta", "E"):
        lo, hi = law.ci[k]
        assert lo <= TRUE[k] <= hi, (k, law.describe())
    (a_lo, a_hi), (b_lo, b_hi) = law.allocation_exponents_ci
    assert a_lo <= TRUE_A <= a_hi
    assert sum(law.allocation_exponents) == pytest.approx(1.0)
    assert b_lo == pytest.approx(1 - a_hi) and b_hi == pytest.approx(1 - a_lo)
    assert_json_ready(law.to_dict())


def test_joint_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    for _ in range(20):  # random points, weights (bootstrap counts) and parameters
        n = int(rng.integers(3, 40))
        u, v, y = rng.normal(size=n), rng.normal(size=n), rng.normal(-2, 0.3, n)
        w = rng.integers(0, 4, n).astype(float) + (np.arange(n) == 0)
        theta = np.array([-3.0, -2.5, -2.5, 0.5, 0.5]) + rng.normal(0, 1, 5)
        loss, grad = _joint_loss_grad(theta, u, v, y, w, HUBER_DELTA)
        pred = np.logaddexp.reduce([np.full(n, theta[0]), theta[1] - theta[3] * u, theta[2] - theta[4] * v])
        r = pred - y
        huber = np.where(np.abs(r) <= HUBER_DELTA, r**2 / 2, HUBER_DELTA * (np.abs(r) - HUBER_DELTA / 2))
        assert loss == pytest.approx((w * huber).sum() / (HUBER_DELTA * w.sum()), rel=1e-12)
        h = 1e-7
        numeric = [
            (
                _joint_loss_grad(theta + h * e, u, v, y, w, HUBER_DELTA)[0]
                - _joint_loss_grad(theta - h * e, u, v, y, w, HUBER_DELTA)[0]
            )
            / (2 * h)
            for e in np.eye(5)
        ]
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_noiseless_joint_law_is_recovered():
    val, _ = sweep_tables(noise=0.0)
    law = fit_joint_table(val, n_resamples=0)
    for k in JOINT_PARAMS:
        assert law.params[k] == pytest.approx(TRUE[k], rel=0.02), law.describe()
    assert np.allclose(law.predict(val["gflops"], val["images_seen"]), val["val_loss"], rtol=1e-3)
    # Without resamples the bands exist, have the points' shape and say "unknown" (NaN), never crash.
    lo, hi = law.predict_interval(val["gflops"], val["images_seen"])
    assert lo.shape == hi.shape == (len(val),) and np.isnan(lo).all() and np.isnan(hi).all()
    assert all(np.isnan(b).all() and b.shape == (3,) for b in law.prediction_interval([1e6, 2e6, 3e6], 1e5))


def test_optimal_meets_the_budget_and_is_the_argmin(sweep_law):
    law = sweep_law
    budgets = np.geomspace(1e8, 1e13, 6)
    size, images = law.optimal(budgets)
    assert size.shape == images.shape == budgets.shape
    np.testing.assert_allclose(FORWARD_BACKWARD_FACTOR * size * images, budgets, rtol=1e-9)
    for c, n_opt in zip(budgets, size):
        # Brute force on the iso-compute line: sizes over 6 decades around the closed form's answer.
        sizes = np.geomspace(n_opt / 1e3, n_opt * 1e3, 200_001)
        values = law.predict(sizes, c / (FORWARD_BACKWARD_FACTOR * sizes))
        assert sizes[np.argmin(values)] == pytest.approx(n_opt, rel=1e-3)
        assert law.predict_optimal(c) == pytest.approx(values.min(), rel=1e-9)
    # N_opt ~ C^a: a decade of compute multiplies the size by 10^a.
    assert size[1] / size[0] == pytest.approx(10 ** law.allocation_exponents[0], rel=1e-9)
    band = law.optimal_interval(budgets)
    for key, point in (("size", size), ("images", images), ("metric", law.predict_optimal(budgets))):
        lo, hi = band[key]
        assert (lo <= point * (1 + 1e-9)).all() and (point <= hi * (1 + 1e-9)).all(), key


def test_a_law_without_a_size_term_reports_it_not_determined():
    val, _ = sweep_tables(law=TRUE | {"A": 0.0})
    law = fit_joint_table(val, n_resamples=200)
    assert not law.determined["A"] and not law.determined["alpha"]
    assert not law.optimum_determined
    text = law.describe()
    assert "A not determined" in text and "alpha not determined" in text
    assert f"alpha {law.params['alpha']:.3f}" not in text
    d = law.to_dict()
    assert d["params"]["A"] is None and d["params"]["alpha"] is None and d["allocation_exponents"] is None
    assert_json_ready(d)


# ------------------------------------------------------------------------------------------------ IsoFLOP
def test_isoflop_and_joint_law_agree_within_their_intervals():
    df = dense_sweep()
    iso = isoflop_profiles(df, budgets=true_budget(np.geomspace(2, 20, 6)), n_resamples=200)
    law = fit_joint_law(df["gflops"], df["images_seen"], df["val_loss"], df["cell_id"], n_resamples=200)
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


def test_isoflop_interpolates_in_log_images_and_never_extrapolates():
    # Three cells; at a budget C, cell "mid" spends it at images 2e6, between its records at 1e6 and 4e6.
    df = pd.DataFrame(
        {
            "cell_id": ["small"] * 2 + ["mid"] * 2 + ["big"] * 2,
            "gflops": [1.0] * 2 + [2.0] * 2 + [4.0] * 2,
            "images_seen": [1e6, 8e6, 1e6, 4e6, 1e6, 2e6],
            "val_loss": [1.0, 0.7, 1.0, 0.8, 0.9, 0.85],
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
                "val_loss": values.ravel(),
            }
        )
        iso = isoflop_profiles(df, budgets=budgets, n_resamples=20)
        assert not iso.minima and not iso.determined
        assert all(why in p["reason"] for p in iso.profiles if p["coefficients"] is not None)
        assert "not determined" in iso.describe() and iso.to_dict()["exponent"] is None


# ------------------------------------------------------------------------------------------------ loss -> FID
@pytest.mark.parametrize("floor", [0.0, 5.0])
def test_loss_to_fid_recovers_the_exponent_and_says_which_form(floor):
    rng = np.random.default_rng(1)
    loss = np.repeat(np.geomspace(0.105, 0.16, 12), 3)
    fid = (floor + FID_REF * (loss / LOSS_REF) ** FID_EXPONENT) * np.exp(rng.normal(0, 0.03, len(loss)))
    fit = fit_loss_to_fid(loss, fid, np.repeat(np.arange(12), 3), n_resamples=300)
    assert fit.form == ("floor" if floor else "power"), fit.choice
    assert fit.choice.startswith(f"{fit.form} law")
    lo, hi = fit.law.exponent_ci
    assert lo <= FID_EXPONENT <= hi
    if floor:
        f_lo, f_hi = fit.law.f_inf_ci
        assert f_lo <= floor <= f_hi
    lo, hi = fit.predict_interval([0.11, 0.15])
    assert (lo <= fit.predict([0.11, 0.15])).all() and (fit.predict([0.11, 0.15]) <= hi).all()
    assert_json_ready(fit.to_dict())


def test_loss_to_fid_table_refuses_mixed_fid_settings(sweep):
    _, ev = sweep
    fit = fit_loss_to_fid_table(ev, n_resamples=50)
    assert fit.label == "FID-50K" and fit.n_cells == 12
    mixed = ev.copy()
    mixed.loc[mixed["model"] == "S", "num_samples"] = 5_000
    with pytest.raises(ValueError, match="refusing to mix"):
        fit_loss_to_fid_table(mixed, n_resamples=0)
    assert fit_loss_to_fid_table(mixed, n_resamples=0, allow_mixed=True).label.endswith("(mixed settings)")
    other_sampler = ev.assign(settings_hash=np.where(ev["model"] == "B", "89abcdef", "0123abcd"))
    with pytest.raises(ValueError, match="across evaluation settings"):
        fit_loss_to_fid_table(other_sampler, n_resamples=0)


# ------------------------------------------------------------------------------------------------ summary
def test_summary_gives_each_budget_size_images_loss_and_fid_with_intervals(sweep):
    val, ev = sweep
    summary = compute_optimal_summary(val, ev, n_resamples=100, holdout_resamples=50)
    assert_json_ready(summary)
    budgets = summary["budgets"]
    final = (FORWARD_BACKWARD_FACTOR * val["gflops"] * val["images_seen"]).groupby(val["cell_id"]).max()
    assert [b["beyond_sweep"] for b in budgets] == [False] * 3 + [True] * 2
    assert budgets[0]["compute_gflops"] == pytest.approx(final.min())
    assert budgets[2]["compute_gflops"] == pytest.approx(final.max())
    for b in budgets:
        size, images = b["size_opt"]["value"], b["images_opt"]["value"]
        assert FORWARD_BACKWARD_FACTOR * size * images == pytest.approx(b["compute_gflops"], rel=1e-9)
        for key in ("size_opt", "images_opt", "val_loss", "fid"):
            v = b[key]
            assert v["low"] <= v["value"] * (1 + 1e-9) and v["value"] <= v["high"] * (1 + 1e-9), (key, v)
    # More compute buys a lower loss, and (through the loss) a lower FID.
    assert np.all(np.diff([b["val_loss"]["value"] for b in budgets]) < 0)
    assert np.all(np.diff([b["fid"]["value"] for b in budgets]) < 0)
    hold = summary["holdout"]
    assert hold["held_out_cells"] == ["DiT-XL-2_adaln_zero_synth_s0"]
    assert hold["joint"]["median_abs_rel_error"] < 0.05 and hold["loss_to_fid"]["median_abs_rel_error"] < 0.2
    md = format_compute_optimal_markdown(summary)
    assert md.startswith("## Compute-optimal\n")
    assert md.count("beyond the sweep") >= 2 and "Held-out check" in md
    assert f"{budgets[1]['size_opt']['value']:.3g}" in md


def test_summary_of_data_that_cannot_determine_the_optimum_says_so():
    val, ev = sweep_tables(law=TRUE | {"A": 0.0})
    summary = compute_optimal_summary(val, ev, n_resamples=100, holdout_resamples=30)
    assert_json_ready(summary)
    assert all(b["size_opt"] is None and b["fid"] is None for b in summary["budgets"])
    assert any("not determined" in n for n in summary["notes"])
    md = format_compute_optimal_markdown(summary)
    assert "not determined" in md
    assert "alpha not determined" in summary["joint_law"]["description"]


def test_holdout_check_predicts_the_largest_cells(sweep):
    val, ev = sweep
    hold = holdout_check(val, ev, n_holdout=2, n_resamples=100)
    assert_json_ready(hold)
    largest = sorted(val["gflops"].unique())[-2:]
    assert hold["held_out_sizes"] == largest
    assert hold["n_train_cells"] == 10
    rows = hold["joint"]["rows"]
    assert len(rows) == 2 * len(RECORD_STEPS) and {r["size"] for r in rows} == set(largest)
    for r in rows:
        assert r["rel_error"] == pytest.approx(r["predicted"] / r["measured"] - 1)
    # A prediction band holds one record's noise as well as the law's: most held-out records fall inside.
    assert hold["joint"]["fraction_inside"] >= 0.7
    assert hold["loss_to_fid"]["fraction_inside"] >= 0.7


# ------------------------------------------------------------------------------------------------ bad input
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


def test_joint_names_are_importable_from_scaling():
    assert scaling.fit_joint_law is fit_joint_law and scaling.compute_optimal_summary is compute_optimal_summary
    with pytest.raises(AttributeError):
        scaling.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------------------ properties
# (sizes, records per cell) of 3..12 points; half of them enough for a joint law, half refused.
SWEEP_SHAPES = (
    (1, 3),
    (3, 1),
    (1, 12),
    (2, 2),
    (2, 4),
    (4, 1),
    (12, 1),
    (3, 2),
    (3, 3),
    (3, 4),
    (4, 2),
    (4, 3),
    (5, 2),
    (6, 2),
)


def random_small_sweep(rng) -> dict:
    """Returns arrays (size, images, metric, cell) of a random small sweep: 3..12 points, 1..6 sizes of as many
    records each as fit, random exponents and noise, some flat or degenerate."""
    n_sizes, n_rec = SWEEP_SHAPES[rng.integers(len(SWEEP_SHAPES))]
    sizes = np.sort(10 ** rng.uniform(-1, 2, n_sizes))
    if rng.random() < 0.15:
        sizes[:] = sizes[0]  # every cell the same size
    size = np.repeat(sizes, n_rec)
    if rng.random() < 0.5:  # every cell validated at the same steps, as in a sweep
        images = np.tile(np.sort(10 ** rng.uniform(5, 8, n_rec)), n_sizes)
    else:
        images = np.concatenate([np.sort(10 ** rng.uniform(5, 8, n_rec)) for _ in sizes])
    kind = rng.choice(["law", "law", "flat", "rising", "one-term"])
    law = {
        "E": rng.choice([0.0, 10 ** rng.uniform(-2, 0)]),
        "A": 10 ** rng.uniform(-3, 0),
        "B": 10 ** rng.uniform(0, 3),
        "alpha": rng.uniform(0, 2),
        "beta": rng.uniform(0, 1),
    }
    if kind == "one-term":
        law[rng.choice(["A", "B"])] = 0.0
    metric = law_value(size, images, law) + (1e-3 if law["E"] == 0 and law["A"] == 0 and law["B"] == 0 else 0)
    if kind == "flat":
        metric = np.full(len(size), rng.uniform(0.05, 5))
    if kind == "rising":
        metric = 1 / metric
    metric = metric * np.exp(rng.normal(0, rng.uniform(0, 0.3), len(size)))
    cells = np.repeat([f"c{i}" for i in range(n_sizes)], n_rec)
    return {"size": size, "images": images, "metric": metric, "cell": cells}


# Every ValueError these fits may raise on such data says which requirement failed; anything else is a bug.
EXPECTED_REFUSALS = ("distinct sizes", "per cell", "distinct losses", "no training budget", "finite and positive")


def random_fits(d: dict, seed: int, rng) -> dict:
    """Returns {name: callable} fitting the random sweep `d` with each of the new fits and one fit_law form."""
    n = len(d["size"])
    fid = 20 * (d["metric"] / d["metric"].mean()) ** rng.uniform(0, 20) * np.exp(rng.normal(0, 0.05, n))
    table = {"gflops": d["size"], "images_seen": d["images"], "val_loss": d["metric"], "cell_id": d["cell"]}
    form = str(rng.choice(scaling.FORMS))
    return {
        "joint": lambda: fit_joint_law(d["size"], d["images"], d["metric"], d["cell"], n_resamples=3, seed=seed),
        "isoflop": lambda: isoflop_profiles(table, n_resamples=3, seed=seed),
        "loss_to_fid": lambda: fit_loss_to_fid(d["metric"], fid, d["cell"], n_resamples=3, seed=seed),
        "fit_law": lambda: scaling.fit_law(d["size"] * d["images"], d["metric"], form=form, n_resamples=3, seed=seed),
    }


@pytest.mark.parametrize("n_sets", [60, pytest.param(200, marks=pytest.mark.slow)])
def test_new_fits_on_random_small_data_sets_are_json_ready(n_sets):
    """The joint law, IsoFLOP profiles and loss -> FID (and both single-variable forms) on random small sweeps:
    each refuses with a documented ValueError or returns a record of plain Python types."""
    rng = np.random.default_rng(7 + n_sets)  # the slow run draws other data sets than the quick one
    counts = {"joint": 0, "isoflop": 0, "loss_to_fid": 0, "fit_law": 0}
    for _ in range(n_sets):
        fits = random_fits(random_small_sweep(rng), int(rng.integers(1 << 30)), rng)
        for name, fit in fits.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = fit()
            except ValueError as e:
                assert any(s in str(e) for s in EXPECTED_REFUSALS + ("distinct C",)), (name, str(e))
                continue
            record = result.to_dict()
            assert_json_ready(record)
            json.dumps(record)
            assert isinstance(result.describe(), str)
            counts[name] += 1
    assert min(counts.values()) >= n_sets // 10, counts  # every kind of fit ran on many of the data sets
