"""Scaling laws of one variable: FID (or validation loss) against Gflops or training compute, with bootstrap
intervals.

Two forms, both fitted in log space with a Huber loss (delta 1e-3) by L-BFGS from a grid of starts, the
method of the Chinchilla replication (Besiroglu et al. 2024):
    power:  F(C) = A (C / C_ref)^(-b)            log F = a - b x,              x = log(C / C_ref)
    floor:  F(C) = F_inf + A (C / C_ref)^(-b)    log F = LSE(e, a - b x),      F_inf = exp(e), A = exp(a)
C_ref is the geometric mean of the fitted C, which keeps a and e of order one whatever the units of C.
Intervals come from a bootstrap over cells (resampling run folders, not rows). The loss, the minimiser and the
bootstrap are harness.scaling.fitting's, shared with the compute-optimal laws.

harness.scaling gathers these and the compute-optimal analyses (harness.scaling.joint and the modules beside it)
under one name.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from harness.results import comparable, comparison_step, paper_results
from harness.scaling.fitting import (
    cell_bootstrap,
    huber,
    huber_grad,
    minimize_from,
    percentile_ci,
    refit_resamples,
    to_plain,
)

HUBER_DELTA = 1e-3  # Besiroglu et al. 2024, following Hoffmann et al. 2022
FORMS = ("power", "floor")
X_COLUMNS = ("gflops", "train_compute_gflops", "train_flops", "params")
N_RESAMPLES = 1000
LEVEL = 0.95
# The fit keeps the exponent b in these bounds; a bootstrap interval that reaches one is not determined.
EXPONENT_BOUNDS = (0.0, 10.0)
# Paper, section 4 / Fig 8: "a strong negative correlation" of FID-50K at 400K steps with Gflops.
PAPER_CORRELATION = -0.93
# L-BFGS-B's options for a law of one variable (its loss divided by delta, so of order one).
LBFGS_OPTIONS = {"maxiter": 500, "ftol": 1e-10, "gtol": 1e-8}


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown scaling-law form {form!r}; allowed: {FORMS}")


def _predict_log(theta: np.ndarray, x: np.ndarray, form: str) -> np.ndarray:
    """Returns log F at x = log(C / C_ref); theta is (a, b) or (e, a, b), batched over a leading axis."""
    theta = np.asarray(theta, dtype=float)
    if form == "power":
        return theta[..., 0, None] - theta[..., 1, None] * x
    return np.logaddexp(theta[..., 0, None], theta[..., 1, None] - theta[..., 2, None] * x)


def _huber_loss_grad(theta: np.ndarray, x: np.ndarray, y: np.ndarray, form: str, delta: float):
    """Returns (sum of Huber losses of log residuals, its gradient in theta)."""
    if form == "power":
        pred = theta[0] - theta[1] * x
        dpred = np.stack([np.ones_like(x), -x])
    else:
        e, a, b = theta
        core = a - b * x
        pred = np.logaddexp(e, core)
        w = np.exp(e - pred)  # d pred / d e; the rest of the weight goes to the power-law term
        dpred = np.stack([w, 1 - w, -(1 - w) * x])
    r = pred - y
    return huber(r, delta).sum(), dpred @ huber_grad(r, delta)


def _init_grid(y: np.ndarray, form: str, exponent_bounds: tuple = EXPONENT_BOUNDS) -> list[np.ndarray]:
    """Returns the starting points of the fit: a small grid over scale, floor and exponent."""
    # The starting exponents scale with the upper bound: a law allowed exponents up to 100 starts up to 20.
    exps = tuple(e * exponent_bounds[1] / EXPONENT_BOUNDS[1] for e in (0.05, 0.2, 0.5, 1.0, 2.0))
    if form == "power":
        return [np.array([y.mean(), b]) for b in exps]
    lo = y.min()
    return [
        np.array([lo + math.log(frac), a, b])
        for frac in (0.05, 0.5, 0.9)
        for a in (y.mean(), y.max())
        for b in exps
    ]


def _bounds(y: np.ndarray, form: str, exponent_bounds: tuple = EXPONENT_BOUNDS) -> list[tuple]:
    # Exponent >= 0: the laws describe a metric that falls with compute. The floor stays below the largest
    # observation and is allowed to vanish (e far below: the floor form then equals the power law).
    if form == "power":
        return [(None, None), exponent_bounds]
    return [(y.min() - 20.0, y.max()), (None, None), exponent_bounds]


def _minimize(x, y, form, starts, delta, exponent_bounds=EXPONENT_BOUNDS):
    """Returns (best theta, its sum of Huber losses, converged) over L-BFGS runs from `starts` (see
    fitting.minimize_from)."""

    # The loss is divided by delta: the same minimiser, but of order one, so the tolerances mean something.
    def loss_grad(theta):
        return tuple(v / delta for v in _huber_loss_grad(theta, x, y, form, delta))

    theta, loss, converged = minimize_from(loss_grad, starts, _bounds(y, form, exponent_bounds), LBFGS_OPTIONS)
    return theta, loss * delta, converged


@dataclass
class ScalingLaw:
    """A fitted law F(C) = F_inf + A (C / C_ref)^(-b) with optional bootstrap draws of its parameters."""

    form: str
    theta: np.ndarray
    c_ref: float
    loss: float
    converged: bool
    n_points: int
    x_name: str = "C"
    metric: str = "fid"
    label: str = "FID"
    step: int | None = None
    boot_thetas: np.ndarray | None = None  # (n_ok, n_params) parameters of the resamples that fitted
    n_resamples: int = 0
    n_failed: int = 0
    level: float = LEVEL
    points: pd.DataFrame | None = field(default=None, repr=False)
    exponent_bounds: tuple[float, float] = EXPONENT_BOUNDS  # the fit kept b within these

    @property
    def exponent(self) -> float:
        return float(self.theta[-1])

    @property
    def f_inf(self) -> float:
        return 0.0 if self.form == "power" else float(math.exp(self.theta[0]))

    @property
    def coefficient(self) -> float:
        """Returns A, the value of F - F_inf at C = C_ref."""
        return float(math.exp(self.theta[-2]))

    def predict(self, c) -> np.ndarray:
        """Returns the fitted F at compute or Gflops `c` (same units as the fitted C)."""
        x = np.log(np.asarray(c, dtype=float) / self.c_ref)
        return np.exp(_predict_log(self.theta, x, self.form))

    def _ci(self, values: np.ndarray | None) -> tuple:
        """Returns the bootstrap percentile bounds (low, high) of `values` (draws on axis 0); NaN without draws."""
        if values is None:
            return (float("nan"), float("nan"))
        return percentile_ci(values, self.level, skip_nan=False)

    @property
    def exponent_ci(self) -> tuple[float, float]:
        """Returns the bootstrap percentile interval of the exponent b (NaN without a bootstrap)."""
        return tuple(
            float(v) for v in self._ci(None if self.boot_thetas is None else self.boot_thetas[:, -1])
        )

    @property
    def f_inf_ci(self) -> tuple[float, float]:
        """Returns the bootstrap percentile interval of the floor F_inf (0 for the pure power law)."""
        if self.form == "power":
            return (0.0, 0.0)
        return tuple(
            float(v) for v in self._ci(None if self.boot_thetas is None else np.exp(self.boot_thetas[:, 0]))
        )

    def predict_interval(self, c) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high) bootstrap percentile bands of the prediction at `c`."""
        if self.boot_thetas is None or len(self.boot_thetas) == 0:
            nan = np.full(np.shape(c), np.nan)
            return nan, nan
        x = np.log(np.atleast_1d(np.asarray(c, dtype=float)) / self.c_ref)
        return self._ci(np.exp(_predict_log(self.boot_thetas, x, self.form)))

    def describe(self) -> str:
        """Returns the law in one line, e.g. 'FID-50K = 5.1 + 40.2 (Gflops / 8.3)^-0.61, b in [0.5, 0.7]'."""
        lo, hi = self.exponent_ci
        pct = f"{100 * self.level:g}%"
        floor = "" if self.form == "power" else f"{self.f_inf:.3g} + "
        law = f"{self.coefficient:.3g} ({self.x_name} / {self.c_ref:.3g})^-{self.exponent:.3f}"
        s = f"{self.label} = {floor}{law}"
        if not math.isnan(lo):
            s += f"; b {pct} CI [{lo:.3f}, {hi:.3f}]"
            if self.form == "floor":
                flo, fhi = self.f_inf_ci
                s += f", F_inf {pct} CI [{flo:.3g}, {fhi:.3g}]"
        s += f"; {self.n_points} points"
        if self.step is not None:
            s += f" at step {self.step}"
        if not self.converged:
            s += " (WARNING: fit did not converge)"
        return s

    def to_dict(self) -> dict:
        """Returns the fit as plain JSON-ready values (Python types only, no numpy scalars)."""
        d = {
            "form": self.form,
            "x": self.x_name,
            "metric": self.metric,
            "label": self.label,
            "step": self.step,
            "c_ref": self.c_ref,
            "f_inf": self.f_inf,
            "coefficient": self.coefficient,
            "exponent": self.exponent,
            "exponent_ci": list(self.exponent_ci),
            "f_inf_ci": list(self.f_inf_ci),
            "level": self.level,
            "huber_delta": HUBER_DELTA,
            "loss": self.loss,
            "converged": self.converged,
            "n_points": self.n_points,
            "n_resamples": self.n_resamples,
            "n_failed": self.n_failed,
            "law": self.describe(),
        }
        return to_plain(d)


def pareto_mask(c, f) -> np.ndarray:
    """Returns a boolean mask of the points that reach a lower F than every point of lower or equal C."""
    c, f = np.asarray(c, dtype=float), np.asarray(f, dtype=float)
    order = np.lexsort((f, c))
    keep = np.zeros(len(c), dtype=bool)
    best = np.inf
    for i in order:
        if f[i] < best:
            keep[i], best = True, f[i]
    return keep


# Important: L-BFGS-B calls BLAS on 3-vectors thousands of times per bootstrap; multi-threaded BLAS spends
# ~10x the compute waking threads (measured 50 s against 3 s for 1,000 resamples on 2 busy cores).
@threadpool_limits.wrap(limits=1)
def fit_law(
    c,
    f,
    form: str = "floor",
    groups=None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    frontier: bool = False,
    delta: float = HUBER_DELTA,
    exponent_bounds: tuple[float, float] = EXPONENT_BOUNDS,
    **meta,
) -> ScalingLaw:
    """Returns the Huber fit of F against C with a bootstrap over `groups` (cells; default one per point).

    With `frontier`, each fit (and each resample) uses only the points on the lower envelope of F over C.
    The exponent b stays within `exponent_bounds`.
    """
    _check_form(form)
    c, f = np.asarray(c, dtype=float), np.asarray(f, dtype=float)
    if c.shape != f.shape or c.ndim != 1:
        raise ValueError(f"C and F must be 1-D arrays of one length, got shapes {c.shape} and {f.shape}")
    bad = ~np.isfinite(c) | ~np.isfinite(f) | (c <= 0) | (f <= 0)
    if bad.any():
        raise ValueError(
            f"C and F must be finite and positive for a log-space fit; bad points: "
            f"{list(zip(c[bad].tolist(), f[bad].tolist()))[:5]}"
        )
    groups = np.arange(len(c)) if groups is None else np.asarray(groups)
    n_params = 2 if form == "power" else 3
    sel = pareto_mask(c, f) if frontier else np.ones(len(c), dtype=bool)
    if len(np.unique(c[sel])) < n_params:
        raise ValueError(
            f"a {form!r} law has {n_params} parameters and needs at least {n_params} distinct C "
            f"values, got {len(np.unique(c[sel]))}"
        )
    c_ref = float(np.exp(np.log(c[sel]).mean()))
    x, y = np.log(c / c_ref), np.log(f)
    starts = _init_grid(y[sel], form, exponent_bounds)
    theta, loss, converged = _minimize(x[sel], y[sel], form, starts, delta, exponent_bounds)
    if not converged:
        warnings.warn(f"{form} law fit did not converge (loss {loss:.3g})", stacklevel=2)

    def resamples():
        """Yields each resample's (x, y), or None when too few distinct C values identify the law."""
        for idx in cell_bootstrap(groups, n_resamples, seed):
            xi, yi, ci = x[idx], y[idx], c[idx]
            if frontier:
                m = pareto_mask(ci, np.exp(yi))
                xi, yi = xi[m], yi[m]
            yield (xi, yi) if len(np.unique(xi)) >= n_params else None

    # The fallback, one grid start, catches resamples whose optimum lies far away (e.g. the floor vanishes).
    boot, n_failed = refit_resamples(
        resamples(),
        lambda xy, starts_i: _minimize(*xy, form, starts_i, delta, exponent_bounds),
        theta,
        starts[len(starts) // 2],
        n_params,
    )
    return ScalingLaw(
        form=form,
        theta=theta,
        c_ref=c_ref,
        loss=loss,
        converged=converged,
        n_points=int(sel.sum()),
        # (0, n_params) when every resample failed, so the intervals below are NaN rather than an IndexError.
        boot_thetas=boot if n_resamples else None,
        n_resamples=n_resamples,
        n_failed=n_failed,
        level=level,
        exponent_bounds=tuple(exponent_bounds),
        **meta,
    )


def _x_label(x: str) -> str:
    return {
        "gflops": "Gflops",
        "train_compute_gflops": "training compute (Gflops)",
        "train_flops": "training FLOPs",
        "params": "parameters",
    }[x]


def select_points(
    df: pd.DataFrame,
    x: str = "gflops",
    metric: str = "fid",
    step: int | None = None,
    allow_mixed: bool = False,
    cond: str | None = "adaln_zero",
) -> tuple[pd.DataFrame, str, int | None]:
    """Returns (rows to fit, metric label, step) for F against `x`.

    Against Gflops or params the cells are compared at one step (default: the step evaluated in most
    cells, the grid's planned length); against training compute every evaluated step counts. Only
    `cond` cells are used (the paper's grid is adaLN-Zero); cond=None keeps all.
    """
    if x not in X_COLUMNS:
        raise ValueError(f"unknown x column {x!r}; allowed: {X_COLUMNS}")
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    if cond is not None:
        rows = rows[rows["cond"] == cond]
        if rows.empty:
            raise ValueError(
                f"no evaluated cell with cond={cond!r}; conds present: {sorted(df['cond'].unique())}"
            )
    if x in ("gflops", "params"):
        step = comparison_step(rows, metric) if step is None else int(step)
        rows = rows[rows["step"] == step]
        if rows.empty:
            raise ValueError(
                f"no cell has {metric!r} at step {step}; evaluated steps: "
                f"{sorted(df.loc[df[metric].notna(), 'step'].unique().tolist())}"
            )
    elif step is not None:
        rows = rows[rows["step"] <= step]
    return rows, label, step


def fit_table(
    df: pd.DataFrame,
    x: str = "gflops",
    metric: str = "fid",
    form: str = "floor",
    step: int | None = None,
    frontier: bool | None = None,
    allow_mixed: bool = False,
    cond: str | None = "adaln_zero",
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> ScalingLaw:
    """Returns the fitted law of `metric` against `x` from a results table, bootstrapped over cells.

    Against training compute the fit uses the compute frontier by default (the best cell at each budget).
    """
    rows, label, step = select_points(df, x, metric, step, allow_mixed, cond)
    if frontier is None:
        frontier = x in ("train_compute_gflops", "train_flops")
    law = fit_law(
        rows[x].to_numpy(),
        rows[metric].to_numpy(),
        form=form,
        groups=rows["cell_id"].to_numpy(),
        n_resamples=n_resamples,
        seed=seed,
        level=level,
        frontier=frontier,
        x_name=_x_label(x),
        metric=metric,
        label=label,
        step=step,
    )
    law.points = rows.iloc[np.flatnonzero(pareto_mask(rows[x], rows[metric]))] if frontier else rows
    return law


def extrapolation_check(
    df: pd.DataFrame,
    x: str = "gflops",
    metric: str = "fid",
    form: str = "power",
    n_holdout: int = 2,
    step: int | None = None,
    allow_mixed: bool = False,
    cond: str | None = "adaln_zero",
) -> pd.DataFrame:
    """Returns, for the `n_holdout` most expensive points, the law fitted on the rest and its error.

    Columns: cell_id, x, observed, predicted, rel_error (predicted / observed - 1). Against training compute
    the held-out points are the frontier's most expensive ones.
    """
    rows, _, step = select_points(df, x, metric, step, allow_mixed, cond)
    if x in ("train_compute_gflops", "train_flops"):
        rows = rows.iloc[np.flatnonzero(pareto_mask(rows[x], rows[metric]))]
    rows = rows.sort_values(x)
    n_params = 2 if form == "power" else 3
    if not 1 <= n_holdout <= len(rows) - n_params:
        raise ValueError(
            f"n_holdout={n_holdout} leaves too few points: {len(rows)} points, a {form!r} law "
            f"needs {n_params} to fit"
        )
    train, test = rows.iloc[:-n_holdout], rows.iloc[-n_holdout:]
    law = fit_law(train[x], train[metric], form=form, n_resamples=0)
    pred = law.predict(test[x])
    return pd.DataFrame(
        {
            "cell_id": test["cell_id"].to_numpy(),
            x: test[x].to_numpy(),
            "observed": test[metric].to_numpy(),
            "predicted": pred,
            "rel_error": pred / test[metric].to_numpy() - 1,
            "n_train": len(train),
        }
    )


def compute_frontier(
    df: pd.DataFrame,
    metric: str = "fid",
    x: str = "train_compute_gflops",
    budgets=None,
    allow_mixed: bool = False,
) -> pd.DataFrame:
    """Returns the compute frontier: for each budget (default: each frontier point), the row with lowest F.

    The result has the budget, and the cell, step, `x` and metric of the best row within that budget.
    """
    rows, _ = comparable(df, metric, allow_mixed=allow_mixed)
    rows = rows.sort_values([x, metric])
    if budgets is None:
        out = rows.iloc[np.flatnonzero(pareto_mask(rows[x], rows[metric]))].sort_values(x)
        return out.assign(budget=out[x].to_numpy()).reset_index(drop=True)
    picks = []
    for budget in np.atleast_1d(budgets):
        within = rows[rows[x] <= budget]
        if within.empty:
            continue
        picks.append(within.loc[within[metric].idxmin()].to_dict() | {"budget": float(budget)})
    return pd.DataFrame(picks)


def correlations(gflops, f) -> dict:
    """Returns the correlations of F with Gflops: Pearson vs log10 Gflops (the paper's), linear, Spearman."""
    g, f = np.asarray(gflops, dtype=float), np.asarray(f, dtype=float)
    if len(g) < 3:
        raise ValueError(f"a correlation needs at least 3 cells, got {len(g)}")
    return {
        "pearson_log10_gflops": float(stats.pearsonr(np.log10(g), f)[0]),
        "pearson_gflops": float(stats.pearsonr(g, f)[0]),
        "pearson_log_log": float(stats.pearsonr(np.log10(g), np.log10(f))[0]),
        "spearman": float(stats.spearmanr(g, f)[0]),
        "n": len(g),
    }


def gflops_correlation(
    df: pd.DataFrame,
    metric: str = "fid",
    step: int | None = None,
    allow_mixed: bool = False,
    cond: str | None = "adaln_zero",
) -> dict:
    """Returns `correlations` of `metric` with Gflops at `step` (default: `comparison_step`)."""
    rows, label, step = select_points(df, "gflops", metric, step, allow_mixed, cond)
    return correlations(rows["gflops"], rows[metric]) | {"step": step, "label": label}


def paper_correlations() -> dict:
    """Returns `correlations` on the paper's Table 4 (12 adaLN-Zero models, FID-50K at 400K steps)."""

    return gflops_correlation(paper_results())
