"""The fitting machinery every law shares: the Huber loss and its gradient, the best-of-starts L-BFGS-B minimiser
with its restart check, the bootstrap over whole cells and the refit of each resample, percentile intervals."""

import json

import numpy as np
import pytest

from harness.scaling import fitting

DELTA = 1e-3


def test_huber_is_quadratic_inside_linear_outside_and_continuous_at_delta():
    r = np.array([-3 * DELTA, -DELTA, -DELTA / 2, 0.0, DELTA / 4, DELTA, 5 * DELTA])
    expected = [DELTA * (3 * DELTA - DELTA / 2), DELTA**2 / 2, DELTA**2 / 8, 0.0, DELTA**2 / 32, DELTA**2 / 2,
                DELTA * (5 * DELTA - DELTA / 2)]
    np.testing.assert_allclose(fitting.huber(r, DELTA), expected, rtol=1e-12)
    eps = 1e-12 * DELTA
    for edge in (-DELTA, DELTA):  # both pieces meet at +-delta
        below, above = fitting.huber(np.array([edge - eps, edge + eps]), DELTA)
        assert below == pytest.approx(above)
    np.testing.assert_array_equal(fitting.huber_grad(r, DELTA), np.clip(r, -DELTA, DELTA))


@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_huber_gradient_matches_finite_differences(delta):
    rng = np.random.default_rng(0)
    r = rng.normal(0, 3 * delta, 2000)
    h = 1e-4 * delta
    r = r[np.abs(np.abs(r) - delta) > 10 * h]  # away from the kinks, where the derivative is not continuous
    numeric = (fitting.huber(r + h, delta) - fitting.huber(r - h, delta)) / (2 * h)
    np.testing.assert_allclose(fitting.huber_grad(r, delta), numeric, rtol=1e-6, atol=1e-9 * delta)


def _bowl(theta):
    """Returns (loss, gradient) of a shifted, stretched quadratic with its minimum 2.0 at (1, -2, 3)."""
    d = np.asarray(theta) - np.array([1.0, -2.0, 3.0])
    scale = np.array([1.0, 10.0, 0.1])
    return 2.0 + float((scale * d**2).sum()), 2 * scale * d


OPTIONS = {"maxiter": 500, "ftol": 1e-12, "gtol": 1e-10}


def test_minimize_finds_a_known_optimum_from_several_starts_and_says_it_converged():
    starts = [np.zeros(3), np.array([10.0, 10.0, -10.0]), np.array([-5.0, 3.0, 40.0])]
    theta, loss, converged = fitting.minimize_from(_bowl, starts, [(None, None)] * 3, OPTIONS)
    np.testing.assert_allclose(theta, [1.0, -2.0, 3.0], atol=1e-5)
    assert loss == pytest.approx(2.0, abs=1e-9)
    assert converged is True and type(loss) is float
    # A bound that cuts the optimum off: the minimum on the bound, and still converged.
    theta, _, converged = fitting.minimize_from(_bowl, starts, [(None, None), (0.0, None), (None, None)], OPTIONS)
    np.testing.assert_allclose(theta, [1.0, 0.0, 3.0], atol=1e-5)
    assert converged is True


def test_minimize_returns_the_best_of_its_starts():
    def double_well(theta):  # minima near x = -1 (loss ~ -0.3) and x = +1 (loss ~ +0.3)
        x = theta[0]
        return (x**2 - 1) ** 2 + 0.3 * x, np.array([4 * x * (x**2 - 1) + 0.3])

    one = fitting.minimize_from(double_well, [np.array([1.5])], [(None, None)], OPTIONS)
    both = fitting.minimize_from(double_well, [np.array([1.5]), np.array([-1.5])], [(None, None)], OPTIONS)
    assert one[0][0] > 0 and both[0][0] < 0 and both[1] < one[1]


def test_minimize_accepts_a_stop_that_a_restart_cannot_improve(monkeypatch):
    # L-BFGS-B reporting failure at the optimum (as at the kinks of a tiny-delta Huber loss): the restart from
    # the point cannot lower the loss, so the fit counts as converged, as a Python bool (JSON-writable).
    real, calls = fitting._lbfgs, []

    def first_fails(*args, **kwargs):
        res = real(*args, **kwargs)
        calls.append(res)
        if len(calls) == 1:
            res.success = False
        return res

    monkeypatch.setattr(fitting, "_lbfgs", first_fails)
    theta, _, converged = fitting.minimize_from(_bowl, [np.zeros(3)], [(None, None)] * 3, OPTIONS)
    assert len(calls) == 2 and converged is True
    np.testing.assert_allclose(theta, [1.0, -2.0, 3.0], atol=1e-5)


def test_minimize_does_not_accept_a_stop_short_of_the_optimum():
    # Two iterations cannot reach the minimum of a stretched bowl; the restart lowers the loss: not converged.
    theta, loss, converged = fitting.minimize_from(_bowl, [np.array([30.0, 30.0, 30.0])], [(None, None)] * 3,
                                           {"maxiter": 2, "ftol": 1e-12, "gtol": 1e-10})
    assert converged is False and loss > 2.0


def test_refit_resamples_starts_from_the_optimum_then_adds_the_fallback():
    theta, fallback = np.array([1.0, 2.0]), np.array([9.0, 9.0])
    calls = []

    def minimize(problem, starts):
        # problem "easy": converges from the optimum; "far": only with the fallback; "stuck": never.
        calls.append((problem, len(starts)))
        ok = problem == "easy" or (problem == "far" and any(np.array_equal(s, fallback) for s in starts))
        return np.array([len(starts), 0.0]), 0.0, ok

    boot, n_failed = fitting.refit_resamples(["easy", None, "far", "stuck", "easy"], minimize, theta, fallback, 2)
    assert n_failed == 2  # the resample that cannot identify the law, and the one that never converges
    np.testing.assert_array_equal(boot, [[1, 0], [2, 0], [1, 0]])
    assert calls == [("easy", 1), ("far", 1), ("far", 2), ("stuck", 1), ("stuck", 2), ("easy", 1)]
    boot, n_failed = fitting.refit_resamples([], minimize, theta, fallback, 2)
    assert boot.shape == (0, 2) and n_failed == 0


def _cells_and_rows():
    """Returns (cell name of each row, rows per cell): 5 cells of 1..4 rows, rows of a cell not adjacent."""
    sizes = {"b": 3, "a": 1, "e": 4, "c": 2, "d": 2}
    cells = np.array([c for c, n in sizes.items() for _ in range(n)])
    return cells[np.random.default_rng(1).permutation(len(cells))], sizes


def test_cell_bootstrap_resamples_whole_cells_reproducibly():
    cells, sizes = _cells_and_rows()
    draws = list(fitting.cell_bootstrap(cells, 200, seed=3))
    assert len(draws) == 200
    for idx in draws:
        drawn = cells[idx]
        # Whole cells, one after the other: each block of a cell's rows is exactly all its rows.
        blocks, i = [], 0
        while i < len(idx):
            c = drawn[i]
            block = idx[i : i + sizes[c]]
            assert sorted(block) == sorted(np.flatnonzero(cells == c)), (c, idx)
            blocks.append(c)
            i += sizes[c]
        assert len(blocks) == len(sizes)  # as many cells drawn as there are
    assert len({tuple(d) for d in draws}) > 100  # resamples differ
    again = list(fitting.cell_bootstrap(cells, 200, seed=3))
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    other = list(fitting.cell_bootstrap(cells, 200, seed=4))
    assert not all(np.array_equal(a, b) for a, b in zip(draws, other))


def test_cell_bootstrap_draw_order_and_weights():
    # The draws every fit's intervals rest on: one rng.integers(0, n, n) per resample, cells in sorted order.
    cells, sizes = _cells_and_rows()
    names = sorted(sizes)
    rng = np.random.default_rng(11)
    rows, weights = fitting.cell_bootstrap(cells, 50, seed=11), fitting.cell_bootstrap(cells, 50, seed=11, weights=True)
    for idx, w in zip(rows, weights):
        expected = rng.integers(0, len(names), len(names))
        assert [cells[i] for i in idx] == [names[k] for k in expected for _ in range(sizes[names[k]])]
        # weights: how many times each row's cell was drawn, the same resample as the row indices.
        assert w.dtype == float and w.shape == cells.shape
        np.testing.assert_array_equal(w, np.bincount(idx, minlength=len(cells)))
    assert list(fitting.cell_bootstrap(cells, 0, seed=0)) == []


def test_percentile_ci_skips_nan_draws_unless_told_and_is_nan_without_draws():
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(400, 3))
    tail = 100 * (1 - 0.9) / 2  # 5, to the last bit as the intervals compute it

    def reference(d):
        return np.percentile(d, [tail, 100 - tail], axis=0)

    lo, hi = fitting.percentile_ci(draws, 0.9)
    np.testing.assert_array_equal([lo, hi], reference(draws))
    with_nan = draws.copy()
    with_nan[:10, 0] = np.nan
    with_nan[:, 2] = np.nan
    lo, hi = fitting.percentile_ci(with_nan, 0.9)
    assert lo[0] == reference(draws[10:, 0])[0] and np.isnan(lo[2]) and np.isnan(hi[2])
    assert lo[1] == reference(draws[:, 1])[0]
    lo, _ = fitting.percentile_ci(with_nan, 0.9, skip_nan=False)
    assert np.isnan(lo[0]) and lo[1] == reference(draws[:, 1])[0]
    lo, hi = fitting.percentile_ci(np.empty((0, 4)), 0.95)
    assert lo.shape == hi.shape == (4,) and np.isnan(lo).all() and np.isnan(hi).all()


def test_with_scatter_multiplies_by_residuals_drawn_with_replacement():
    draws = np.ones((100, 3))
    res = np.log([0.5, 2.0])
    out = fitting.with_scatter(draws, res, seed=1)
    assert set(np.round(out.ravel(), 12)) == {0.5, 2.0}
    np.testing.assert_array_equal(out, fitting.with_scatter(draws, res, seed=1))
    np.testing.assert_array_equal(fitting.with_scatter(draws, [], seed=1), draws)  # no residuals: the draws as they are


def test_to_plain_gives_json_types():
    obj = {"a": np.float64(1.5), 2: (np.int64(3), np.bool_(True)), "b": np.array([1.0, np.nan]), "s": np.str_("x")}
    plain = fitting.to_plain(obj)
    assert plain["2"] == [3, True] and type(plain["2"][0]) is int and type(plain["2"][1]) is bool
    assert type(plain["a"]) is float and type(plain["s"]) is str and np.isnan(plain["b"][1])
    json.dumps(plain)
