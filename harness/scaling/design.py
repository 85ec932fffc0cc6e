"""How many cells per size a study's IsoFLOP interval needs, asked of the study's own design before (or after)
its compute is spent.

The IsoFLOP bootstrap resamples n cells from n with replacement. With one cell per size a resample keeps about
two thirds of the sizes (1 - (1 - 1/n)^n), and at a budget that only 3 to 7 sizes reach it often loses the sizes
on one side of the minimum: the resample has no minimum there, and when fewer than MIN_ISOFLOP_BUDGETS budgets
keep one it fails. That is a property of the design (sizes, how far each trains, cells per size), not of the
measurements: on noise-free values it happens all the same.

`isoflop_replicates` measures it. It fits the joint law to the study's validation records, takes the law's
values at exactly the records one cell of each size has, replicates each size k times with the seed-to-seed
spread given (a log-normal offset per cell that lasts its run, and one per record), and runs the IsoFLOP
profiles and their bootstrap over cells, as the report does, on each such study. The law's allocation exponent
is the answer each simulated study should find.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import fit_joint_law
from harness.scaling.powerlaw import LEVEL
from harness.scaling.rows import validation_points

DESIGN_COLUMNS = (
    "cells_per_size", "cells", "cell_sd", "record_sd", "repeats", "n_resamples", "failed_fraction_mean",
    "failed_fraction_max", "determined_fraction", "width_median", "fitted_fraction", "slope_mean", "slope_sd",
    "law_exponent",
)


def _check_design(cells_per_size: Sequence[int], cell_sd: float, record_sd: float, repeats: int,
                  n_resamples: int) -> list[int]:
    """Returns `cells_per_size` as ints; ValueError naming the bad value and what is allowed."""
    values = np.atleast_1d(cells_per_size).tolist()
    if not values or any(v < 1 or v != int(v) for v in values):
        raise ValueError(f"cells_per_size must be whole numbers >= 1, got {values}")
    for name, sd in (("cell_sd", cell_sd), ("record_sd", record_sd)):
        if not (math.isfinite(sd) and 0 <= sd < 1):
            raise ValueError(f"{name} is a relative standard deviation in [0, 1), got {sd}")
    for name, n in (("repeats", repeats), ("n_resamples", n_resamples)):
        if int(n) != n or n < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {n}")
    return [int(v) for v in values]


def _one_cell_per_size(rows: pd.DataFrame) -> pd.DataFrame:
    """Returns the records of the first cell (by cell_id) of each size: the design each replicate repeats."""
    first = rows.sort_values("cell_id").groupby("gflops", sort=True)["cell_id"].first()
    return rows[rows["cell_id"].isin(set(first))].reset_index(drop=True)


def isoflop_replicates(
    val_df: pd.DataFrame,
    cells_per_size: Sequence[int] = (1, 2, 3, 4),
    cell_sd: float = 0.03,
    record_sd: float = 0.01,
    repeats: int = 8,
    n_resamples: int = 400,
    seed: int = 0,
    metric: str = "val_loss_ema",
    level: float = LEVEL,
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
) -> pd.DataFrame:
    """Returns a row per entry of `cells_per_size`: what `repeats` simulated studies with that many cells of each
    size give their IsoFLOP interval (DESIGN_COLUMNS).

    `val_df`: a validation table (harness.results.load_validation) whose joint law is the truth simulated; the
    design is its sizes and the records of the first cell of each. `cell_sd`: the relative spread of a cell's
    level between seeds that lasts its whole run; `record_sd`: one record's own (both log-normal; 0 and 0 give
    the law's values themselves). Each simulated study: default budgets, `n_resamples` resamples of cells, as
    harness.scaling.isoflop decides; a study is determined when no more than the interval's tail of them fails.

    Columns: failed_fraction_mean/max (over the repeats: the share of resamples that fail), determined_fraction
    (the share of repeats that are determined), width_median (the median width of the determined repeats'
    intervals of the exponent; NaN when none is), fitted_fraction (the share of repeats whose full data have a
    line through MIN_ISOFLOP_BUDGETS minima or more), slope_mean/slope_sd (that line's slope over those repeats)
    and law_exponent (the joint law's a in N_opt ~ C^a: what they should find).
    """
    ks = _check_design(cells_per_size, cell_sd, record_sd, repeats, n_resamples)
    rows = validation_points(val_df, metric, cond, allow_mixed)
    law = fit_joint_law(rows["gflops"], rows["images_seen"], rows[metric], rows["cell_id"], n_resamples=0)
    if not law.converged:
        raise ValueError("the joint law did not converge on these records: there is no law to simulate")
    design = _one_cell_per_size(rows)
    clean = law.predict(design["gflops"].to_numpy(float), design["images_seen"].to_numpy(float))
    out = []
    for k in ks:
        failed, widths, slopes = [], [], []
        for r in range(repeats):
            rng = np.random.default_rng([seed, k, r])
            study = []
            for copy in range(k):
                cells = design["cell_id"].astype(str) + f"#{copy}"
                level_of = {c: rng.normal(0.0, cell_sd) for c in sorted(set(cells))}
                noise = cells.map(level_of).to_numpy() + rng.normal(0.0, record_sd, len(design))
                study.append(pd.DataFrame({"cell_id": cells, "gflops": design["gflops"],
                                           "images_seen": design["images_seen"], metric: clean * np.exp(noise)}))
            iso = isoflop_profiles(pd.concat(study, ignore_index=True), metric=metric, n_resamples=n_resamples,
                                   seed=seed + r, level=level, cond=None)
            failed.append(iso.n_failed / n_resamples)
            if math.isfinite(iso.exponent):
                slopes.append(iso.exponent)
            if iso.determined:
                lo, hi = iso.exponent_ci
                widths.append(hi - lo)
        out.append({
            "cells_per_size": k, "cells": k * design["cell_id"].nunique(), "cell_sd": cell_sd, "record_sd": record_sd,
            "repeats": repeats, "n_resamples": n_resamples, "failed_fraction_mean": float(np.mean(failed)),
            "failed_fraction_max": float(np.max(failed)), "determined_fraction": len(widths) / repeats,
            "width_median": float(np.median(widths)) if widths else math.nan, "fitted_fraction": len(slopes) / repeats,
            "slope_mean": float(np.mean(slopes)) if slopes else math.nan,
            "slope_sd": float(np.std(slopes)) if slopes else math.nan,
            "law_exponent": float(law.allocation_exponents[0]),
        })
    return pd.DataFrame(out, columns=list(DESIGN_COLUMNS))
