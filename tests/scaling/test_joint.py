"""The joint law in size and images recovers a known law within its intervals; its optimum meets its budget and
is the argmin; a term the data cannot determine is reported as not determined; every compute-optimal fit is
JSON-ready, also on many random small data sets."""

import json
import warnings

import numpy as np
import pytest
from fixtures_scaling import RECORD_STEPS, TRUE, TRUE_A, law_value, sweep_tables
from test_powerlaw import assert_json_ready

from harness import scaling
from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.scaling import HUBER_DELTA
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import JOINT_PARAMS, _joint_loss_grad, fit_joint_law, fit_joint_table
from harness.scaling.loss_to_fid import fit_loss_to_fid
from harness.scaling.summary import compute_optimal_summary


@pytest.fixture(scope="module")
def sweep_law(sweep):
    return fit_joint_table(sweep[0], n_resamples=300)


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
    assert np.allclose(law.predict(val["gflops"], val["images_seen"]), val["val_loss_ema"], rtol=1e-3)
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
    table = {"gflops": d["size"], "images_seen": d["images"], "val_loss_ema": d["metric"], "cell_id": d["cell"]}
    form = str(rng.choice(scaling.FORMS))
    return {
        "joint": lambda: fit_joint_law(d["size"], d["images"], d["metric"], d["cell"], n_resamples=3, seed=seed),
        "isoflop": lambda: isoflop_profiles(table, n_resamples=3, seed=seed),
        "loss_to_fid": lambda: fit_loss_to_fid(d["metric"], fid, d["cell"], n_resamples=3, seed=seed),
        "fit_law": lambda: scaling.fit_law(d["size"] * d["images"], d["metric"], form=form, n_resamples=3, seed=seed),
    }


@pytest.mark.slow
@pytest.mark.parametrize("n_sets", [60, 200])
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
