"""Validation loss -> FID: FID as a power law of the validation loss (with a floor when the data call for one),
so a loss predicted for a budget becomes a predicted FID. Liang et al. 2024 ("Scaling Laws for Diffusion
Transformers") find DiT's pretraining loss a power law of compute and FID following the loss. The law is
harness.scaling.powerlaw's, fitted on C = 1 / loss; conventions: harness.scaling.joint's docstring.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from harness.results import comparable, evaluated_loss
from harness.scaling.fitting import percentile_ci, to_plain, with_scatter
from harness.scaling.powerlaw import HUBER_DELTA, LEVEL, N_RESAMPLES, ScalingLaw, fit_law
from harness.scaling.rows import NEGLIGIBLE_FRAC, _as_1d, _check_positive, _one_setting

# A diffusion model's validation loss moves by a few percent across a sweep while FID moves several-fold, so
# FID ~ loss^k has k of order 10 (the fixture sweep: ~11); the fit allows up to 100.
LOSS_FID_EXPONENT_BOUNDS = (0.0, 100.0)
LOSS_FID_FORMS = ("power", "floor")


@dataclass
class LossToFid:
    """FID as a function of validation loss: FID = F_inf + A (loss / loss_ref)^k (F_inf = 0 for the power law).

    Fitted by `powerlaw.fit_law` on C = 1 / loss (so its falling law in C is a rising law in the loss), Huber
    in log FID, bootstrap over cells. `alternative` is the form not chosen, `choice` says why.
    """

    law: ScalingLaw
    alternative: ScalingLaw | None
    choice: str
    n_cells: int
    loss_range: tuple[float, float]
    label: str = "FID"
    points: pd.DataFrame | None = field(default=None, repr=False)  # cell_id, step (if known), val_loss, fid
    # What as many real images get against the same reference ({"value", "spread"}: harness.metrics.floors): no
    # prediction is reported below it. None: the records carry no floor.
    floor: dict | None = None
    loss_metric: str = "val_loss_ema"  # the loss the law maps (the EMA model's, as the evaluated weights are)

    def at_floor(self, fid) -> np.ndarray:
        """Returns, per FID value, whether it lies within the floor's spread above the floor or below it: a value
        the metric cannot tell from what real images get (False everywhere without a floor)."""
        fid = np.asarray(fid, dtype=float)
        if self.floor is None:
            return np.zeros(fid.shape, dtype=bool)
        return fid <= self.floor["value"] + max(self.floor["spread"], 0.0)

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
        return percentile_ci(with_scatter(draws, self.log_residuals, seed), self.law.level)

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
        s += f"; {law.n_points} points, {self.n_cells} cells; {self.choice}"
        if self.floor is not None:
            s += f"; the metric's floor (real images): {self.floor['value']:.3g} +- {self.floor['spread']:.2g}"
        return s

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
            "metric_floor": self.floor,
            "loss_metric": self.loss_metric,
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
    loss_metric: str = "val_loss_ema",
) -> tuple[pd.DataFrame, str]:
    """Returns (rows of the results table with both `fid_metric` and `loss_metric`, the FID label).

    The loss is the EMA model's held-out validation loss measured at the evaluation's own step (the FID is the EMA
    model's; the results table never pairs an evaluation with an older validation line). FID settings (sample
    count, extractor and its weights: `harness.results.comparable`; and the settings hash) must agree, and so must
    every training setting off the law's axes, unless `allow_mixed`; ValueError naming cells with non-positive
    values.
    """
    if not isinstance(eval_df, pd.DataFrame):
        raise ValueError(f"expected a results table (pandas DataFrame), got {type(eval_df).__name__}")
    if loss_metric not in eval_df:
        raise ValueError(f"the results table has no {loss_metric} column: no FID can be tied to a validation loss")
    rows, label = comparable(eval_df, fid_metric, allow_mixed=allow_mixed)
    if cond is not None and "cond" in rows:
        rows = rows[rows["cond"] == cond]
    rows = rows[rows[loss_metric].notna()]
    if rows.empty:
        raise ValueError(
            f"no evaluated row has both {fid_metric!r} and {loss_metric} at its own step"
            + (f" (cond={cond!r})" if cond is not None else "")
            + "; the trainer validates at every evaluation step (python -m harness.evaluate run_dir=... step=all "
            "validation=only measures the kept checkpoints of cells trained before it did)"
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
    for col in (fid_metric, loss_metric):
        v = rows[col].to_numpy(dtype=float)
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            raise ValueError(
                f"{col} must be finite and positive; non-positive in cells {sorted(rows.loc[bad, 'cell_id'].unique())}"
            )
    return rows, label


def metric_floor(rows: pd.DataFrame, fid_metric: str = "fid") -> dict | None:
    """Returns the floor of `fid_metric` the rows were measured against, {"value", "spread"} (the median over rows,
    which share one reference, extractor and sample count), or None when the records hold none."""
    col = f"{fid_metric}_floor"
    if col not in rows or rows[col].isna().all():
        return None
    spread = rows.get(f"{col}_spread", pd.Series(dtype=float))
    return {"value": float(rows[col].median()), "spread": float(spread.median()) if spread.notna().any() else 0.0}


def fit_loss_to_fid_table(
    eval_df: pd.DataFrame,
    fid_metric: str = "fid",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    loss_metric: str | None = None,
) -> LossToFid:
    """Returns `fit_loss_to_fid` over every evaluated (cell, step) of the results table with `loss_metric` (default:
    the held-out loss of the weights the evaluations sampled from, `harness.results.evaluated_loss`) at that step,
    with the metric's floor the records carry (`LossToFid.floor`)."""
    loss_metric = loss_metric or evaluated_loss(eval_df)
    rows, label = fid_points(eval_df, fid_metric, cond, allow_mixed, loss_metric)
    fit = fit_loss_to_fid(
        rows[loss_metric].to_numpy(),
        rows[fid_metric].to_numpy(),
        groups=rows["cell_id"].to_numpy(),
        n_resamples=n_resamples,
        seed=seed,
        level=level,
        label=label,
    )
    fit.points = fit.points.assign(step=rows["step"].to_numpy() if "step" in rows else np.nan)
    fit.floor = metric_floor(rows, fid_metric)
    fit.loss_metric = loss_metric
    return fit
