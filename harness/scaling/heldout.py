"""The held-out check: the laws fitted on the cheaper cells predict the largest sizes, with prediction intervals,
against what those cells measured. The laws are harness.scaling.joint's, isoflop's and loss_to_fid's.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from harness.core.vocabulary import metric_label
from harness.results import evaluated_loss
from harness.scaling.fitting import percentile_ci, to_plain, with_scatter
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import JointLaw, fit_joint_law
from harness.scaling.loss_to_fid import fid_points, fit_loss_to_fid
from harness.scaling.powerlaw import LEVEL
from harness.scaling.rows import MIN_SIZES, validation_points

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
    metric: str | None = None,
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
    metric = metric or evaluated_loss(eval_df)  # the loss of the evaluated weights (harness.results)
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
        out.update(_holdout_fid(eval_df, cut, joint, fid_metric, n_resamples, seed, level, cond, allow_mixed,
                                metric))
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


def _holdout_fid(eval_df, cut, joint, fid_metric, n_resamples, seed, level, cond, allow_mixed,
                 loss_metric: str = "val_loss_ema") -> dict:
    """Returns {"loss_to_fid": FID of held-out evaluations from their measured loss, and, with a joint law,
    "fid_from_predicted_loss": from the loss the joint law predicts}, each with prediction intervals."""
    frows, label = fid_points(eval_df, fid_metric, cond, allow_mixed, loss_metric)
    held = frows["gflops"] >= cut
    if not held.any():
        raise ValueError(f"no held-out cell (Gflops >= {cut:g}) has an evaluation with {fid_metric} and {loss_metric}")
    cheap = frows[~held]
    fit = fit_loss_to_fid(cheap[loss_metric], cheap[fid_metric], cheap["cell_id"], n_resamples, seed, level, label)
    if not fit.determined:
        raise ValueError(f"{label} against loss on the cheaper cells is not determined ({fit.choice})")
    t = frows[held]
    pred = fit.predict(t[loss_metric].to_numpy())
    lo, hi = fit.prediction_interval(t[loss_metric].to_numpy(), seed)
    rows = [{"cell_id": str(c), "step": int(s), loss_metric: float(v)}
            | _interval_row(float(m), float(p), float(a), float(b))
            for c, s, v, m, p, a, b in zip(t["cell_id"], t["step"], t[loss_metric], t[fid_metric], pred, lo, hi)]
    out = {"loss_to_fid": {"rows": rows, **_errors(rows), "law": fit.describe()}}
    if joint is not None and joint.boot_thetas is not None and len(joint.boot_thetas):
        size, images = t["gflops"].to_numpy(float), t["images_seen"].to_numpy(float)
        # One record's loss scatters about the joint law, its FID about the loss -> FID law: both enter.
        loss_draws = with_scatter(joint.draws(size, images), joint.log_residuals, seed)
        fid_draws = with_scatter(fit.predict_draws(loss_draws), fit.log_residuals, seed + 1)
        fid_lo, fid_hi = percentile_ci(fid_draws, level)
        fid_pt = fit.predict(joint.predict(size, images))
        chain = [{"cell_id": str(c), "step": int(s)} | _interval_row(float(m), float(p), float(a), float(b))
                 for c, s, m, p, a, b in zip(t["cell_id"], t["step"], t[fid_metric], fid_pt, fid_lo, fid_hi)]
        out["fid_from_predicted_loss"] = {"rows": chain, **_errors(chain)}
    return out

