"""The fitting machinery every scaling law here shares: the Huber loss (`huber`, `huber_grad`), the best of several
L-BFGS-B runs with its restart check (`minimize_from`), the bootstrap over cells (`cell_bootstrap`) and the refit
of each resample (`refit_resamples`), percentile intervals (`percentile_ci`, `with_scatter` for a prediction
band), and the conversion of results to plain JSON-ready values (`to_plain`).

The laws themselves (what is fitted, in which coordinates, from which starts) live in harness.scaling.powerlaw
(one variable) and harness.scaling.joint (size and images); this module knows nothing of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy import optimize


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Returns the Huber loss of each residual `r`: r^2 / 2 within delta, delta (|r| - delta / 2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    """Returns the derivative of `huber` in each residual: r clipped to [-delta, delta]."""
    return np.clip(r, -delta, delta)


def _lbfgs(loss_grad: Callable, theta0: np.ndarray, bounds: Sequence, options: dict, args: tuple):
    """Returns scipy's OptimizeResult of one L-BFGS-B run of `loss_grad` (returning loss and gradient) from theta0."""
    return optimize.minimize(
        loss_grad, theta0, args=args, jac=True, method="L-BFGS-B", bounds=bounds, options=dict(options)
    )


def minimize_from(
    loss_grad: Callable, starts, bounds: Sequence, options: dict, args: tuple = ()
) -> tuple[np.ndarray, float, bool]:
    """Returns (best theta, its loss, converged) over L-BFGS-B runs of `loss_grad` from each of `starts`.

    `loss_grad(theta, *args)` returns (loss, gradient); `bounds` and `options` (maxiter, ftol, gtol) go to
    scipy's L-BFGS-B as they are. The loss is returned in the units `loss_grad` returns it in. `converged` is
    a Python bool (numpy's would make a fit's to_dict() unwritable as JSON).
    """
    best = min((_lbfgs(loss_grad, t, bounds, options, args) for t in starts), key=lambda r: r.fun)
    converged = bool(best.success)
    if not converged:
        # L-BFGS-B often stops with an abnormal line search at the kinks of a tiny-delta Huber loss while
        # at the optimum; accept the point when a restart from it cannot lower the loss.
        again = _lbfgs(loss_grad, best.x, bounds, options, args)
        converged = bool(again.fun >= best.fun - 1e-8 * max(1.0, abs(best.fun)))
        best = again if again.fun < best.fun else best
    return np.asarray(best.x, dtype=float), float(best.fun), converged


def cell_bootstrap(cells, n_resamples: int, seed: int, weights: bool = False) -> Iterator[np.ndarray]:
    """Yields `n_resamples` bootstrap resamples of whole cells (run folders), never of single rows.

    `cells` names each row's cell. Each resample draws as many cells as there are, with replacement, from
    np.random.default_rng(seed): one rng.integers(0, n_cells, n_cells) per resample, cells numbered in sorted
    order of their names. Every fit's intervals depend on that order of draws; keep it.
    weights=False: yields the resample's row indices, whole cells in the order drawn (a cell drawn twice
    appears twice). weights=True: yields (n_rows,) floats, how many times each row's cell was drawn (0: left
    out), for fits that weight rows rather than repeat them.
    """
    if not n_resamples:
        return  # no bootstrap: the cells are not even read
    uniq, codes = np.unique(np.asarray(cells), return_inverse=True)
    codes = codes.ravel()
    members = None if weights else [np.flatnonzero(codes == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    for _ in range(n_resamples):
        drawn = rng.integers(0, len(uniq), len(uniq))
        if weights:
            yield np.bincount(drawn, minlength=len(uniq))[codes].astype(float)
        else:
            yield np.concatenate([members[i] for i in drawn])


def refit_resamples(
    resamples: Iterable, minimize: Callable, theta: np.ndarray, fallback: np.ndarray, n_params: int
) -> tuple[np.ndarray, int]:
    """Returns (the parameters of the resamples that fitted, (n_ok, n_params); how many failed).

    `resamples` yields each resample's problem, or None for one that cannot identify the law (it counts as
    failed); `minimize(problem, starts)` returns (theta, loss, converged). A resample starts from the full-data
    optimum `theta` (cheap, and usually enough); when that does not converge, from `theta` and `fallback`, a
    start that catches a resample whose optimum lies far away. A resample that converges from neither failed.
    """
    boot, n_failed = [], 0
    for problem in resamples:
        if problem is None:
            n_failed += 1
            continue
        th, _, ok = minimize(problem, [theta])
        if not ok:
            th, _, ok = minimize(problem, [theta, fallback])
        if ok:
            boot.append(th)
        else:
            n_failed += 1
    return np.array(boot, dtype=float).reshape(-1, n_params), n_failed


def percentile_ci(draws, level: float, skip_nan: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Returns (low, high) percentile bounds at `level` over axis 0 of `draws`, arrays of shape draws.shape[1:].

    With `skip_nan`, NaN draws are left out of their column (a column of NaN only gives NaN bounds); without,
    a NaN draw makes its column's bounds NaN. Without any draws both bounds are NaN.
    """
    draws = np.asarray(draws, dtype=float)
    if draws.shape[0] == 0:
        nan = np.full(draws.shape[1:], np.nan)
        return nan, nan
    tail = 100 * (1 - level) / 2
    if not skip_nan or not np.isnan(draws).any():
        # The same numbers as nanpercentile, which goes column by column in Python: a prediction band over
        # hundreds of points is ~100x faster this way.
        lo, hi = np.percentile(draws, [tail, 100 - tail], axis=0)
        return lo, hi
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
        lo, hi = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return lo, hi


def with_scatter(draws, log_residuals, seed: int) -> np.ndarray:
    """Returns `draws` times exp of residuals drawn at random with replacement (a bootstrap prediction band).

    Each draw of a law times one record's scatter about it: the spread of a new measurement, not only of the
    law. Residuals are drawn from np.random.default_rng(seed).
    """
    draws = np.asarray(draws, dtype=float)
    if not draws.size or not len(log_residuals):
        return draws
    rng = np.random.default_rng(seed)
    return draws * np.exp(rng.choice(np.asarray(log_residuals, dtype=float), size=draws.shape))


def to_plain(obj):
    """Returns `obj` with numpy scalars and arrays (also inside dicts, lists, tuples) as plain Python values.

    Tuples become lists, as JSON writes them; NaN stays a float NaN.
    """
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.str_):
        return str(obj)
    return obj
