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

This module holds the joint law (JointLaw, fit_joint_law, fit_joint_table). The other methods have their own:
harness.scaling.isoflop (IsoFLOP profiles), harness.scaling.loss_to_fid (loss -> FID); beside them
harness.scaling.rows (which rows may share a law, what a fit needs of them), harness.scaling.heldout (fit the
cheaper cells, predict the largest) and harness.scaling.summary (what a budget buys, for the report). The Huber
loss, the minimiser and the bootstrap over cells are harness.scaling.fitting's.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.core.vocabulary import metric_label
from harness.scaling.fitting import (
    cell_bootstrap,
    huber,
    huber_grad,
    minimize_from,
    percentile_ci,
    refit_resamples,
    to_plain,
    with_scatter,
)
from harness.scaling.powerlaw import EXPONENT_BOUNDS, HUBER_DELTA, LEVEL, N_RESAMPLES
from harness.scaling.rows import (
    MIN_SIZES,
    NEGLIGIBLE_FRAC,
    _as_1d,
    _check_cells,
    _check_positive,
    validation_points,
)

JOINT_PARAMS = ("E", "A", "B", "alpha", "beta")
# A log-coefficient (log E, log A, log B) may lie this far below log(smallest value): the term then vanishes.
LOG_COEF_RANGE = 20.0
# The grid of starts of the joint fit (Hoffmann et al. 2022, appendix D, use 4,500 points and L-BFGS from each).
# Here the loss is evaluated on the whole grid at once and L-BFGS runs from the best N_LBFGS_STARTS: on the
# synthetic sweeps tried (Besiroglu et al.'s law, DiT-like grids) the best 8 reached the optimum of the best 64.
GRID_FLOOR_FRACS = (0.02, 0.3, 0.6, 0.85, 0.97)  # E as a fraction of the smallest value
GRID_TERM_FRACS = (0.01, 0.05, 0.2, 0.5)  # A and B terms at the reference point, as fractions of the mean
GRID_EXPONENTS = (0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 2.0)
N_LBFGS_STARTS = 8
# L-BFGS-B's options for the joint law (its loss a weighted mean in units of delta, of order one).
JOINT_LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-9}


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
    scale = 1.0 / (delta * w.sum())
    loss = scale * (w @ huber(r, delta))
    g = (scale * w * huber_grad(r, delta)) / s  # d loss / d pred, times the softmax's 1 / s
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
            huber(_joint_log_predict(grid[i : i + step], u, v) - y, delta).mean(axis=1)
            for i in range(0, len(grid), step)
        ]
    )


def _joint_minimize(starts, u, v, y, w, delta, bounds) -> tuple[np.ndarray, float, bool]:
    """Returns (best theta, its loss as `_joint_loss_grad` gives it, converged) over L-BFGS runs from `starts`,
    each clipped into `bounds` (harness.scaling.fitting.minimize_from)."""
    lo, hi = [b[0] for b in bounds], [b[1] for b in bounds]
    starts = [np.clip(t, lo, hi) for t in starts]
    return minimize_from(_joint_loss_grad, starts, bounds, JOINT_LBFGS_OPTIONS, args=(u, v, y, w, delta))


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
        lo, hi = percentile_ci(self._natural(self._boot).reshape(-1, 5), self.level)
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
        lo, hi = percentile_ci(self.draws(size, images), self.level)
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
        return percentile_ci(with_scatter(self.draws(size, images), self.log_residuals, seed), self.level)

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
        return {k: percentile_ci(d, self.level) for k, d in zip(("size", "images", "metric"), draws)}

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
        lo, hi = percentile_ci(a, self.level)
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


# Important: L-BFGS-B calls BLAS on 5-vectors thousands of times per bootstrap; one thread (see powerlaw.fit_law).
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
    ValueError when the data cannot determine the law (see rows.MIN_SIZES, rows.MIN_RECORDS_PER_CELL).
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

    def resamples():
        """Yields each resample's (u, v, y, weights) of the records its cells hold, each record weighted by how
        many times its cell was drawn; None when too few sizes or data points identify the law."""
        for wi in cell_bootstrap(groups, n_resamples, seed, weights=True):
            used = wi > 0
            if len(np.unique(u[used])) < MIN_SIZES or len(np.unique(v[used])) < MIN_SIZES:
                yield None
            else:
                yield u[used], v[used], y[used], wi[used]

    # The fallback, the second-best grid start, catches a resample whose optimum lies elsewhere.
    boot, n_failed = refit_resamples(
        resamples(),
        lambda p, starts_i: _joint_minimize(starts_i, *p, delta, bounds),
        theta,
        starts[1] if len(starts) > 1 else starts[0],
        len(JOINT_PARAMS),
    )
    law = JointLaw(
        theta=theta,
        size_ref=size_ref,
        images_ref=images_ref,
        loss=loss,
        converged=converged,
        n_points=len(y),
        n_cells=len(np.unique(groups)),
        y_min=float(y.min()),
        u_range=(float(u.min()), float(u.max())),
        v_range=(float(v.min()), float(v.max())),
        size_name=size_name,
        metric=metric_name,
        label=label,
        boot_thetas=boot if n_resamples else None,
        n_resamples=n_resamples,
        n_failed=n_failed,
        level=level,
    )
    law.points = pd.DataFrame({"size": size, "images": images, "metric": y_lin, "group": groups})
    law.points["predicted"] = law.predict(size, images)
    return law


def fit_joint_table(
    val_df: pd.DataFrame,
    metric: str = "val_loss_ema",
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
