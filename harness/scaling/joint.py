"""Compute-optimal scaling: which model size and how many training images for a budget, and what they reach.

Two methods of Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", Chinchilla), with
DiT's natural size, forward Gflops per image (Peebles & Xie 2023, section 4), in place of parameters, and a
step from the validation loss to FID:

- joint law (their Approach 3, section 3.3, eq. 2): metric(N, D) = E + A / N^alpha + B / D^beta, N = Gflops,
  D = images seen, fitted in log space, log metric = LSE(e, a - alpha log N, b - beta log D), with a Huber
  loss (delta 1e-3) by L-BFGS from a grid of starts, as Besiroglu et al. 2024 ("Chinchilla Scaling: A
  replication attempt") refit it. They showed that careless fits give intervals far too narrow; the
  intervals here come from a bootstrap over cells (whole run folders), never over single records.
- IsoFLOP profiles (their Approach 2, section 3.2): at each training budget C, each cell's metric where
  it spent C, a parabola in log N, its minimum, and N_opt(C) as a power law of C.
- loss -> FID: FID as a power law of the validation loss (with a floor when the data call for one), so a
  loss predicted for a budget becomes a predicted FID. Liang et al. 2024 ("Scaling Laws for Diffusion
  Transformers") find DiT's pretraining loss a power law of compute and FID following the loss.

Units and conventions: size N in forward Gflops per image (multiply-adds, the paper's); D in images seen;
training compute C in Gflops, C = 3 N D (backward about twice the forward; `harness.core.compute`).
Minimising the joint law subject to 3 N D = C gives (Hoffmann et al. 2022, section 3.3, eq. 4, 3 for their 6):
    N_opt = G (C / 3)^a,  D_opt = G^-1 (C / 3)^b,  a = beta / (alpha + beta),  b = alpha / (alpha + beta),
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import optimize
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.core.vocabulary import metric_label
from harness.results import comparable
from harness.scaling.powerlaw import EXPONENT_BOUNDS, HUBER_DELTA, LEVEL, N_RESAMPLES, ScalingLaw, fit_law, to_plain

JOINT_PARAMS = ("E", "A", "B", "alpha", "beta")
# The joint law has 5 parameters. alpha needs sizes beyond two (with two, alpha and A trade against E),
# beta needs several record points per cell (each cell's curve over images); 3 sizes x 2 records = 6 points.
MIN_SIZES = 3
MIN_RECORDS_PER_CELL = 2
# A log-coefficient (log E, log A, log B) may lie this far below log(smallest value): the term then vanishes.
LOG_COEF_RANGE = 20.0
# A term whose largest value on the data is below this fraction of the smallest measured value is not told
# apart from no term at all; an interval that reaches it is "not determined".
NEGLIGIBLE_FRAC = 0.01
# The grid of starts of the joint fit (Hoffmann et al. 2022, appendix D, use 4,500 points and L-BFGS from each).
# Here the loss is evaluated on the whole grid at once and L-BFGS runs from the best N_LBFGS_STARTS: on the
# synthetic sweeps tried (Besiroglu et al.'s law, DiT-like grids) the best 8 reached the optimum of the best 64.
GRID_FLOOR_FRACS = (0.02, 0.3, 0.6, 0.85, 0.97)  # E as a fraction of the smallest value
GRID_TERM_FRACS = (0.01, 0.05, 0.2, 0.5)  # A and B terms at the reference point, as fractions of the mean
GRID_EXPONENTS = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 2.0)
N_LBFGS_STARTS = 8


def _lse_terms(theta: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Returns the three log-terms (log E, log A - alpha u, log B - beta v), shape (..., 3, n)."""
    theta = np.asarray(theta, dtype=float)
    e, a, b, alpha, beta = (theta[..., i, None] for i in range(5))
    return np.stack(np.broadcast_arrays(e + 0 * u, a - alpha * u, b - beta * v), axis=-2)


def _joint_log_predict(theta: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Returns log metric at u = log(N / N_ref), v = log(D / D_ref); theta batched over leading axes."""
    terms = _lse_terms(theta, u, v)
    top = terms.max(axis=-2)
    return top + np.log(np.exp(terms - top[..., None, :]).sum(axis=-2))


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _joint_loss_grad(theta, u, v, y, w, delta):
    """Returns (weighted mean Huber loss of log residuals / delta, its gradient in theta).

    Dividing by delta and by the total weight keeps the loss of order one (the mean residual in units of
    delta), so L-BFGS's tolerances mean the same for 6 points and for 500. Written out term by term: this runs
    ~100 times per fit and ~10^5 times per bootstrap.
    """
    e, a, b, alpha, beta = theta
    t1 = a - alpha * u
    t2 = b - beta * v
    top = np.maximum(np.maximum(t1, t2), e)
    x0, x1, x2 = np.exp(e - top), np.exp(t1 - top), np.exp(t2 - top)
    s = x0 + x1 + x2
    r = top + np.log(s) - y
    abs_r = np.abs(r)
    scale = 1.0 / (delta * w.sum())
    loss = scale * (w @ np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta)))
    g = (scale * w * np.clip(r, -delta, delta)) / s  # d loss / d pred, times the softmax's 1 / s
    g1, g2 = g @ x1, x2 * g
    return loss, np.array([g @ x0, g1, g2.sum(), -((x1 * u) @ g), -(g2 @ v)])


def _joint_bounds(y: np.ndarray) -> list[tuple[float, float]]:
    # Log-coefficients: at most the largest value (one term cannot exceed the whole), at least LOG_COEF_RANGE
    # below the smallest (the term vanishes). Exponents >= 0: the metric falls with size and with data.
    lo, hi = float(y.min()) - LOG_COEF_RANGE, float(y.max()) + 1.0
    return [(lo, float(y.max())), (lo, hi), (lo, hi), EXPONENT_BOUNDS, EXPONENT_BOUNDS]


def _joint_grid(y: np.ndarray) -> np.ndarray:
    """Returns the grid of starting points (n_starts, 5) in the fit's normalised parameters."""
    lo, mean = float(y.min()), float(np.log(np.exp(y).mean()))
    e = [lo + math.log(f) for f in GRID_FLOOR_FRACS]
    t = [mean + math.log(f) for f in GRID_TERM_FRACS]
    mesh = np.meshgrid(e, t, t, GRID_EXPONENTS, GRID_EXPONENTS, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


SCREEN_CHUNK = 2_000_000  # (starts x points) evaluated at once when screening the grid: ~50 MB of float64


def _screen(grid: np.ndarray, u: np.ndarray, v: np.ndarray, y: np.ndarray, delta: float) -> np.ndarray:
    """Returns the mean Huber loss of each grid start (n_starts,), evaluated vectorised in chunks of starts."""
    step = max(1, SCREEN_CHUNK // max(1, len(y)))
    return np.concatenate(
        [
            _huber(_joint_log_predict(grid[i : i + step], u, v) - y, delta).mean(axis=1)
            for i in range(0, len(grid), step)
        ]
    )


def _joint_lbfgs(theta0, u, v, y, w, delta, bounds):
    return optimize.minimize(
        _joint_loss_grad,
        np.clip(theta0, [b[0] for b in bounds], [b[1] for b in bounds]),
        args=(u, v, y, w, delta),
        jac=True,
        method="L-BFGS-B",
        bounds=bounds,
        options={"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9},
    )


def _joint_minimize(starts, u, v, y, w, delta, bounds) -> tuple[np.ndarray, float, bool]:
    """Returns (best theta, its loss, converged) over L-BFGS runs from `starts`."""
    best = min((_joint_lbfgs(t, u, v, y, w, delta, bounds) for t in starts), key=lambda r: r.fun)
    converged = bool(best.success)
    if not converged:
        # As in scaling._minimize: L-BFGS-B stops at the kinks of a tiny-delta Huber loss while at the optimum;
        # accept the point when a restart from it cannot lower the loss.
        again = _joint_lbfgs(best.x, u, v, y, w, delta, bounds)
        converged = bool(again.fun >= best.fun - 1e-8 * max(1.0, abs(best.fun)))
        best = again if again.fun < best.fun else best
    return np.asarray(best.x, dtype=float), float(best.fun), converged


def _percentile_ci(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Returns (low, high) percentile bounds over axis 0 (NaN when there are no draws)."""
    draws = np.asarray(draws, dtype=float)
    if draws.shape[0] == 0:
        nan = np.full(draws.shape[1:], np.nan)
        return nan, nan
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
        lo, hi = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return lo, hi


def _with_scatter(draws: np.ndarray, log_residuals: np.ndarray, seed: int) -> np.ndarray:
    """Returns `draws` times exp of residuals drawn at random with replacement (a bootstrap prediction band)."""
    draws = np.asarray(draws, dtype=float)
    if not draws.size or not len(log_residuals):
        return draws
    rng = np.random.default_rng(seed)
    return draws * np.exp(rng.choice(np.asarray(log_residuals, dtype=float), size=draws.shape))


def _check_positive(name: str, values: np.ndarray, groups: np.ndarray) -> None:
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        cells = sorted({str(g) for g in groups[bad]})
        raise ValueError(
            f"{name} must be finite and positive for a log-space fit; {int(bad.sum())} bad values in cells "
            f"{cells[:8]}{' ...' if len(cells) > 8 else ''}"
        )


def _check_cells(size: np.ndarray, images: np.ndarray, groups: np.ndarray, what: str) -> None:
    """Raises a ValueError naming cells with one size but several, or with too few records."""
    df = pd.DataFrame({"g": groups, "size": size, "images": images})
    per = df.groupby("g").agg(n_sizes=("size", "nunique"), n_images=("images", "nunique"))
    several = per.index[per["n_sizes"] > 1].tolist()
    if several:
        raise ValueError(f"each cell must have one size; cells with several: {[str(g) for g in several[:8]]}")
    few = per.index[per["n_images"] < MIN_RECORDS_PER_CELL].tolist()
    if few:
        raise ValueError(
            f"{what} needs at least {MIN_RECORDS_PER_CELL} records (distinct images seen) per cell to see "
            f"each cell's curve over data; cells with fewer: {[str(g) for g in few[:8]]}"
            f"{' ...' if len(few) > 8 else ''} (drop them, or wait for more records)"
        )


@dataclass
class JointLaw:
    """A fitted law metric(N, D) = E + A / N^alpha + B / D^beta (N = size, D = images seen), with bootstrap draws.

    The fit works in normalised units u = log(N / size_ref), v = log(D / images_ref); `params` are in the
    data's units (N in `size_name`, D in images).
    """

    theta: np.ndarray  # (log E, log A', log B', alpha, beta), A' and B' at the reference size and images
    size_ref: float
    images_ref: float
    loss: float
    converged: bool
    n_points: int
    n_cells: int
    y_min: float  # log of the smallest value fitted: the scale of "negligible" and of the bounds
    u_range: tuple[float, float]  # range of u and v fitted: a term's largest value on the data
    v_range: tuple[float, float]
    size_name: str = "gflops"
    metric: str = "val_loss"
    label: str = "validation loss"
    boot_thetas: np.ndarray | None = None  # (n_ok, 5)
    n_resamples: int = 0
    n_failed: int = 0
    level: float = LEVEL
    points: pd.DataFrame | None = field(default=None, repr=False)  # size, images, metric, group, predicted

    # ------------------------------------------------------------------ parameters in the data's units
    def _natural(self, theta: np.ndarray) -> np.ndarray:
        """Returns (E, A, B, alpha, beta) in the data's units for normalised thetas (..., 5)."""
        theta = np.asarray(theta, dtype=float)
        e, a, b, alpha, beta = (theta[..., i] for i in range(5))
        return np.stack(
            [
                np.exp(e),
                np.exp(a + alpha * math.log(self.size_ref)),
                np.exp(b + beta * math.log(self.images_ref)),
                alpha,
                beta,
            ],
            axis=-1,
        )

    @property
    def params(self) -> dict[str, float]:
        """Returns {E, A, B, alpha, beta}: metric = E + A / N^alpha + B / D^beta, N in size units, D in images."""
        return {k: float(v) for k, v in zip(JOINT_PARAMS, self._natural(self.theta))}

    @property
    def _boot(self) -> np.ndarray:
        return np.empty((0, 5)) if self.boot_thetas is None else self.boot_thetas

    @property
    def ci(self) -> dict[str, tuple[float, float]]:
        """Returns {parameter: (low, high)}, the bootstrap percentile interval at `level` (NaN without one)."""
        lo, hi = _percentile_ci(self._natural(self._boot).reshape(-1, 5), self.level)
        return {k: (float(l), float(h)) for k, l, h in zip(JOINT_PARAMS, lo, hi)}

    def _at_bounds(self, thetas: np.ndarray) -> dict[str, np.ndarray]:
        """Returns, per parameter, which of `thetas` (n, 5) sit at a bound of the fit or leave a term negligible."""
        thetas = np.asarray(thetas, dtype=float).reshape(-1, 5)
        e, a, b, alpha, beta = thetas.T
        b_lo, b_hi = EXPONENT_BOUNDS
        tol = 1e-3 * (b_hi - b_lo)
        # Each term's largest value on the data, against the smallest value measured.
        neg = math.log(NEGLIGIBLE_FRAC) + self.y_min
        size_term = a - alpha * self.u_range[0]
        data_term = b - beta * self.v_range[0]
        alpha_edge = (alpha <= b_lo + tol) | (alpha >= b_hi - tol)
        beta_edge = (beta <= b_lo + tol) | (beta >= b_hi - tol)
        size_gone = size_term < neg
        data_gone = data_term < neg
        # An exponent at 0 turns its term into a constant that trades against E.
        const = (alpha <= b_lo + tol) | (beta <= b_lo + tol)
        return {
            "E": (e < neg) | const,
            "A": size_gone | alpha_edge,
            "B": data_gone | beta_edge,
            "alpha": size_gone | alpha_edge,
            "beta": data_gone | beta_edge,
        }

    @property
    def determined(self) -> dict[str, bool]:
        """Returns {parameter: bool}: False when the fit, or the bootstrap interval, reaches a bound of the fit.

        Reaching a bound: an exponent at 0 or at its upper bound, or a term (E, A / N^alpha, B / D^beta) below
        NEGLIGIBLE_FRAC of the smallest value everywhere on the data. The interval "reaches" it when more
        than its tail, (1 - level) / 2 of the resamples, do.
        """
        point = self._at_bounds(self.theta)
        boot = self._at_bounds(self._boot) if len(self._boot) else None
        tail = (1 - self.level) / 2
        out = {}
        for k in JOINT_PARAMS:
            bad = bool(point[k][0])
            if boot is not None:
                bad |= bool(boot[k].mean() > tail)
            out[k] = not bad
        return out

    @property
    def optimum_determined(self) -> bool:
        """Returns True when A, B, alpha and beta are all determined: the compute-optimal split is then defined."""
        d = self.determined
        return all(d[k] for k in ("A", "B", "alpha", "beta"))

    # ------------------------------------------------------------------ predictions
    def _predict(self, thetas, size, images) -> np.ndarray:
        u = np.log(np.asarray(size, dtype=float) / self.size_ref)
        v = np.log(np.asarray(images, dtype=float) / self.images_ref)
        u, v = np.broadcast_arrays(np.atleast_1d(u), np.atleast_1d(v))
        return np.exp(_joint_log_predict(thetas, u.ravel(), v.ravel())).reshape(np.shape(thetas)[:-1] + u.shape)

    def predict(self, size, images) -> np.ndarray:
        """Returns the fitted metric at `size` (size units) and `images` (images seen), broadcast together."""
        out = self._predict(self.theta, size, images)
        return out.reshape(np.broadcast_shapes(np.shape(size), np.shape(images)))

    def predict_interval(self, size, images) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high) bootstrap percentile bands of the metric at (`size`, `images`)."""
        shape = np.broadcast_shapes(np.shape(size), np.shape(images))
        lo, hi = _percentile_ci(self.draws(size, images), self.level)
        return lo.reshape(shape), hi.reshape(shape)

    def draws(self, size, images) -> np.ndarray:
        """Returns the bootstrap draws (n_ok, m) of the law at the m points (`size`, `images`), flattened;
        (0, m) when no resample succeeded (the bands are then NaN)."""
        m = int(np.prod(np.broadcast_shapes(np.shape(size), np.shape(images))))
        return self._predict(self._boot, size, images).reshape(len(self._boot), m)

    @property
    def log_residuals(self) -> np.ndarray:
        """Returns log(measured / fitted) at the fitted points: the scatter of one record about the law."""
        return np.log(self.points["metric"].to_numpy(float) / self.points["predicted"].to_numpy(float))

    def prediction_interval(self, size, images, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high), flattened: where one new record at (`size`, `images`) should fall at `level`.

        Each bootstrap draw of the law times the exp of a residual of the fit drawn at random: the law's
        uncertainty and one record's scatter about it.
        """
        return _percentile_ci(_with_scatter(self.draws(size, images), self.log_residuals, seed), self.level)

    # ------------------------------------------------------------------ compute-optimal allocation
    @staticmethod
    def _optimal_natural(nat: np.ndarray, compute) -> tuple[np.ndarray, np.ndarray]:
        """Returns (N_opt, D_opt), shapes (..., len(compute)), for natural parameters nat (..., 5)."""
        c = np.atleast_1d(np.asarray(compute, dtype=float)) / FORWARD_BACKWARD_FACTOR
        A, B, alpha, beta = (nat[..., i, None] for i in (1, 2, 3, 4))
        with np.errstate(all="ignore"):
            s = alpha + beta
            log_g = (np.log(alpha * A) - np.log(beta * B)) / s
            log_n = log_g + beta / s * np.log(c)
            size = np.exp(log_n)
            images = c / size
        size = np.where(np.isfinite(size) & (size > 0), size, np.nan)
        images = np.where(np.isfinite(images) & (images > 0), images, np.nan)
        return size, images

    def optimal(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """Returns (size, images) minimising the law subject to 3 x size x images = `compute` (Gflops).

        Size in the size units (forward Gflops per image), images seen; arrays of the shape of `compute`.
        """
        size, images = self._optimal_natural(self._natural(self.theta), compute)
        shape = np.shape(compute)
        return size.reshape(shape), images.reshape(shape)

    def optimal_draws(self, compute) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns the bootstrap draws (n_ok, len(compute)) of (size_opt, images_opt, metric at the optimum)."""
        nat = self._natural(self._boot)
        size, images = self._optimal_natural(nat, compute)
        E, A, B, alpha, beta = (nat[:, i, None] for i in range(5))
        with np.errstate(all="ignore"):
            metric = E + A * size**-alpha + B * images**-beta
        return size, images, metric

    def optimal_interval(self, compute) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Returns {"size", "images", "metric"}: (low, high) bootstrap percentile bands at the optimum of `compute`."""
        draws = self.optimal_draws(compute)
        return {k: _percentile_ci(d, self.level) for k, d in zip(("size", "images", "metric"), draws)}

    def predict_optimal(self, compute) -> np.ndarray:
        """Returns the fitted metric at the compute-optimal (size, images) of `compute` (Gflops)."""
        size, images = self.optimal(compute)
        return self.predict(size, images)

    @property
    def allocation_exponents(self) -> tuple[float, float]:
        """Returns (a, b) of N_opt ~ C^a, D_opt ~ C^b: a = beta / (alpha + beta), b = alpha / (alpha + beta) = 1 - a."""
        alpha, beta = float(self.theta[3]), float(self.theta[4])
        s = alpha + beta
        return (beta / s, alpha / s) if s > 0 else (math.nan, math.nan)

    @property
    def allocation_exponents_ci(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Returns ((a_low, a_high), (b_low, b_high)), bootstrap percentile intervals of the allocation exponents."""
        alpha, beta = self._boot[:, 3], self._boot[:, 4]
        with np.errstate(all="ignore"):
            a = beta / (alpha + beta)
        lo, hi = _percentile_ci(a, self.level)
        return (float(lo), float(hi)), (float(1 - hi), float(1 - lo))

    # ------------------------------------------------------------------ reporting
    def _fmt(self, name: str, fmt: str) -> str:
        if not self.determined[name]:
            return "not determined"
        return format(self.params[name], fmt)

    def describe(self) -> str:
        """Returns the law in one line; a parameter the data do not determine reads "not determined"."""
        d = self.determined
        pct = f"{100 * self.level:g}%"
        s = (
            f"{self.label} = E + A / {self.size_name}^alpha + B / images^beta; E {self._fmt('E', '.4g')}, "
            f"A {self._fmt('A', '.4g')}, B {self._fmt('B', '.4g')}, alpha {self._fmt('alpha', '.3f')}, "
            f"beta {self._fmt('beta', '.3f')}"
        )
        ci = self.ci
        shown = [k for k in ("alpha", "beta", "E") if d[k] and not math.isnan(ci[k][0])]
        if shown:
            s += f"; {pct} CI " + ", ".join(f"{k} [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" for k in shown)
        if self.optimum_determined:
            (a_lo, a_hi), _ = self.allocation_exponents_ci
            a = self.allocation_exponents[0]
            s += f"; N_opt ~ C^{a:.2f}" + ("" if math.isnan(a_lo) else f" [{a_lo:.2f}, {a_hi:.2f}]")
        else:
            s += "; compute-optimal allocation not determined"
        s += f"; {self.n_points} points, {self.n_cells} cells"
        if not self.converged:
            s += " (WARNING: fit did not converge)"
        return s

    def to_dict(self) -> dict:
        """Returns the fit as plain JSON-ready values; undetermined parameters are None with determined False."""
        d = self.determined
        params, ci = self.params, self.ci
        (a_lo, a_hi), (b_lo, b_hi) = self.allocation_exponents_ci
        a, b = self.allocation_exponents
        ok = self.optimum_determined
        out = {
            "law": "E + A / N^alpha + B / D^beta",
            "size": self.size_name,
            "data": "images_seen",
            "metric": self.metric,
            "label": self.label,
            "params": {k: (params[k] if d[k] else None) for k in JOINT_PARAMS},
            "ci": {k: (list(ci[k]) if d[k] else None) for k in JOINT_PARAMS},
            "determined": d,
            "allocation_exponents": [a, b] if ok else None,
            "allocation_exponents_ci": [[a_lo, a_hi], [b_lo, b_hi]] if ok else None,
            "size_ref": self.size_ref,
            "images_ref": self.images_ref,
            "level": self.level,
            "huber_delta": HUBER_DELTA,
            "loss": self.loss,
            "converged": self.converged,
            "n_points": self.n_points,
            "n_cells": self.n_cells,
            "n_resamples": self.n_resamples,
            "n_failed": self.n_failed,
            "description": self.describe(),
        }
        return to_plain(out)


def _as_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


# Important: L-BFGS-B calls BLAS on 5-vectors thousands of times per bootstrap; one thread (see scaling.fit_law).
@threadpool_limits.wrap(limits=1)
def fit_joint_law(
    size,
    images,
    metric,
    groups=None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    size_name: str = "gflops",
    level: float = LEVEL,
    delta: float = HUBER_DELTA,
    metric_name: str = "val_loss",
    label: str = "validation loss",
) -> JointLaw:
    """Returns the joint law metric = E + A / size^alpha + B / images^beta fitted to every point, bootstrapped.

    `size` in forward Gflops per image (or `size_name`'s units), `images` seen, `metric` > 0; `groups` names
    each point's cell (default: one cell per distinct size). The bootstrap resamples cells with replacement
    (`n_resamples` times); a resample with fewer than MIN_SIZES sizes or images values counts as failed.
    ValueError when the data cannot determine the law (see MIN_SIZES, MIN_RECORDS_PER_CELL).
    """
    size, images, y_lin = _as_1d("size", size), _as_1d("images", images), _as_1d("metric", metric)
    if not (len(size) == len(images) == len(y_lin)):
        raise ValueError(f"size, images and metric must have one length, got {len(size)}, {len(images)}, {len(y_lin)}")
    groups = size.astype(str) if groups is None else np.asarray(groups).astype(str)
    if len(groups) != len(size):
        raise ValueError(f"groups must have one entry per point, got {len(groups)} for {len(size)} points")
    for name, vals in (("size", size), ("images", images), (metric_name, y_lin)):
        _check_positive(name, vals, groups)
    _check_cells(size, images, groups, "the joint law")
    n_sizes = len(np.unique(size))
    if n_sizes < MIN_SIZES:
        raise ValueError(
            f"the joint law has 5 parameters and needs at least {MIN_SIZES} distinct sizes, got {n_sizes} "
            f"({sorted(np.unique(size).tolist())})"
        )

    size_ref, images_ref = float(np.exp(np.log(size).mean())), float(np.exp(np.log(images).mean()))
    u, v, y = np.log(size / size_ref), np.log(images / images_ref), np.log(y_lin)
    bounds = _joint_bounds(y)
    w = np.ones(len(y))
    grid = _joint_grid(y)
    starts = grid[np.argsort(_screen(grid, u, v, y, delta))[:N_LBFGS_STARTS]]
    theta, loss, converged = _joint_minimize(starts, u, v, y, w, delta, bounds)
    if not converged:
        warnings.warn(f"joint law fit did not converge (loss {loss:.3g})", stacklevel=2)

    uniq, inverse = np.unique(groups, return_inverse=True)
    boot, n_failed = [], 0
    if n_resamples:
        rng = np.random.default_rng(seed)
        fallback = starts[1] if len(starts) > 1 else starts[0]
        for _ in range(n_resamples):
            counts = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))
            wi = counts[inverse].astype(float)
            used = wi > 0
            if len(np.unique(u[used])) < MIN_SIZES or len(np.unique(v[used])) < MIN_SIZES:
                n_failed += 1  # too few sizes or data points to identify the law
                continue
            # Resamples start from the full-data optimum (cheap); the second-best grid start catches a resample
            # whose optimum lies elsewhere.
            th, _, ok = _joint_minimize([theta], u[used], v[used], y[used], wi[used], delta, bounds)
            if not ok:
                th, _, ok = _joint_minimize([theta, fallback], u[used], v[used], y[used], wi[used], delta, bounds)
            if ok:
                boot.append(th)
            else:
                n_failed += 1
    law = JointLaw(
        theta=theta,
        size_ref=size_ref,
        images_ref=images_ref,
        loss=loss,
        converged=converged,
        n_points=len(y),
        n_cells=len(uniq),
        y_min=float(y.min()),
        u_range=(float(u.min()), float(u.max())),
        v_range=(float(v.min()), float(v.max())),
        size_name=size_name,
        metric=metric_name,
        label=label,
        boot_thetas=np.array(boot, dtype=float).reshape(-1, 5) if n_resamples else None,
        n_resamples=n_resamples,
        n_failed=n_failed,
        level=level,
    )
    law.points = pd.DataFrame({"size": size, "images": images, "metric": y_lin, "group": groups})
    law.points["predicted"] = law.predict(size, images)
    return law


# ---------------------------------------------------------------------------------------------------------
# Tables: which rows may share one law
# ---------------------------------------------------------------------------------------------------------
# Columns whose values must agree for points to share one law: another data set or another objective is
# another loss surface (e.g. a flow-matching loss is not a DDPM loss), another parametrization another training
# recipe. An absent column counts as one value.
MIX_COLUMNS = ("data", "objective", "parametrization")
VALIDATION_COLUMNS = ("cell_id", "gflops", "images_seen")


def _one_setting(rows: pd.DataFrame, allow_mixed: bool, what: str) -> None:
    """Raises a ValueError when `rows` mix data sets or objectives, unless `allow_mixed`."""
    if allow_mixed:
        return
    for col in MIX_COLUMNS:
        if col in rows:
            values = sorted(str(v) for v in rows[col].dropna().unique())
            if len(values) > 1:
                by = rows.groupby(col)["cell_id"].unique().map(lambda c: [str(x) for x in c[:3]]).to_dict()
                raise ValueError(
                    f"refusing to fit one {what} across {col} values {values} (another {col} is another loss "
                    f"surface); cells by {col}: {by}. Select one, e.g. df[df.{col} == {values[0]!r}], "
                    f"or pass allow_mixed=True"
                )


def validation_points(
    val_df: pd.DataFrame,
    metric: str = "val_loss",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
) -> pd.DataFrame:
    """Returns the validation table's rows to fit: columns cell_id, gflops, images_seen, `metric`, one row per
    (cell, images seen), sorted. ValueError naming the cells with missing or non-positive values.

    Only `cond` cells are used when the table has a `cond` column (cond=None keeps all); rows of several
    data sets or objectives are refused unless `allow_mixed`.
    """
    if not isinstance(val_df, pd.DataFrame):
        raise ValueError(f"expected a validation table (pandas DataFrame), got {type(val_df).__name__}")
    missing = [c for c in (*VALIDATION_COLUMNS, metric) if c not in val_df.columns]
    if missing:
        raise ValueError(f"the validation table lacks columns {missing}; it has {list(val_df.columns)}")
    rows = val_df
    if cond is not None and "cond" in rows:
        rows = rows[rows["cond"] == cond]
        if rows.empty:
            raise ValueError(f"no row with cond={cond!r}; conds present: {sorted(val_df['cond'].dropna().unique())}")
    if rows.empty:
        raise ValueError("the validation table has no rows")
    _one_setting(rows, allow_mixed, f"law of {metric}")
    for col in ("gflops", "images_seen", metric):
        v = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            cells = sorted(rows.loc[bad, "cell_id"].astype(str).unique())
            raise ValueError(
                f"{col} must be finite and positive; missing or non-positive in {int(bad.sum())} rows of cells "
                f"{cells[:8]}{' ...' if len(cells) > 8 else ''} (drop those cells, or fill the values)"
            )
    keep = ["cell_id", "gflops", "images_seen", metric]
    # A record logged twice (e.g. around a resume) counts once: the mean of its values.
    out = rows[keep].groupby(["cell_id", "gflops", "images_seen"], as_index=False)[metric].mean()
    return out.sort_values(["gflops", "cell_id", "images_seen"]).reset_index(drop=True)


def fit_joint_table(
    val_df: pd.DataFrame,
    metric: str = "val_loss",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> JointLaw:
    """Returns `fit_joint_law` of `metric` against (gflops, images_seen) over the validation table's cells."""
    rows = validation_points(val_df, metric, cond, allow_mixed)
    return fit_joint_law(
        rows["gflops"].to_numpy(),
        rows["images_seen"].to_numpy(),
        rows[metric].to_numpy(),
        groups=rows["cell_id"].to_numpy(),
        n_resamples=n_resamples,
        seed=seed,
        level=level,
        metric_name=metric,
        label=metric_label(metric),
    )


# ---------------------------------------------------------------------------------------------------------
# IsoFLOP profiles (Hoffmann et al. 2022, section 3.2, Approach 2)
# ---------------------------------------------------------------------------------------------------------
MIN_ISOFLOP_BUDGETS = 3  # a line through two minima always fits; a third checks the power law at all
N_DEFAULT_BUDGETS = 6
N_CANDIDATE_BUDGETS = 60  # the grid on which default budgets look for MIN_SIZES sizes


def _cell_curves(rows: pd.DataFrame, metric: str) -> list[tuple[str, float, np.ndarray, np.ndarray]]:
    """Returns per cell (cell_id, size, log images sorted, metric) from `validation_points` rows."""
    return [
        (str(cid), float(g["gflops"].iloc[0]), np.log(g["images_seen"].to_numpy(float)), g[metric].to_numpy(float))
        for cid, g in rows.groupby("cell_id", sort=False)
    ]


def _at_budgets(curves, budgets: np.ndarray) -> np.ndarray:
    """Returns (n_cells, n_budgets): each cell's metric where it spent each budget, linear in log images
    between its records; NaN where the budget falls before its first record or after its last (no extrapolation).
    """
    out = np.full((len(curves), len(budgets)), np.nan)
    for i, (_, size, log_images, values) in enumerate(curves):
        target = np.log(budgets / (FORWARD_BACKWARD_FACTOR * size))
        inside = (target >= log_images[0]) & (target <= log_images[-1])
        out[i, inside] = np.interp(target[inside], log_images, values)
    return out


def _default_budgets(curves) -> np.ndarray:
    """Returns N_DEFAULT_BUDGETS log-spaced budgets (Gflops) over the range where MIN_SIZES sizes have records."""
    lo = min(FORWARD_BACKWARD_FACTOR * s * math.exp(li[0]) for _, s, li, _ in curves)
    hi = max(FORWARD_BACKWARD_FACTOR * s * math.exp(li[-1]) for _, s, li, _ in curves)
    grid = np.geomspace(lo, hi, N_CANDIDATE_BUDGETS)
    covered = ~np.isnan(_at_budgets(curves, grid))
    sizes = np.array([s for _, s, _, _ in curves])
    n_sizes = np.array([len(np.unique(sizes[covered[:, j]])) for j in range(len(grid))])
    ok = np.flatnonzero(n_sizes >= MIN_SIZES)
    if not len(ok):
        raise ValueError(
            f"no training budget is reached by {MIN_SIZES} or more distinct sizes (most at any budget: "
            f"{int(n_sizes.max())}); IsoFLOP profiles need cells whose record ranges overlap in compute"
        )
    return np.geomspace(grid[ok[0]], grid[ok[-1]], N_DEFAULT_BUDGETS)


def _parabola_minimum(x: np.ndarray, y: np.ndarray, w: np.ndarray | None = None):
    """Returns (coefficients (c0, c1, c2) of y = c0 + c1 x + c2 x^2, x_min or None, reason or None)."""
    c2, c1, c0 = np.polyfit(x, y, 2, w=None if w is None else np.sqrt(w))
    if c2 <= 0:
        return (c0, c1, c2), None, "the parabola opens downwards: no minimum"
    x_min = -c1 / (2 * c2)
    if x_min < x.min():
        return (
            (c0, c1, c2),
            None,
            (
                f"the parabola's minimum ({math.exp(x_min):.3g}) lies below the smallest size trained at this "
                f"budget ({math.exp(x.min()):.3g}): not a minimum of the data"
            ),
        )
    if x_min > x.max():
        return (
            (c0, c1, c2),
            None,
            (
                f"the parabola's minimum ({math.exp(x_min):.3g}) lies above the largest size trained at this "
                f"budget ({math.exp(x.max()):.3g}): not a minimum of the data"
            ),
        )
    return (c0, c1, c2), x_min, None


def _batched_minima(x: np.ndarray, y: np.ndarray, present: np.ndarray, weights: np.ndarray, size_ids: np.ndarray):
    """Returns (log size at the minimum or NaN, shape (R,)) of weighted parabolas, one per row of `weights`.

    x, y: (n_cells,) log size and metric at one budget; present: cells with a value there; weights: (R, n_cells)
    resample counts. A row without MIN_SIZES distinct sizes, a downward parabola or a minimum outside the sizes
    of that row gives NaN, as `_parabola_minimum` decides for the full data.
    """
    w = weights * present  # (R, n)
    xs, ys = np.where(present, x, 0.0), np.where(present, y, 0.0)
    s = np.stack([w @ xs**p for p in range(5)], axis=-1)  # (R, 5): sum w x^p
    t = np.stack([w @ (xs**p * ys) for p in range(3)], axis=-1)  # (R, 3): sum w x^p y
    m = np.stack([s[:, 0:3], s[:, 1:4], s[:, 2:5]], axis=1)  # normal equations (R, 3, 3)
    uniq = np.unique(size_ids[present])
    n_sizes = sum(((w[:, size_ids == k]).sum(axis=1) > 0).astype(int) for k in uniq) if len(uniq) else 0
    ok = np.asarray(n_sizes) >= MIN_SIZES
    out = np.full(len(weights), np.nan)
    if not ok.any():
        return out
    with np.errstate(all="ignore"):
        c = np.linalg.solve(m[ok] + 1e-12 * np.eye(3), t[ok][..., None])[..., 0]  # (k, 3): c0, c1, c2
        x_min = -c[:, 1] / (2 * c[:, 2])
    used = w[ok] > 0
    lo = np.where(used, x, np.inf).min(axis=1)
    hi = np.where(used, x, -np.inf).max(axis=1)
    good = (c[:, 2] > 0) & (x_min >= lo) & (x_min <= hi)
    out[np.flatnonzero(ok)[good]] = x_min[good]
    return out


def _line_fits(log_c: np.ndarray, log_n: np.ndarray) -> np.ndarray:
    """Returns (R, 2) (intercept, slope) of least-squares lines log_n = i + s log_c per row; NaN entries are
    skipped; rows with fewer than MIN_ISOFLOP_BUDGETS values give NaN."""
    ok = np.isfinite(log_n)
    n = ok.sum(axis=1)
    xc = np.where(ok, log_c, 0.0)
    yc = np.where(ok, log_n, 0.0)
    with np.errstate(all="ignore"):
        mx, my = xc.sum(1) / n, yc.sum(1) / n
        sxx = (np.where(ok, (log_c - mx[:, None]) ** 2, 0.0)).sum(1)
        sxy = (np.where(ok, (log_c - mx[:, None]) * (log_n - my[:, None]), 0.0)).sum(1)
        slope = sxy / sxx
        icept = my - slope * mx
    bad = n < MIN_ISOFLOP_BUDGETS
    slope[bad], icept[bad] = np.nan, np.nan
    return np.stack([icept, slope], axis=1)


@dataclass
class IsoFlopResult:
    """IsoFLOP profiles: per budget the cells' metric against size, a parabola in log size, its minimum;
    and size_opt(C) = k C^a fitted to the minima, with bootstrap draws over cells."""

    profiles: list[dict]  # per budget: budget, points (DataFrame), coefficients, size_opt, metric_opt, reason
    metric: str
    label: str
    size_name: str = "gflops"
    coefficient: float = math.nan  # k of size_opt = k C^a (C in Gflops of training compute)
    exponent: float = math.nan  # a
    boot: np.ndarray | None = None  # (n_ok, 2): (log k, a) of the resamples that fitted
    n_resamples: int = 0
    n_failed: int = 0
    level: float = LEVEL
    notes: list[str] = field(default_factory=list)

    @property
    def budgets(self) -> np.ndarray:
        return np.array([p["budget"] for p in self.profiles], dtype=float)

    @property
    def minima(self) -> list[dict]:
        """Returns the profiles whose parabola has a minimum inside the sizes trained at that budget."""
        return [p for p in self.profiles if p["size_opt"] is not None]

    @property
    def _boot(self) -> np.ndarray:
        return np.empty((0, 2)) if self.boot is None else self.boot

    @property
    def determined(self) -> bool:
        """Returns True when the power law was fitted and at most the interval's tail of resamples failed."""
        if not math.isfinite(self.exponent):
            return False
        if self.n_resamples:
            return self.n_failed / self.n_resamples <= (1 - self.level) / 2
        return True

    @property
    def exponent_ci(self) -> tuple[float, float]:
        """Returns the bootstrap percentile interval of a (size_opt ~ C^a)."""
        lo, hi = _percentile_ci(self._boot[:, 1], self.level)
        return float(lo), float(hi)

    def size_opt(self, compute) -> np.ndarray:
        """Returns k C^a, the compute-optimal size (size units) at training compute `compute` (Gflops)."""
        return self.coefficient * np.asarray(compute, dtype=float) ** self.exponent

    def size_opt_interval(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high) bootstrap percentile bands of size_opt at `compute` (Gflops)."""
        c = np.atleast_1d(np.asarray(compute, dtype=float))
        draws = np.exp(self._boot[:, :1] + self._boot[:, 1:2] * np.log(c))
        lo, hi = _percentile_ci(draws, self.level)
        return lo.reshape(np.shape(compute)), hi.reshape(np.shape(compute))

    def images_opt(self, compute) -> np.ndarray:
        """Returns the images seen at size_opt for `compute` (Gflops): C / (3 size_opt)."""
        return np.asarray(compute, dtype=float) / (FORWARD_BACKWARD_FACTOR * self.size_opt(compute))

    def describe(self) -> str:
        """Returns the result in one line; an exponent the data do not determine reads "not determined"."""
        n_min = len(self.minima)
        s = f"IsoFLOP ({self.label}): {len(self.profiles)} budgets, {n_min} with a minimum inside the trained sizes"
        if not self.determined:
            return s + "; size_opt ~ C^a not determined"
        lo, hi = self.exponent_ci
        s += f"; size_opt = {self.coefficient:.3g} C^{self.exponent:.3f}"
        if not math.isnan(lo):
            s += f", a {100 * self.level:g}% CI [{lo:.3f}, {hi:.3f}]"
        return s

    def to_dict(self) -> dict:
        """Returns the profiles, parabolas, minima and the power law as plain JSON-ready values."""
        ok = self.determined
        lo, hi = self.exponent_ci
        out = {
            "metric": self.metric,
            "label": self.label,
            "size": self.size_name,
            "parabola": "metric = c0 + c1 x + c2 x^2, x = ln(size)",
            "profiles": [
                {
                    "budget_gflops": p["budget"],
                    "points": p["points"][["cell_id", "size", "images", "metric"]].to_dict("records"),
                    "coefficients": None if p["coefficients"] is None else list(p["coefficients"]),
                    "size_opt": p["size_opt"],
                    "metric_opt": p["metric_opt"],
                    "reason": p["reason"],
                }
                for p in self.profiles
            ],
            "determined": ok,
            "coefficient": self.coefficient if ok else None,
            "exponent": self.exponent if ok else None,
            "exponent_ci": [lo, hi] if ok else None,
            "level": self.level,
            "n_resamples": self.n_resamples,
            "n_failed": self.n_failed,
            "notes": list(self.notes),
            "description": self.describe(),
        }
        return to_plain(out)


def _as_table(data, metric: str) -> pd.DataFrame:
    """Returns `data` as a validation-table-like DataFrame: a DataFrame as is, or a mapping of arrays
    with keys gflops (or size), images_seen (or images), `metric`, cell_id (default: one cell per size)."""
    if isinstance(data, pd.DataFrame):
        return data
    if not hasattr(data, "keys"):
        raise ValueError(f"expected a DataFrame or a mapping of arrays, got {type(data).__name__}")
    d = dict(data)
    if "size" in d:
        d.setdefault("gflops", d.pop("size"))
    if "images" in d:
        d.setdefault("images_seen", d.pop("images"))
    df = pd.DataFrame(d)
    if "cell_id" not in df and "gflops" in df:
        df["cell_id"] = df["gflops"].astype(str)
    return df


def isoflop_profiles(
    data,
    budgets=None,
    metric: str = "val_loss",
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
) -> IsoFlopResult:
    """Returns the IsoFLOP profiles (Hoffmann et al. 2022, Approach 2) of `metric` at training `budgets` (Gflops).

    `data`: a validation table (see `validation_points`) or a mapping of arrays (gflops, images_seen, metric,
    cell_id). At budget C a cell contributes its metric at images = C / (3 gflops), linear in log images between
    its records (none beyond its first or last record). A parabola in ln(size) per budget with at least
    MIN_SIZES sizes; its minimum counts only inside the sizes at that budget. size_opt(C) = k C^a is a
    least-squares line in log-log through the minima (at least MIN_ISOFLOP_BUDGETS), bootstrapped over cells.
    Default budgets: N_DEFAULT_BUDGETS log-spaced over the range where MIN_SIZES sizes have records.
    """
    rows = validation_points(_as_table(data, metric), metric, cond, allow_mixed)
    _check_cells(rows["gflops"].to_numpy(), rows["images_seen"].to_numpy(), rows["cell_id"].to_numpy(), "IsoFLOP")
    curves = _cell_curves(rows, metric)
    if len({s for _, s, _, _ in curves}) < MIN_SIZES:
        raise ValueError(
            f"IsoFLOP profiles need at least {MIN_SIZES} distinct sizes for a parabola, got "
            f"{sorted({s for _, s, _, _ in curves})}"
        )
    if budgets is None:
        budgets = _default_budgets(curves)
    budgets = np.sort(np.atleast_1d(np.asarray(budgets, dtype=float)))
    if not (np.isfinite(budgets).all() and (budgets > 0).all()):
        raise ValueError(f"budgets must be finite and positive (Gflops), got {budgets.tolist()}")
    values = _at_budgets(curves, budgets)  # (n_cells, n_budgets)
    cells = [c[0] for c in curves]
    sizes = np.array([c[1] for c in curves])
    x = np.log(sizes)
    profiles = []
    for j, c in enumerate(budgets):
        have = np.isfinite(values[:, j])
        pts = pd.DataFrame(
            {
                "cell_id": [cells[i] for i in np.flatnonzero(have)],
                "size": sizes[have],
                "images": c / (FORWARD_BACKWARD_FACTOR * sizes[have]),
                "metric": values[have, j],
            }
        )
        prof = {"budget": float(c), "points": pts, "coefficients": None, "size_opt": None, "metric_opt": None}
        n_sizes = len(np.unique(sizes[have]))
        if n_sizes < MIN_SIZES:
            prof["reason"] = f"{n_sizes} distinct sizes have records at this budget; a parabola needs {MIN_SIZES}"
        else:
            coef, x_min, reason = _parabola_minimum(x[have], values[have, j])
            prof["coefficients"], prof["reason"] = tuple(float(v) for v in coef), reason
            if x_min is not None:
                prof["size_opt"] = float(math.exp(x_min))
                prof["metric_opt"] = float(coef[0] + coef[1] * x_min + coef[2] * x_min**2)
        profiles.append(prof)

    result = IsoFlopResult(profiles=profiles, metric=metric, label=metric_label(metric), level=level)
    ok = [p for p in profiles if p["size_opt"] is not None]
    if len(ok) < MIN_ISOFLOP_BUDGETS:
        result.notes.append(
            f"size_opt(C) not fitted: {len(ok)} of {len(budgets)} budgets have a minimum inside the trained "
            f"sizes; the power law needs {MIN_ISOFLOP_BUDGETS}"
        )
        return result
    log_c = np.log([p["budget"] for p in ok])
    icept, slope = _line_fits(log_c[None, :], np.log([p["size_opt"] for p in ok])[None, :])[0]
    result.coefficient, result.exponent = float(math.exp(icept)), float(slope)

    if n_resamples:
        rng = np.random.default_rng(seed)
        size_ids = np.unique(sizes, return_inverse=True)[1]
        weights = np.stack(
            [np.bincount(rng.integers(0, len(cells), len(cells)), minlength=len(cells)) for _ in range(n_resamples)]
        ).astype(float)
        log_min = np.stack(
            [
                _batched_minima(x, np.nan_to_num(values[:, j]), np.isfinite(values[:, j]), weights, size_ids)
                for j in range(len(budgets))
            ],
            axis=1,
        )  # (R, n_budgets)
        fits = _line_fits(np.log(budgets)[None, :], log_min)
        good = np.isfinite(fits).all(axis=1)
        result.boot = fits[good]
        result.n_resamples, result.n_failed = n_resamples, int((~good).sum())
        if not result.determined:
            result.notes.append(
                f"size_opt ~ C^a not determined: {result.n_failed} of {n_resamples} resamples of cells leave "
                f"fewer than {MIN_ISOFLOP_BUDGETS} budgets with a minimum inside the trained sizes"
            )
    return result


# ---------------------------------------------------------------------------------------------------------
# Validation loss -> FID
# ---------------------------------------------------------------------------------------------------------
# A diffusion model's validation loss moves by a few percent across a sweep while FID moves several-fold, so
# FID ~ loss^k has k of order 10 (the fixture sweep: ~11); the fit allows up to 100.
LOSS_FID_EXPONENT_BOUNDS = (0.0, 100.0)
LOSS_FID_FORMS = ("power", "floor")


@dataclass
class LossToFid:
    """FID as a function of validation loss: FID = F_inf + A (loss / loss_ref)^k (F_inf = 0 for the power law).

    Fitted by `scaling.fit_law` on C = 1 / loss (so its falling law in C is a rising law in the loss), Huber
    in log FID, bootstrap over cells. `alternative` is the form not chosen, `choice` says why.
    """

    law: ScalingLaw
    alternative: ScalingLaw | None
    choice: str
    n_cells: int
    loss_range: tuple[float, float]
    label: str = "FID"
    points: pd.DataFrame | None = field(default=None, repr=False)  # cell_id, step (if known), val_loss, fid

    @property
    def form(self) -> str:
        return self.law.form

    @property
    def exponent(self) -> float:
        return self.law.exponent

    @property
    def loss_ref(self) -> float:
        return 1.0 / self.law.c_ref

    @property
    def determined(self) -> bool:
        """Returns False when the exponent (or its bootstrap interval) reaches the bounds of the fit."""
        return _law_within_bounds(self.law)

    def predict(self, loss) -> np.ndarray:
        """Returns the fitted FID at validation `loss`."""
        return self.law.predict(1.0 / np.asarray(loss, dtype=float))

    def predict_interval(self, loss) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high) bootstrap percentile bands of FID at validation `loss`."""
        return self.law.predict_interval(1.0 / np.asarray(loss, dtype=float))

    @property
    def log_residuals(self) -> np.ndarray:
        """Returns log(measured / fitted FID) at the fitted points: the scatter of one evaluation about the law."""
        return np.log(self.points["fid"].to_numpy(float) / self.predict(self.points["val_loss"].to_numpy(float)))

    def prediction_interval(self, loss, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high), flattened: where one new FID at validation `loss` should fall at the fit's level.

        Each bootstrap draw of the law times the exp of a residual of the fit drawn at random.
        """
        loss = np.atleast_1d(np.asarray(loss, dtype=float))
        n_draws = 0 if self.law.boot_thetas is None else len(self.law.boot_thetas)
        draws = self.predict_draws(np.broadcast_to(loss, (max(n_draws, 1), len(loss))))
        return _percentile_ci(_with_scatter(draws, self.log_residuals, seed), self.law.level)

    def predict_draws(self, loss_draws: np.ndarray) -> np.ndarray:
        """Returns FID for loss draws (R, m), the r-th row through the fit's (r mod n)-th bootstrap draw.

        Pairing independent draws of two fits propagates the uncertainty of both into the FID interval.
        """
        loss_draws = np.asarray(loss_draws, dtype=float)
        thetas = self.law.boot_thetas
        if thetas is None or not len(thetas) or not loss_draws.size:
            return np.full(loss_draws.shape, np.nan)
        th = thetas[np.arange(len(loss_draws)) % len(thetas)]
        with np.errstate(all="ignore"):
            x = -np.log(self.law.c_ref * loss_draws)  # log(C / C_ref) with C = 1 / loss
            if self.form == "power":
                return np.exp(th[:, :1] - th[:, 1:2] * x)
            return np.exp(np.logaddexp(th[:, :1], th[:, 1:2] - th[:, 2:3] * x))

    def describe(self) -> str:
        """Returns the fit in one line, e.g. 'FID-50K = 3.1 + 40.2 (loss / 0.145)^12.3, k 95% CI [10, 15]'."""
        law = self.law
        floor = "" if self.form == "power" else f"{law.f_inf:.3g} + "
        if not self.determined:
            return f"{self.label} against validation loss: exponent not determined ({self.choice})"
        s = f"{self.label} = {floor}{law.coefficient:.3g} (loss / {self.loss_ref:.4g})^{self.exponent:.3g}"
        lo, hi = law.exponent_ci
        if not math.isnan(lo):
            s += f", k {100 * law.level:g}% CI [{lo:.3g}, {hi:.3g}]"
        return s + f"; {law.n_points} points, {self.n_cells} cells; {self.choice}"

    def to_dict(self) -> dict:
        """Returns the fit as plain JSON-ready values (the chosen law's and the alternative's parameters)."""
        ok = self.determined
        law = self.law
        out = {
            "law": "FID = F_inf + A (loss / loss_ref)^k",
            "label": self.label,
            "form": self.form,
            "choice": self.choice,
            "determined": ok,
            "f_inf": law.f_inf if ok else None,
            "f_inf_ci": list(law.f_inf_ci) if ok else None,
            "coefficient": law.coefficient if ok else None,
            "loss_ref": self.loss_ref,
            "exponent": law.exponent if ok else None,
            "exponent_ci": list(law.exponent_ci) if ok else None,
            "exponent_bounds": list(law.exponent_bounds),
            "loss_range": list(self.loss_range),
            "level": law.level,
            "huber_delta": HUBER_DELTA,
            "n_points": law.n_points,
            "n_cells": self.n_cells,
            "n_resamples": law.n_resamples,
            "n_failed": law.n_failed,
            "converged": law.converged,
            "alternative": None
            if self.alternative is None
            else {
                "form": self.alternative.form,
                "exponent": self.alternative.exponent,
                "exponent_ci": list(self.alternative.exponent_ci),
                "f_inf": self.alternative.f_inf,
                "f_inf_ci": list(self.alternative.f_inf_ci),
            },
            "description": self.describe(),
        }
        return to_plain(out)


def _law_within_bounds(law: ScalingLaw) -> bool:
    """Returns True when neither the exponent nor more than the tail of its bootstrap draws reach its bounds."""
    b_lo, b_hi = law.exponent_bounds
    tol = 1e-3 * (b_hi - b_lo)

    def edge(b):
        return (b <= b_lo + tol) | (b >= b_hi - tol)

    if edge(law.exponent):
        return False
    boot = law.boot_thetas
    if boot is not None and len(boot):
        return bool(edge(boot[:, -1]).mean() <= (1 - law.level) / 2)
    return True


def _floor_problem(law: ScalingLaw, best: float) -> str | None:
    """Returns why the floor law's floor is not determined by its bootstrap, or None when it is."""
    if law.boot_thetas is None or not len(law.boot_thetas):
        return "no bootstrap to tell a floor from none"
    if not _law_within_bounds(law):
        return f"the floor law's exponent interval {law.exponent_ci} reaches its bounds {law.exponent_bounds}"
    lo, hi = law.f_inf_ci
    if lo < NEGLIGIBLE_FRAC * best:
        return f"the floor's interval [{lo:.3g}, {hi:.3g}] reaches ~0"
    if hi >= best:
        return f"the floor's interval [{lo:.3g}, {hi:.3g}] reaches the best FID measured ({best:.3g})"
    return None


@threadpool_limits.wrap(limits=1)
def fit_loss_to_fid(
    val_loss,
    fid,
    groups=None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    label: str = "FID",
) -> LossToFid:
    """Returns FID as a power law of validation loss, with a floor when the data call for one.

    Rule: both forms are fitted with a bootstrap over `groups` (cells); the floor law is chosen when its 95%
    interval of F_inf lies above NEGLIGIBLE_FRAC of the best FID measured and below that FID, and its exponent
    interval stays inside the bounds; otherwise the pure power law. ValueError for fewer than 3 distinct losses.
    """
    loss, f = _as_1d("val_loss", val_loss), _as_1d("fid", fid)
    if len(loss) != len(f):
        raise ValueError(f"val_loss and fid must have one length, got {len(loss)} and {len(f)}")
    groups = np.arange(len(loss)).astype(str) if groups is None else np.asarray(groups).astype(str)
    if len(groups) != len(loss):
        raise ValueError(f"groups must have one entry per point, got {len(groups)} for {len(loss)} points")
    _check_positive("val_loss", loss, groups)
    _check_positive("fid", f, groups)
    n_loss = len(np.unique(loss))
    if n_loss < 3:
        raise ValueError(
            f"FID against validation loss needs at least 3 distinct losses (2 parameters and a check), got {n_loss}"
        )
    kw = dict(
        groups=groups,
        n_resamples=n_resamples,
        seed=seed,
        level=level,
        exponent_bounds=LOSS_FID_EXPONENT_BOUNDS,
        x_name="1 / validation loss",
        metric="fid",
        label=label,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is recorded on each law
        power = fit_law(1.0 / loss, f, form="power", **kw)
        floor = fit_law(1.0 / loss, f, form="floor", **kw) if n_loss >= 4 else None
    if floor is None:
        law, alt, choice = power, None, "power law: 3 distinct losses are too few to fit a floor as well"
    else:
        problem = _floor_problem(floor, float(f.min()))
        if problem is None:
            law, alt, choice = floor, power, "floor law: its bootstrap determines the floor"
        else:
            law, alt, choice = power, floor, f"power law: {problem}"
    points = pd.DataFrame({"cell_id": groups, "val_loss": loss, "fid": f})
    law.points = points
    return LossToFid(
        law=law,
        alternative=alt,
        choice=choice,
        n_cells=len(np.unique(groups)),
        loss_range=(float(loss.min()), float(loss.max())),
        label=label,
        points=points,
    )


def fid_points(
    eval_df: pd.DataFrame,
    fid_metric: str = "fid",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
) -> tuple[pd.DataFrame, str]:
    """Returns (rows of the results table with both `fid_metric` and val_loss, the FID label).

    FID settings (sample count, extractor: `harness.results.comparable`; and the settings hash) must agree, and
    so must data set and objective, unless `allow_mixed`; ValueError naming cells with non-positive values.
    """
    if not isinstance(eval_df, pd.DataFrame):
        raise ValueError(f"expected a results table (pandas DataFrame), got {type(eval_df).__name__}")
    if "val_loss" not in eval_df:
        raise ValueError("the results table has no val_loss column: no FID can be tied to a validation loss")
    rows, label = comparable(eval_df, fid_metric, allow_mixed=allow_mixed)
    if cond is not None and "cond" in rows:
        rows = rows[rows["cond"] == cond]
    rows = rows[rows["val_loss"].notna()]
    if rows.empty:
        raise ValueError(
            f"no evaluated row has both {fid_metric!r} and val_loss"
            + (f" (cond={cond!r})" if cond is not None else "")
            + "; the validation loss is logged by training (metrics.jsonl)"
        )
    _one_setting(rows, allow_mixed, f"{label}-loss relation")
    hashes = sorted(str(h) for h in rows["settings_hash"].dropna().unique()) if "settings_hash" in rows else []
    if len(hashes) > 1 and not allow_mixed:
        # comparable() refuses several settings for one (cell, step); across cells they still differ (sampler
        # steps, guidance scale, ...), and each setting is its own FID-loss relation.
        raise ValueError(
            f"refusing to fit one {label}-loss relation across evaluation settings {hashes}; select one, e.g. "
            f"df[df.settings_hash == {hashes[0]!r}], or pass allow_mixed=True"
        )
    for col in (fid_metric, "val_loss"):
        v = rows[col].to_numpy(dtype=float)
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            raise ValueError(
                f"{col} must be finite and positive; non-positive in cells {sorted(rows.loc[bad, 'cell_id'].unique())}"
            )
    return rows, label


def fit_loss_to_fid_table(
    eval_df: pd.DataFrame,
    fid_metric: str = "fid",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> LossToFid:
    """Returns `fit_loss_to_fid` over every evaluated (cell, step) of the results table with a validation loss."""
    rows, label = fid_points(eval_df, fid_metric, cond, allow_mixed)
    fit = fit_loss_to_fid(
        rows["val_loss"].to_numpy(),
        rows[fid_metric].to_numpy(),
        groups=rows["cell_id"].to_numpy(),
        n_resamples=n_resamples,
        seed=seed,
        level=level,
        label=label,
    )
    fit.points = fit.points.assign(step=rows["step"].to_numpy() if "step" in rows else np.nan)
    return fit


# ---------------------------------------------------------------------------------------------------------
# Held-out check: fit the cheaper cells, predict the largest
# ---------------------------------------------------------------------------------------------------------
# The held-out refits use fewer resamples: 200 give 95% percentile bounds to about +-1 resample-quantile, and
# the check is about the error of the prediction, not the third digit of its interval.
HOLDOUT_RESAMPLES = 200


def _interval_row(measured: float, predicted: float, lo: float, hi: float) -> dict:
    """Returns measured, predicted, its interval, relative error and whether the interval holds the measurement."""
    return {
        "measured": measured,
        "predicted": predicted,
        "low": lo,
        "high": hi,
        "rel_error": predicted / measured - 1 if measured else math.nan,
        "inside": bool(lo <= measured <= hi) if math.isfinite(lo) and math.isfinite(hi) else None,
    }


def _errors(rows: list[dict]) -> dict:
    """Returns the median absolute relative error and the fraction of measurements inside their intervals."""
    err = [abs(r["rel_error"]) for r in rows if r["rel_error"] is not None and math.isfinite(r["rel_error"])]
    inside = [r["inside"] for r in rows if r["inside"] is not None]
    return {
        "n": len(rows),
        "median_abs_rel_error": float(np.median(err)) if err else math.nan,
        "max_abs_rel_error": float(np.max(err)) if err else math.nan,
        "fraction_inside": float(np.mean(inside)) if inside else math.nan,
    }


def holdout_check(
    val_df: pd.DataFrame,
    eval_df: pd.DataFrame | None = None,
    n_holdout: int = 1,
    metric: str = "val_loss",
    fid_metric: str = "fid",
    n_resamples: int = HOLDOUT_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
) -> dict:
    """Returns the errors of the laws fitted on the cheaper cells when they predict the `n_holdout` largest sizes.

    Cells of the `n_holdout` largest Gflops are held out. "joint": the joint law's `metric` at each held-out
    record; "isoflop": size_opt(C) of the cheaper cells against the IsoFLOP minimum of all cells at the budgets
    where held-out cells take part; "loss_to_fid": FID of held-out evaluations from their measured loss, and from
    the loss the joint law predicts ("fid_from_predicted_loss"). Each row: measured, predicted, low, high (the
    `level` prediction interval: the law's bootstrap draws times one measurement's scatter about it, drawn from
    the fit's residuals), rel_error (predicted / measured - 1), inside. A part that cannot be fitted gives
    {"error": why}. ValueError when too few sizes remain to fit.
    """
    rows = validation_points(val_df, metric, cond, allow_mixed)
    sizes = np.sort(rows["gflops"].unique())
    if not 1 <= n_holdout <= len(sizes) - MIN_SIZES:
        raise ValueError(
            f"holding out the {n_holdout} largest of {len(sizes)} sizes leaves {len(sizes) - n_holdout}; the joint "
            f"law needs {MIN_SIZES} sizes to fit and at least one held out"
        )
    cut = sizes[-n_holdout]
    train, test = rows[rows["gflops"] < cut], rows[rows["gflops"] >= cut]
    out = {
        "held_out_sizes": sizes[-n_holdout:].tolist(),
        "held_out_cells": sorted(test["cell_id"].astype(str).unique()),
        "n_train_cells": int(train["cell_id"].nunique()),
        "n_resamples": n_resamples,
        "level": level,
    }
    joint = None
    try:
        joint, out["joint"] = _holdout_joint(train, test, metric, n_resamples, seed, level)
    except ValueError as e:
        out["joint"] = {"error": str(e)}
    try:
        out["isoflop"] = _holdout_isoflop(rows, train, set(out["held_out_cells"]), metric, n_resamples, seed, level)
    except ValueError as e:
        out["isoflop"] = {"error": str(e)}
    if eval_df is None:
        out["loss_to_fid"] = {"error": "no results table with FID given"}
        return to_plain(out)
    try:
        out.update(_holdout_fid(eval_df, cut, joint, fid_metric, n_resamples, seed, level, cond, allow_mixed))
    except ValueError as e:
        out["loss_to_fid"] = {"error": str(e)}
    return to_plain(out)


def _holdout_joint(train, test, metric, n_resamples, seed, level) -> tuple[JointLaw, dict]:
    """Returns (the joint law of the cheaper cells, its prediction of each held-out record with intervals)."""
    joint = fit_joint_law(train["gflops"], train["images_seen"], train[metric], train["cell_id"], n_resamples, seed,
                          level=level, metric_name=metric, label=metric_label(metric))
    size, images = test["gflops"].to_numpy(), test["images_seen"].to_numpy()
    pred = joint.predict(size, images)
    lo, hi = joint.prediction_interval(size, images, seed)
    rows = [{"cell_id": str(c), "size": float(g), "images": float(i)}
            | _interval_row(float(m), float(p), float(a), float(b))
            for c, g, i, m, p, a, b in zip(test["cell_id"], size, images, test[metric], pred, lo, hi)]
    return joint, {"rows": rows, **_errors(rows), "law": joint.describe()}


def _holdout_isoflop(rows, train, held_out: set, metric, n_resamples, seed, level) -> dict:
    """Returns size_opt(C) of the cheaper cells against the IsoFLOP minima of all cells where held-out cells
    take part, with intervals; {"error": why} when there is nothing to compare."""
    cheap = isoflop_profiles(train, metric=metric, n_resamples=n_resamples, seed=seed, level=level, cond=None)
    full = isoflop_profiles(rows, metric=metric, n_resamples=0, cond=None)
    out = []
    for p in full.minima:
        if not set(p["points"]["cell_id"]) & held_out:
            continue
        c = p["budget"]
        lo, hi = cheap.size_opt_interval(c)
        out.append({"budget_gflops": c} | _interval_row(p["size_opt"], float(cheap.size_opt(c)), float(lo), float(hi)))
    if not cheap.determined:
        return {"error": f"on the cheaper cells, {'; '.join(cheap.notes)}"}
    if not out:
        return {"error": "no budget where held-out cells take part has an IsoFLOP minimum inside the trained sizes"}
    return {"rows": out, **_errors(out), "law": cheap.describe()}


def _holdout_fid(eval_df, cut, joint, fid_metric, n_resamples, seed, level, cond, allow_mixed) -> dict:
    """Returns {"loss_to_fid": FID of held-out evaluations from their measured loss, and, with a joint law,
    "fid_from_predicted_loss": from the loss the joint law predicts}, each with prediction intervals."""
    frows, label = fid_points(eval_df, fid_metric, cond, allow_mixed)
    held = frows["gflops"] >= cut
    if not held.any():
        raise ValueError(f"no held-out cell (Gflops >= {cut:g}) has an evaluation with {fid_metric} and val_loss")
    cheap = frows[~held]
    fit = fit_loss_to_fid(cheap["val_loss"], cheap[fid_metric], cheap["cell_id"], n_resamples, seed, level, label)
    if not fit.determined:
        raise ValueError(f"{label} against loss on the cheaper cells is not determined ({fit.choice})")
    t = frows[held]
    pred = fit.predict(t["val_loss"].to_numpy())
    lo, hi = fit.prediction_interval(t["val_loss"].to_numpy(), seed)
    rows = [{"cell_id": str(c), "step": int(s), "val_loss": float(v)}
            | _interval_row(float(m), float(p), float(a), float(b))
            for c, s, v, m, p, a, b in zip(t["cell_id"], t["step"], t["val_loss"], t[fid_metric], pred, lo, hi)]
    out = {"loss_to_fid": {"rows": rows, **_errors(rows), "law": fit.describe()}}
    if joint is not None and joint.boot_thetas is not None and len(joint.boot_thetas):
        size, images = t["gflops"].to_numpy(float), t["images_seen"].to_numpy(float)
        # One record's loss scatters about the joint law, its FID about the loss -> FID law: both enter.
        loss_draws = _with_scatter(joint.draws(size, images), joint.log_residuals, seed)
        fid_draws = _with_scatter(fit.predict_draws(loss_draws), fit.log_residuals, seed + 1)
        fid_lo, fid_hi = _percentile_ci(fid_draws, level)
        fid_pt = fit.predict(joint.predict(size, images))
        chain = [{"cell_id": str(c), "step": int(s)} | _interval_row(float(m), float(p), float(a), float(b))
                 for c, s, m, p, a, b in zip(t["cell_id"], t["step"], t[fid_metric], fid_pt, fid_lo, fid_hi)]
        out["fid_from_predicted_loss"] = {"rows": chain, **_errors(chain)}
    return out


# ---------------------------------------------------------------------------------------------------------
# Summary for the report
# ---------------------------------------------------------------------------------------------------------
N_BUDGETS_INSIDE = 3
# Budgets beyond the sweep: these multiples of the most compute any cell spent (one and two decades out).
BEYOND_FACTORS = (10.0, 100.0)


def summary_budgets(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Returns (budgets in Gflops, beyond-the-sweep flags) by the summary's rule, from `validation_points` rows.

    Rule: each cell's final training compute is 3 x gflops x its last images seen. Inside the sweep:
    N_BUDGETS_INSIDE budgets log-spaced from the smallest to the largest final compute. Beyond it: the largest
    final compute times each of BEYOND_FACTORS.
    """
    final = (FORWARD_BACKWARD_FACTOR * rows["gflops"] * rows["images_seen"]).groupby(rows["cell_id"]).max()
    lo, hi = float(final.min()), float(final.max())
    inside = np.geomspace(lo, hi, N_BUDGETS_INSIDE) if hi > lo else np.array([hi])
    beyond = hi * np.array(BEYOND_FACTORS)
    return np.concatenate([inside, beyond]), np.concatenate([np.zeros(len(inside), bool), np.ones(len(beyond), bool)])


def _value(point, lo, hi) -> dict:
    return {"value": float(point), "low": float(lo), "high": float(hi)}


def compute_optimal_summary(
    val_df: pd.DataFrame,
    eval_df: pd.DataFrame | None = None,
    budgets=None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    metric: str = "val_loss",
    fid_metric: str = "fid",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
    holdout_resamples: int = HOLDOUT_RESAMPLES,
    level: float = LEVEL,
    fits: dict | None = None,
) -> dict:
    """Returns what a compute budget buys: per budget the compute-optimal size, images, `metric` and FID.

    `fits`, when given, receives the fitted objects ("joint", "isoflop", "loss_to_fid": JointLaw, IsoFlopResult,
    LossToFid, or None), so a caller can draw them without fitting again.

    `val_df`: the validation table (a row per cell and validation record); `eval_df`: the results table (FID).
    Budgets (training compute, Gflops): given, or by `summary_budgets`' rule. Per budget, each with its
    `level` bootstrap interval ({"value", "low", "high"}, or None when not determined): size_opt (Gflops),
    images_opt, metric at the optimum, FID (the loss through the loss -> FID fit), and the IsoFLOP size_opt.
    Also "joint_law", "isoflop", "loss_to_fid", "holdout" (each a to_dict(), or {"error": why}) and "notes"
    (what could not be determined and why). Plain JSON-ready values.
    """
    notes: list[str] = []
    rows = validation_points(val_df, metric, cond, allow_mixed)
    if budgets is None:
        budgets, beyond = summary_budgets(rows)
        rule = (
            f"{N_BUDGETS_INSIDE} budgets log-spaced between the smallest and the largest final training compute of "
            f"a cell, and {', '.join(f'{f:g}x' for f in BEYOND_FACTORS)} the largest (beyond the sweep)"
        )
    else:
        budgets = np.sort(np.atleast_1d(np.asarray(budgets, dtype=float)))
        final = (FORWARD_BACKWARD_FACTOR * rows["gflops"] * rows["images_seen"]).max()
        beyond = budgets > final
        rule = "given"
    out: dict = {
        "metric": metric,
        "label": metric_label(metric),
        "size": "gflops",
        "conventions": "size = forward Gflops per image (multiply-adds); training compute = 3 x Gflops x images "
        "seen, in Gflops",
        "budget_rule": rule,
        "level": level,
        "n_resamples": n_resamples,
        "seed": seed,
        "sizes_trained": [float(rows["gflops"].min()), float(rows["gflops"].max())],
    }

    joint, iso, fid = _summary_fits(rows, eval_df, out, notes, metric, fid_metric, cond, allow_mixed, n_resamples,
                                    seed, level, fits)
    out["budgets"] = _budget_rows(budgets, beyond, joint, iso, fid, out["sizes_trained"], metric, level)
    lo_size, hi_size = out["sizes_trained"]
    if any(b["size_outside_trained"] for b in out["budgets"]):
        notes.append(
            f"some compute-optimal sizes lie outside the sizes trained ({lo_size:.3g} to {hi_size:.3g} Gflops): "
            "the law is extrapolated there"
        )
    if any(b["fid_loss_extrapolated"] for b in out["budgets"]):
        notes.append(
            f"some predicted losses lie outside the losses of the FID fit ({fid.loss_range[0]:.4g} to "
            f"{fid.loss_range[1]:.4g}): their FID is extrapolated"
        )
    try:
        out["holdout"] = holdout_check(
            val_df, eval_df, 1, metric, fid_metric, holdout_resamples, seed, level, cond, allow_mixed
        )
    except ValueError as e:
        out["holdout"] = {"error": str(e)}
        notes.append(f"no held-out check: {e}")
    out["notes"] = notes
    return to_plain(out)


def _summary_fits(rows, eval_df, out, notes, metric, fid_metric, cond, allow_mixed, n_resamples, seed, level,
                  fits) -> tuple:
    """Fits the joint law, the IsoFLOP profiles and loss -> FID for the summary; records each (or why not) in
    `out` and `notes`, and the objects in `fits` when given. Returns (joint, iso, fid); None where not fitted,
    and fid None when FID against loss is not determined."""
    joint = iso = fid = None
    try:
        joint = fit_joint_law(rows["gflops"], rows["images_seen"], rows[metric], rows["cell_id"], n_resamples, seed,
                              level=level, metric_name=metric, label=metric_label(metric))
        out["joint_law"] = joint.to_dict()
        undetermined = [k for k, ok in joint.determined.items() if not ok]
        if undetermined:
            notes.append(
                f"joint law: {', '.join(undetermined)} not determined (the fit or its {100 * level:g}% interval "
                f"reaches a bound: an exponent at 0 or {EXPONENT_BOUNDS[1]:g}, or a term below "
                f"{100 * NEGLIGIBLE_FRAC:g}% of the smallest value)"
            )
        if not joint.optimum_determined:
            notes.append("joint law: the compute-optimal size and images are not determined (they need A, B, alpha, "
                         "beta)")
    except ValueError as e:
        out["joint_law"] = {"error": str(e)}
        notes.append(f"joint law not fitted: {e}")
    try:
        iso = isoflop_profiles(rows, metric=metric, n_resamples=n_resamples, seed=seed, level=level, cond=None)
        out["isoflop"] = iso.to_dict()
        notes += [f"IsoFLOP: {n}" for n in iso.notes]  # each budget's reason is in its profile
    except ValueError as e:
        out["isoflop"] = {"error": str(e)}
        notes.append(f"IsoFLOP profiles not drawn: {e}")
    if fits is not None:
        fits.update(joint=joint, isoflop=iso, loss_to_fid=None)
    if eval_df is None:
        out["loss_to_fid"] = {"error": "no results table with FID given"}
        notes.append("no FID predictions: no results table given")
        return joint, iso, None
    try:
        fid = fit_loss_to_fid_table(eval_df, fid_metric, cond, allow_mixed, n_resamples, seed, level)
        if fits is not None:
            fits["loss_to_fid"] = fid
        out["loss_to_fid"] = fid.to_dict()
        notes.append(f"loss -> FID: {fid.choice}")
        if not fid.determined:
            notes.append("no FID predictions: FID against loss is not determined")
            fid = None
    except ValueError as e:
        out["loss_to_fid"] = {"error": str(e)}
        notes.append(f"no FID predictions: {e}")
    return joint, iso, fid


def _budget_rows(budgets, beyond, joint, iso, fid, sizes_trained, metric, level) -> list[dict]:
    """Returns a row per budget: compute-optimal size, images, metric and FID with intervals (None when not
    determined), the IsoFLOP size_opt, and whether the size or the loss is extrapolated."""
    lo_size, hi_size = sizes_trained
    ok = joint is not None and joint.optimum_determined
    if ok:
        size, images = joint.optimal(budgets)
        loss_pt = joint.predict(size, images)
        s_draws, i_draws, l_draws = joint.optimal_draws(budgets)
        (s_lo, s_hi), (i_lo, i_hi), (l_lo, l_hi) = (_percentile_ci(d, level) for d in (s_draws, i_draws, l_draws))
        if fid is not None:
            f_pt = fid.predict(loss_pt)
            f_lo, f_hi = _percentile_ci(fid.predict_draws(l_draws), level)
    per = []
    for j, c in enumerate(budgets):
        b = {"compute_gflops": float(c), "beyond_sweep": bool(beyond[j])}
        b["size_opt"] = _value(size[j], s_lo[j], s_hi[j]) if ok else None
        b["images_opt"] = _value(images[j], i_lo[j], i_hi[j]) if ok else None
        b[metric] = _value(loss_pt[j], l_lo[j], l_hi[j]) if ok else None
        b["fid"] = _value(f_pt[j], f_lo[j], f_hi[j]) if ok and fid is not None else None
        b["size_outside_trained"] = bool(ok and not lo_size <= size[j] <= hi_size)
        b["fid_loss_extrapolated"] = bool(
            ok and fid is not None and not fid.loss_range[0] <= loss_pt[j] <= fid.loss_range[1]
        )
        if iso is not None and iso.determined:
            i_lo_c, i_hi_c = iso.size_opt_interval(c)
            b["isoflop_size_opt"] = _value(iso.size_opt(c), i_lo_c, i_hi_c)
        else:
            b["isoflop_size_opt"] = None
        per.append(b)
    return per


def _fmt_value(v: dict | None, fmt: str = ".3g") -> str:
    if v is None:
        return "not determined"
    lo, hi = v["low"], v["high"]
    ci = "" if not (math.isfinite(lo) and math.isfinite(hi)) else f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{v['value']:{fmt}}{ci}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def format_compute_optimal_markdown(summary: dict) -> str:
    """Returns the summary as a Markdown section titled "Compute-optimal" (tables of budgets, laws, checks, notes)."""
    metric, label = summary["metric"], summary["label"]
    pct = f"{100 * summary['level']:g}%"
    md = [
        "## Compute-optimal",
        "",
        f"Given a training budget, the model size and number of training images that minimise the {label}, and "
        "what they reach. Conventions: " + summary["conventions"] + ". Joint law "
        f"{label} = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Approach 3; Huber loss in log space, "
        "L-BFGS from a grid of starts, as refit by Besiroglu et al. 2024); IsoFLOP profiles (Approach 2) as a check. "
        f"Each value has its {pct} bootstrap percentile interval over cells in brackets "
        f"({summary['n_resamples']} resamples). "
        f"Budgets: {summary['budget_rule']}.",
        "",
    ]
    rows = []
    for b in summary["budgets"]:
        where = "beyond the sweep" if b["beyond_sweep"] else "inside the sweep"
        if b["size_outside_trained"]:
            where += ", size extrapolated"
        rows.append(
            [
                f"{b['compute_gflops']:.3g}",
                where,
                _fmt_value(b["size_opt"]),
                _fmt_value(b["images_opt"]),
                _fmt_value(b[metric], ".4g"),
                _fmt_value(b["fid"]),
                _fmt_value(b["isoflop_size_opt"]),
            ]
        )
    md += [
        _md_table(
            [
                "training compute (Gflops)",
                "where",
                "size (Gflops)",
                "images seen",
                label,
                "FID",
                "IsoFLOP size (Gflops)",
            ],
            rows,
        ),
        "",
    ]
    for key, title in (("joint_law", "Joint law"), ("isoflop", "IsoFLOP profiles"), ("loss_to_fid", "Loss to FID")):
        part = summary.get(key) or {}
        md.append(f"- {title}: " + (part.get("description") or f"not fitted ({part.get('error', 'no data')})"))
    iso = summary.get("isoflop") or {}
    if iso.get("profiles"):
        md += ["", "IsoFLOP budgets:", ""]
        md.append(
            _md_table(
                ["budget (Gflops)", "cells", "minimum at size (Gflops)", f"{label} at the minimum", "why no minimum"],
                [
                    [
                        f"{p['budget_gflops']:.3g}",
                        str(len(p["points"])),
                        "-" if p["size_opt"] is None else f"{p['size_opt']:.3g}",
                        "-" if p["metric_opt"] is None else f"{p['metric_opt']:.4g}",
                        p["reason"] or "",
                    ]
                    for p in iso["profiles"]
                ],
            )
        )
    hold = summary.get("holdout") or {}
    md += ["", "### Held-out check", ""]
    if "error" in hold:
        md.append(f"Not run: {hold['error']}")
    else:
        md.append(
            f"Fitted on the {hold['n_train_cells']} cells below {min(hold['held_out_sizes']):.3g} Gflops; predicting "
            f"the held-out cells {', '.join(hold['held_out_cells'])} ({hold['n_resamples']} resamples)."
        )
        md.append("")
        table = []
        for key, what in (
            ("joint", f"{label} (joint law)"),
            ("isoflop", "size_opt (IsoFLOP law)"),
            ("loss_to_fid", "FID from measured loss"),
            ("fid_from_predicted_loss", "FID from predicted loss"),
        ):
            part = hold.get(key)
            if part is None:
                continue
            if "error" in part:
                table.append([what, "-", "-", "-", part["error"]])
            else:
                table.append(
                    [
                        what,
                        str(part["n"]),
                        f"{100 * part['median_abs_rel_error']:.1f}%",
                        f"{100 * part['fraction_inside']:.0f}%" if math.isfinite(part["fraction_inside"]) else "-",
                        "",
                    ]
                )
        md.append(_md_table(["prediction", "points", "median abs error", f"inside the {pct} interval", "note"], table))
    if summary["notes"]:
        md += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(md) + "\n"
