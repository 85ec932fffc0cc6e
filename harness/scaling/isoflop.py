"""IsoFLOP profiles (Hoffmann et al. 2022, section 3.2, their Approach 2): at each training budget C, each cell's
metric where it spent C, a parabola in log size, its minimum, and size_opt(C) = k C^a through the minima,
bootstrapped over cells. Units and conventions: harness.scaling.joint's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.core.vocabulary import metric_label
from harness.scaling.fitting import cell_bootstrap, percentile_ci, to_plain
from harness.scaling.powerlaw import LEVEL, N_RESAMPLES
from harness.scaling.rows import MIN_SIZES, _check_cells, validation_points

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
        lo, hi = percentile_ci(self._boot[:, 1], self.level)
        return float(lo), float(hi)

    def size_opt(self, compute) -> np.ndarray:
        """Returns k C^a, the compute-optimal size (size units) at training compute `compute` (Gflops)."""
        return self.coefficient * np.asarray(compute, dtype=float) ** self.exponent

    def size_opt_interval(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """Returns (low, high) bootstrap percentile bands of size_opt at `compute` (Gflops)."""
        c = np.atleast_1d(np.asarray(compute, dtype=float))
        draws = np.exp(self._boot[:, :1] + self._boot[:, 1:2] * np.log(c))
        lo, hi = percentile_ci(draws, self.level)
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
            # the line through the minima of all cells, without an interval: what the data point to even where
            # the bootstrap cannot say how surely (None when fewer than MIN_ISOFLOP_BUDGETS minima)
            "exponent_point": self.exponent if math.isfinite(self.exponent) else None,
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
    metric: str = "val_loss_ema",
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
    profiles = [_profile(c, cells, sizes, values[:, j]) for j, c in enumerate(budgets)]

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
        _bootstrap(result, sizes, values, budgets, n_resamples, seed)
    return result


def _profile(budget: float, cells: list[str], sizes: np.ndarray, values: np.ndarray) -> dict:
    """Returns one budget's profile: its points (the cells with a value there), the parabola in ln(size) and
    its minimum (size_opt, metric_opt), or None for those with the reason.

    `values`: each cell's metric at `budget` (NaN where the cell has none); `sizes` in Gflops, per cell.
    """
    have = np.isfinite(values)
    pts = pd.DataFrame(
        {
            "cell_id": [cells[i] for i in np.flatnonzero(have)],
            "size": sizes[have],
            "images": budget / (FORWARD_BACKWARD_FACTOR * sizes[have]),
            "metric": values[have],
        }
    )
    prof = {"budget": float(budget), "points": pts, "coefficients": None, "size_opt": None, "metric_opt": None}
    n_sizes = len(np.unique(sizes[have]))
    if n_sizes < MIN_SIZES:
        prof["reason"] = f"{n_sizes} distinct sizes have records at this budget; a parabola needs {MIN_SIZES}"
        return prof
    coef, x_min, reason = _parabola_minimum(np.log(sizes)[have], values[have])
    prof["coefficients"], prof["reason"] = tuple(float(v) for v in coef), reason
    if x_min is not None:
        prof["size_opt"] = float(math.exp(x_min))
        prof["metric_opt"] = float(coef[0] + coef[1] * x_min + coef[2] * x_min**2)
    return prof


def _bootstrap(result: IsoFlopResult, sizes: np.ndarray, values: np.ndarray, budgets: np.ndarray,
               n_resamples: int, seed: int) -> None:
    """Sets `result`'s bootstrap draws of (log k, a) over `n_resamples` resamples of cells, its failure count,
    and a note when too many fail. `sizes` (n_cells,) and `values` (n_cells, n_budgets) in the order of the
    cell curves."""
    x = np.log(sizes)
    size_ids = np.unique(sizes, return_inverse=True)[1]
    # A row per cell, numbered in the order of the curves: (n_resamples, n_cells) times each cell was drawn.
    weights = np.stack(list(cell_bootstrap(np.arange(len(sizes)), n_resamples, seed, weights=True)))
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

