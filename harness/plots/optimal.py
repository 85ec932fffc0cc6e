"""Figures of the compute-optimal analyses: IsoFLOP profiles, size_opt(C), loss -> FID, the joint law's fit.

One function per figure, each drawing a fitted result of `harness.scaling` (joint, isoflop, loss_to_fid) and
returning a matplotlib Figure, in the style of `harness.plots.figures` (labelled axes with units, log scales, the
legend right of the data).
Artists carry a gid so tests can find what each figure shows: "points", "parabola" (a profile with a minimum
inside the trained sizes), "parabola_rejected" (one without), "minimum", "fit", "band", "joint", "joint_band",
"trained", "identity", "held_out".
"""

from __future__ import annotations

import math
import textwrap

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes and in tests
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from harness.plots.figures import (  # noqa: E402
    COMPUTE_LABEL,
    FIG_HEIGHT,
    FIT_X_EXTEND,
    LEGEND_WIDTH,
    MAIN_WIDTH,
    _finish,
    _legend_outside,
)
from harness.scaling.isoflop import IsoFlopResult  # noqa: E402
from harness.scaling.joint import JointLaw  # noqa: E402
from harness.scaling.loss_to_fid import LossToFid  # noqa: E402

SIZE_LABEL = "model size: forward Gflops per image (log scale)"
BUDGET_CMAP = "viridis"
MINIMUM_STYLE = {"marker": "D", "s": 60, "facecolors": "none", "edgecolors": "k", "linewidths": 1.4, "zorder": 6}
REJECTED_STYLE = {"linestyle": ":", "lw": 1.0, "alpha": 0.7}


def _figure(width: float = MAIN_WIDTH):
    """Returns (figure, Axes) with room for a legend right of the Axes."""
    return plt.subplots(figsize=(width + LEGEND_WIDTH, FIG_HEIGHT), layout="constrained")


def _budget_colors(budgets: np.ndarray) -> list:
    """Returns a colour per budget, by log budget along BUDGET_CMAP (dark = small)."""
    cmap = plt.get_cmap(BUDGET_CMAP)
    lb = np.log(budgets)
    span = lb.max() - lb.min()
    return [cmap(0.85 * (v - lb.min()) / span if span > 0 else 0.4) for v in lb]


def _plain_log_ticks(axis) -> None:
    """Labels a log axis with plain numbers (0.12, 30), also at minor ticks: a loss or FID axis spans less than a
    decade, where the default labels read '1.2 x 10^-1' and overlap."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:.3g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt)


class _PlainWhereLabelled(matplotlib.ticker.Formatter):
    """Labels a log axis's ticks where its default formatter does (matplotlib picks a subset of the minor ticks),
    as plain numbers (0.003) rather than 3 x 10^-3, whose width made neighbours overlap; over more than a decade
    only 1, 2 and 5 (0.002, 0.005, 0.01), and never more than MAX_LABELS (every second one, or third, ...): closer
    neighbours touch."""

    MAX_LABELS = 6

    def __init__(self, default: matplotlib.ticker.Formatter):
        self.default = default
        self.labelled = np.empty(0)

    def set_locs(self, locs) -> None:
        self.default.set_locs(locs)  # where the default decides which ticks get a label
        lo, hi = sorted(self.default.axis.get_view_interval())
        sparse = lo > 0 and math.log10(hi / lo) > 1
        keep = [x for x in sorted(locs) if lo <= x <= hi and self.default(x)
                and (not sparse or round(x / 10 ** math.floor(math.log10(x) + 1e-9)) in (1, 2, 5))]
        self.labelled = np.array(keep[::max(1, math.ceil(len(keep) / self.MAX_LABELS))])

    def __call__(self, x, pos=None) -> str:
        return f"{x:.3g}" if np.isclose(self.labelled, x, rtol=1e-9, atol=0).any() else ""


def _plain_where_labelled(axis) -> None:
    axis.set_major_formatter(_PlainWhereLabelled(axis.get_major_formatter()))
    axis.set_minor_formatter(_PlainWhereLabelled(axis.get_minor_formatter()))


def _distinct_numbers(values) -> list[str]:
    """Returns each value with the fewest significant digits (2 to 6) that tell them all apart: budgets close
    together (a grid whose cells all stop near one compute) would otherwise read alike in a legend."""
    for digits in range(2, 7):
        texts = [f"{v:.{digits}g}" for v in values]
        if len(set(texts)) == len(texts):
            return texts
    return texts


def _wrap(text: str, width: int = 48) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _ci_text(lo: float, hi: float, fmt: str = ".2f") -> str:
    return "" if math.isnan(lo) else f" [{lo:{fmt}}, {hi:{fmt}}]"


def fig_isoflop_profiles(iso: IsoFlopResult):
    """Returns the IsoFLOP profiles (Hoffmann et al. 2022, Fig 3 left): the metric against size at each budget,
    its parabola in log size and the minimum. A budget whose parabola has no minimum inside the sizes trained
    there is drawn dotted and its legend entry says why; a budget with too few sizes shows its points only.
    """
    with_points = [p for p in iso.profiles if len(p["points"])]
    if not with_points:
        raise ValueError("no IsoFLOP budget has any cell with records there: nothing to draw")
    fig, ax = _figure()
    colors = _budget_colors(iso.budgets)
    values = []
    for p, color, budget in zip(iso.profiles, colors, _distinct_numbers(iso.budgets)):
        pts = p["points"]
        if not len(pts):
            continue
        values.append(pts["metric"].to_numpy())
        label = f"C = {budget} Gflops"
        if p["size_opt"] is None:
            label += " (no minimum: " + ("too few sizes)" if p["coefficients"] is None else "outside the sizes)")
        ax.scatter(pts["size"], pts["metric"], color=color, s=22, zorder=4, label=label, gid="points")
        if p["coefficients"] is not None:
            c0, c1, c2 = p["coefficients"]
            xs = np.linspace(np.log(pts["size"].min()), np.log(pts["size"].max()), 100)
            ys = c0 + c1 * xs + c2 * xs**2
            if p["size_opt"] is None:
                ax.plot(np.exp(xs), ys, color=color, gid="parabola_rejected", **REJECTED_STYLE)
            else:
                ax.plot(np.exp(xs), ys, color=color, lw=1.2, gid="parabola")
                ax.scatter([p["size_opt"]], [p["metric_opt"]], gid="minimum", **MINIMUM_STYLE)
    if iso.minima:
        ax.scatter([], [], label="minimum of the parabola", **MINIMUM_STYLE)
    _finish(ax, SIZE_LABEL, iso.label)
    _plain_where_labelled(ax.xaxis)
    v = np.concatenate(values)
    pad = 0.08 * (v.max() - v.min()) if v.max() > v.min() else 0.05 * abs(v.max())
    ax.set_ylim(v.min() - pad, v.max() + pad)  # from the points: a rejected parabola may dive far below
    ax.set_title(f"IsoFLOP profiles of {iso.label} (Hoffmann et al. 2022, Approach 2)", fontsize=10)
    _legend_outside(ax)
    return fig


def fig_size_opt(iso: IsoFlopResult | None, joint: JointLaw | None = None, sizes_trained=None):
    """Returns size_opt against training compute: the IsoFLOP minima, their power law with its bootstrap band,
    and, given `joint`, the joint law's compute-optimal size with its band (Approach 3) for comparison.

    `sizes_trained` (low, high) Gflops shades the sizes the sweep trained (default: from the IsoFLOP points).
    """
    minima = iso.minima if iso is not None else []
    joint_ok = joint is not None and joint.optimum_determined
    if not minima and not joint_ok:
        raise ValueError(
            "nothing to draw: no IsoFLOP budget has a minimum inside the trained sizes and no determined joint law"
        )
    fig, ax = _figure()
    budgets = [p["budget"] for p in minima]
    if iso is not None and iso.profiles:
        budgets += list(iso.budgets)
    if joint_ok and joint.points is not None:
        pts = joint.points
        budgets += [float((3 * pts["size"] * pts["images"]).min()), float((3 * pts["size"] * pts["images"]).max())]
    c = np.geomspace(min(budgets) / FIT_X_EXTEND, max(budgets) * FIT_X_EXTEND, 100)
    if sizes_trained is None and iso is not None and iso.profiles:
        all_sizes = np.concatenate([p["points"]["size"].to_numpy() for p in iso.profiles])
        sizes_trained = (all_sizes.min(), all_sizes.max()) if len(all_sizes) else None
    if sizes_trained is None and joint is not None and joint.points is not None:
        sizes_trained = (joint.points["size"].min(), joint.points["size"].max())
    if sizes_trained is not None:
        ax.axhspan(*sizes_trained, color="0.9", zorder=0, label="sizes trained", gid="trained")
    if minima:
        ax.scatter(
            [p["budget"] for p in minima],
            [p["size_opt"] for p in minima],
            color="k",
            s=36,
            zorder=5,
            label="IsoFLOP minima",
            gid="minimum",
        )
    if iso is not None and iso.determined:
        lo, hi = iso.exponent_ci
        ax.plot(
            c,
            iso.size_opt(c),
            "k-",
            lw=1.2,
            label=f"IsoFLOP: size_opt ~ C^{iso.exponent:.2f}{_ci_text(lo, hi)}",
            gid="fit",
        )
        band_lo, band_hi = iso.size_opt_interval(c)
        if np.isfinite(band_lo).all():
            ax.fill_between(
                c, band_lo, band_hi, color="k", alpha=0.12, label=f"{100 * iso.level:g}% bootstrap band", gid="band"
            )
    elif minima:
        ax.plot([], [], " ", label="IsoFLOP power law: not determined")
    if joint_ok:
        (a_lo, a_hi), _ = joint.allocation_exponents_ci
        size, _ = joint.optimal(c)
        ax.plot(
            c,
            size,
            color="#c44e52",
            lw=1.2,
            ls="--",
            label=f"joint law: size_opt ~ C^{joint.allocation_exponents[0]:.2f}{_ci_text(a_lo, a_hi)}",
            gid="joint",
        )
        band = joint.optimal_interval(c)["size"]
        if np.isfinite(band[0]).all():
            ax.fill_between(c, *band, color="#c44e52", alpha=0.12, label="joint law band", gid="joint_band")
    _finish(ax, COMPUTE_LABEL, "compute-optimal size: Gflops per image (log)", logy=True)
    ax.set_title("Compute-optimal model size against training compute", fontsize=10)
    _legend_outside(ax)
    return fig


def fig_loss_to_fid(fit: LossToFid):
    """Returns FID against validation loss (log-log): the evaluations, the fitted law and its bootstrap band.

    The legend names the form chosen (power law, or with a floor) and why.
    """
    if fit.points is None or not len(fit.points):
        raise ValueError("no (validation loss, FID) points to draw")
    fig, ax = _figure()
    pts = fit.points
    ax.scatter(pts["val_loss"], pts["fid"], color="#4c72b0", s=20, zorder=4, label="evaluations", gid="points")
    loss = np.geomspace(pts["val_loss"].min() / FIT_X_EXTEND**0.1, pts["val_loss"].max() * FIT_X_EXTEND**0.1, 100)
    y_lo, y_hi = pts["fid"].min() / 1.25, pts["fid"].max() * 1.25
    if fit.floor is not None:  # what as many real images get: no prediction is read below it
        f, s = fit.floor["value"], max(fit.floor["spread"], 0.0)
        ax.axhspan(max(f - s, 1e-12), f + s, color="0.5", alpha=0.25, lw=0, zorder=1, gid="floor")
        ax.axhline(f, color="0.4", lw=0.8, ls="--", zorder=1, label=f"floor: real images ({f:.3g} +- {s:.2g})")
        y_lo = min(y_lo, max(f - s, f / 2) / 1.25)
    if fit.determined:
        lo, hi = fit.law.exponent_ci
        floor = f"{fit.law.f_inf:.3g} + " if fit.form == "floor" else ""
        label = f"{fit.label} = {floor}A (loss / {fit.loss_ref:.3g})^k, k = {fit.exponent:.3g}{_ci_text(lo, hi, '.3g')}"
        ax.plot(loss, fit.predict(loss), "k-", lw=1.2, label=_wrap(f"{label}; {fit.choice}"), gid="fit")
        band_lo, band_hi = fit.predict_interval(loss)
        if np.isfinite(band_lo).all():
            ax.fill_between(
                loss,
                np.clip(band_lo, y_lo, y_hi),
                np.clip(band_hi, y_lo, y_hi),
                color="k",
                alpha=0.12,
                label=f"{100 * fit.law.level:g}% bootstrap band",
                gid="band",
            )
    else:
        ax.plot([], [], " ", label=_wrap(f"law not determined: {fit.choice}"))
    loss_name = "EMA validation loss" if fit.loss_metric == "val_loss_ema" else fit.loss_metric
    _finish(ax, f"{loss_name} (log scale)", f"{fit.label} (log scale)", logy=True)
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)
    ax.set_ylim(y_lo, y_hi)
    ax.set_title(f"{fit.label} against validation loss, {fit.n_cells} cells", fontsize=10)
    _legend_outside(ax)
    return fig


def fig_joint_predicted(joint: JointLaw, holdout: dict | None = None):
    """Returns the joint law's prediction against the measured metric (log-log) with the line y = x, points
    coloured by size; `holdout` (the "joint" part of `holdout_check`) adds the held-out records with their
    prediction intervals, predicted by the law fitted without them."""
    if joint.points is None or not len(joint.points):
        raise ValueError("the joint law carries no fitted points to draw")
    fig, ax = plt.subplots(figsize=(MAIN_WIDTH + 1.2, FIG_HEIGHT + 0.6), layout="constrained")
    pts = joint.points
    norm = matplotlib.colors.LogNorm(pts["size"].min(), max(pts["size"].max(), pts["size"].min() * 1.01))
    sc = ax.scatter(
        pts["metric"],
        pts["predicted"],
        c=pts["size"],
        cmap=BUDGET_CMAP,
        norm=norm,
        s=16,
        zorder=4,
        label=f"fitted records ({joint.n_points})",
        gid="points",
    )
    values = [pts["metric"].to_numpy(), pts["predicted"].to_numpy()]
    rows = (holdout or {}).get("rows") or []
    if rows:
        m = np.array([r["measured"] for r in rows])
        p = np.array([r["predicted"] for r in rows])
        err = np.abs(np.array([[r["low"] for r in rows], [r["high"] for r in rows]]) - p)
        ax.errorbar(
            m,
            p,
            yerr=err,
            fmt="o",
            mfc="none",
            color="#c44e52",
            ms=6,
            zorder=5,
            label=f"held out ({len(rows)}), prediction interval",
            gid="held_out",
        )
        values += [m, p]
    v = np.concatenate(values)
    lim = (v.min() / 1.02, v.max() * 1.02)
    ax.plot(lim, lim, "k-", lw=0.8, label="prediction = measurement", gid="identity")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    _finish(ax, f"measured {joint.label} (log scale)", "joint-law prediction (log scale)", logy=True)
    _plain_log_ticks(ax.xaxis)
    _plain_log_ticks(ax.yaxis)
    fig.colorbar(sc, ax=ax, label="size: forward Gflops per image (log scale)", pad=0.02)
    ax.set_title("Joint law E + A / N^alpha + B / D^beta: prediction against measurement", fontsize=10)
    # Below the axes: the colour bar takes the right-hand side.
    fig.legend(loc="outside lower center", ncol=3, fontsize=7)
    return fig
