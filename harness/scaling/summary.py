"""What a compute budget buys, for the report: per budget the compute-optimal size, images, validation loss and
FID with intervals, from the joint law, the IsoFLOP profiles and loss -> FID, with the held-out check and notes
on what could not be determined. Plain JSON-ready values; harness.report writes them as Markdown. Units and
conventions: harness.scaling.joint's docstring.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.core.vocabulary import metric_label
from harness.results import evaluated_loss
from harness.scaling.fitting import percentile_ci, to_plain
from harness.scaling.heldout import HOLDOUT_RESAMPLES, holdout_check
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import fit_joint_law
from harness.scaling.loss_to_fid import fit_loss_to_fid_table
from harness.scaling.powerlaw import EXPONENT_BOUNDS, LEVEL, N_RESAMPLES
from harness.scaling.rows import NEGLIGIBLE_FRAC, validation_points

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
    metric: str | None = None,
    fid_metric: str = "fid",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
    holdout_resamples: int = HOLDOUT_RESAMPLES,
    level: float = LEVEL,
    fits: dict | None = None,
) -> dict:
    """Returns what a compute budget buys: per budget the compute-optimal size, images, `metric` and FID.

    `metric` (default: the held-out validation loss of the weights the evaluations sampled from, EMA unless every
    record sampled the raw model: `harness.results.evaluated_loss`) is what the joint law and the IsoFLOP
    profiles fit and what the loss-to-FID law maps, so that the predicted loss and the FID it maps to are of one
    set of weights.

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
    metric = metric or evaluated_loss(eval_df)
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
        # the fewest cells (seeds) of one size: with one, the bootstrap over cells cannot see seed-to-seed spread
        "cells_per_size": int(rows.groupby("gflops")["cell_id"].nunique().min()),
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
        fid = fit_loss_to_fid_table(eval_df, fid_metric, cond, allow_mixed, n_resamples, seed, level, metric)
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
        (s_lo, s_hi), (i_lo, i_hi), (l_lo, l_hi) = (percentile_ci(d, level) for d in (s_draws, i_draws, l_draws))
        if fid is not None:
            f_pt = fid.predict(loss_pt)
            f_lo, f_hi = percentile_ci(fid.predict_draws(l_draws), level)
    per = []
    for j, c in enumerate(budgets):
        b = {"compute_gflops": float(c), "beyond_sweep": bool(beyond[j])}
        b["size_opt"] = _value(size[j], s_lo[j], s_hi[j]) if ok else None
        b["images_opt"] = _value(images[j], i_lo[j], i_hi[j]) if ok else None
        b[metric] = _value(loss_pt[j], l_lo[j], l_hi[j]) if ok else None
        b["fid"] = _value(f_pt[j], f_lo[j], f_hi[j]) if ok and fid is not None else None
        if b["fid"] is not None and bool(fid.at_floor(f_pt[j])):
            # below what real images get: the metric cannot tell this model from the data
            b["fid"] = {**b["fid"], "at_floor": True, "floor": fid.floor}
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
