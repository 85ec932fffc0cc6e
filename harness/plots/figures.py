"""The paper's figures from a results table, with the paper's own numbers drawn alongside.

One function per figure (Fig 2, 5, 6, 8, 9 of Peebles & Xie 2023) and Table 4; the notebooks, the report
and the tests call these, so they all draw the same thing. Each returns a matplotlib Figure.

Any model name is drawn: the paper's sizes S/B/L/XL keep their colours, other sizes (e.g. `demo-S`) get
their own, in order of parameter count. The paper's values (stars) share the axes only when the sweep's
numbers are in the same units (FID from the `inception-v3-compat` extractor); otherwise they go to a
separate panel labelled `PAPER_PANEL_TITLE`. Artists carry a gid ("sweep", "paper", "fit", "band") and
the paper panel the Axes label "paper", so tests can find what each axis shows.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes and in tests
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from harness.core.cli import one_line  # noqa: E402
from harness.core.runfolder import atomic_open  # noqa: E402
from harness.core.vocabulary import NAMES, PAPER_EXTRACTOR  # noqa: E402
from harness.results import (  # noqa: E402
    EPOCHS_WORTH_LESS,  # noqa: E402
    comparable,
    comparison_step,
    paper_results,
    variant,
    variants,
)
from harness.scaling import EXPONENT_BOUNDS, ScalingLaw, gflops_correlation, select_points  # noqa: E402

SIZES = ("S", "B", "L", "XL")
PATCHES = (8, 4, 2)
SIZE_COLORS = {"S": "#4c72b0", "B": "#55a868", "L": "#dd8452", "XL": "#c44e52"}
# Sizes off the paper's grid take these in order of parameter count; none is close to a paper size's
# colour, so a figure with both never mixes up demo-B and B. Cycled beyond eight sizes.
EXTRA_SIZE_COLORS = ("#8172b3", "#64b5cd", "#937860", "#da8bc3", "#ccb974", "#2a9d8f", "#6d597a", "#8c8c8c")
PATCH_STYLES = {8: ":", 4: "--", 2: "-"}
PATCH_MARKERS = {8: "s", 4: "^", 2: "o"}
OTHER_PATCH_STYLE, OTHER_PATCH_MARKER = "-.", "D"
COND_COLORS = {"in_context": "#8172b3", "cross_attn": "#937860", "adaln": "#da8bc3", "adaln_zero": "#c44e52"}
COND_NAMES = {
    "in_context": "In-Context",
    "cross_attn": "Cross-Attention",
    "adaln": "adaLN",
    "adaln_zero": "adaLN-Zero",
}
PAPER_LABEL = "paper (FID-50K, ImageNet 256, 400K steps)"
PAPER_PANEL_TITLE = "paper: FID-50K, ImageNet 256, DiT S..XL"
PAPER_STYLE = {"marker": "*", "s": 120, "facecolors": "none", "linewidths": 1.2, "zorder": 5}
GFLOPS_LABEL = "transformer Gflops (forward pass, one image; log scale)"
COMPUTE_LABEL = "training compute (Gflops x batch x steps x 3; log scale)"
STEPS_LABEL = "training steps"
PANEL_X_LABELS = {"gflops": "transformer Gflops (log)", "train_compute_gflops": "training compute, Gflops (log)"}
# Bubble area is proportional to Gflops, the sweep's largest model drawn at the size of the paper's XL/2
# (~700 pt^2); the smallest bubbles keep a visible minimum (a 100x range of Gflops would draw a 7 pt^2 dot).
PANEL_NOTE_CHARS = 160  # why a panel is empty, in one line that fits under it
BUBBLE_MAX_AREA = 700.0
BUBBLE_MIN_AREA = 15.0
Y_PAD_FRAC = 0.08  # linear y: margin above and below the data, as a fraction of its range
Y_PAD_LOG = 1.25  # log y: margin factor above and below the data
FIT_X_EXTEND = 1.25  # a fitted law is drawn a factor this far beyond its data's x-range, no further
# A floor whose bootstrap interval reaches below this fraction of the best value measured is not told apart
# from no floor at all: the pure power law says the same with one parameter fewer.
FLOOR_ZERO_FRAC = 0.01
# Inches; the legend sits right of the main axes (never over data) and gets its own width.
MAIN_WIDTH, LEGEND_WIDTH, PANEL_WIDTH, FIG_HEIGHT = 5.6, 2.8, 3.6, 4.6


def _name(model, patch) -> str:
    return f"{model}/{int(patch)}"


def with_variants(df: pd.DataFrame) -> pd.DataFrame:
    """Returns `df` with each cell's training variant (objective, parametrization; results.variant) added to
    its model name when the table holds more than one, e.g. 'demo-S flow': every figure then draws, colours
    and names the variants apart (their legends say which is which) without a figure knowing of them."""
    if len(variants(df)) < 2:
        return df
    out = df.copy()
    tags = [variant(o, p) for o, p in zip(out["objective"], out["parametrization"])]
    out["model"] = [f"{m} {t}".strip() for m, t in zip(out["model"], tags)]
    return out


def _paper(cond: str | None = "adaln_zero", step: int | None = 400_000) -> pd.DataFrame:
    t = paper_results()
    if cond is not None:
        t = t[t["cond"] == cond]
    return t if step is None else t[t["step"] == step]


def size_order(df: pd.DataFrame) -> list[str]:
    """Returns the model sizes in `df`, smallest first by parameter count (the paper's order, then name)."""
    params = df.groupby("model")["params"].median()  # params differ a little with the patch size

    def key(m):
        p = params.get(m, np.nan)
        return (p if np.isfinite(p) else math.inf, SIZES.index(m) if m in SIZES else len(SIZES), str(m))

    return sorted(df["model"].dropna().unique(), key=key)


def patch_order(df: pd.DataFrame) -> list[int]:
    """Returns the patch sizes in `df`, largest first (the paper's order: cheapest model first)."""
    return sorted((int(p) for p in df["patch"].dropna().unique()), reverse=True)


def size_colors(df: pd.DataFrame) -> dict[str, str]:
    """Returns a colour per model size: S/B/L/XL keep theirs, others get EXTRA_SIZE_COLORS by parameter count."""
    extra = itertools.cycle(EXTRA_SIZE_COLORS)
    colors = dict(SIZE_COLORS)
    for m in size_order(df):
        if m not in colors:
            colors[m] = next(extra)
    return colors


def _patch_style(patch) -> tuple[str, str]:
    return PATCH_STYLES.get(int(patch), OTHER_PATCH_STYLE), PATCH_MARKERS.get(int(patch), OTHER_PATCH_MARKER)


def paper_comparable(rows: pd.DataFrame, metric: str = "fid") -> bool:
    """Returns True when `rows`' metric is in the paper's units: FID from the paper's Inception features."""
    extractors = set(rows["extractor"].dropna().unique())
    return metric == "fid" and extractors == {PAPER_EXTRACTOR}


def law_problem(law: ScalingLaw) -> str | None:
    """Returns why the bootstrap leaves `law` undetermined, or None when it is determined (or has no bootstrap)."""
    lo, hi = law.exponent_ci
    if math.isnan(lo):
        return None
    b_min, b_max = EXPONENT_BOUNDS
    tol = 1e-3 * (b_max - b_min)
    if law.form == "floor" and (lo <= b_min + tol or hi >= b_max - tol):
        return f"exponent CI [{lo:.2f}, {hi:.2f}] reaches the fit's bounds [{b_min:g}, {b_max:g}]"
    if law.form == "floor":
        flo, fhi = law.f_inf_ci
        best = float(law.points[law.metric].min()) if law.points is not None else float(law.predict(law.c_ref))
        if flo < FLOOR_ZERO_FRAC * best:
            return f"floor CI [{flo:.3g}, {fhi:.3g}] includes ~0"
        if fhi > best:
            return f"floor CI [{flo:.3g}, {fhi:.3g}] reaches above the best value measured ({best:.3g})"
    return None


def choose_law(law: ScalingLaw | None, fallback: ScalingLaw | None = None) -> tuple[ScalingLaw | None, str]:
    """Returns (the law to draw, a short note or ''): `law`, or `fallback` when `law` is undetermined.

    `law_problem(law)` says why in full.
    """
    if law is None or law_problem(law) is None:
        return (fallback if law is None else law), ""
    if fallback is None:
        return law, f"{law.form} law undetermined"
    return fallback, f"{law.form} law undetermined: {fallback.form} law drawn"


def _law_label(law: ScalingLaw, note: str) -> str:
    lo, hi = law.exponent_ci
    ci = "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
    label = f"{law.form} law fit: b = {law.exponent:.2f}{ci}"
    if law.form == "floor":
        label += f", F_inf = {law.f_inf:.3g}"
    return f"{label}\n({note})" if note else label


def _draw_law(ax, law: ScalingLaw | None, note: str, x_lo: float, x_hi: float) -> None:
    """Draws `law` over [x_lo, x_hi] (the data's range, a little extended), its band clipped to the y-limits."""
    if law is None:
        return
    xs = np.logspace(np.log10(x_lo / FIT_X_EXTEND), np.log10(x_hi * FIT_X_EXTEND), 100)
    y_lo, y_hi = ax.get_ylim()  # set from the data before: neither the line nor the band may move them
    ax.plot(xs, law.predict(xs), "k-", lw=1, label=_law_label(law, note), gid="fit", zorder=3)
    lo, hi = law.predict_interval(xs)
    if np.isfinite(lo).all() and np.isfinite(hi).all():
        # Important: a band of a badly determined law reaches 1e7; clipped, it cannot flatten the axis.
        lo, hi = np.clip(lo, y_lo, y_hi), np.clip(hi, y_lo, y_hi)
        ax.fill_between(xs, lo, hi, color="k", alpha=0.12, label=f"{100 * law.level:g}% bootstrap band", gid="band")
    ax.set_ylim(y_lo, y_hi)


def _set_ylim(ax, values, log: bool) -> None:
    """Sets the y-limits from the data drawn on `ax` (a small margin), never from a fit or its band."""
    v = np.concatenate([np.asarray(x, dtype=float).ravel() for x in values])
    v = v[np.isfinite(v) & ((v > 0) if log else True)]
    if not len(v):
        return
    lo, hi = float(v.min()), float(v.max())
    if log:
        ax.set_ylim(lo / Y_PAD_LOG, hi * Y_PAD_LOG)
        return
    pad = Y_PAD_FRAC * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1.0)
    ax.set_ylim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)


def _format_steps(v, _pos=None) -> str:
    """Returns a step count as a tick label: 150 -> '150', 50000 -> '50K', 7e6 -> '7M'."""
    for div, suffix in ((1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _finish(ax, xlabel: str, ylabel: str | None, logx: bool = True, logy: bool = False) -> None:
    if logx:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_format_steps))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _figure(side_panel: bool, width: float = MAIN_WIDTH):
    """Returns (figure, main Axes, paper panel Axes or None); room is left for a legend right of the main Axes."""
    if not side_panel:
        fig, ax = plt.subplots(figsize=(width + LEGEND_WIDTH, FIG_HEIGHT), layout="constrained")
        return fig, ax, None
    fig, (ax, pax) = plt.subplots(
        1,
        2,
        figsize=(width + LEGEND_WIDTH + PANEL_WIDTH, FIG_HEIGHT),
        width_ratios=(width + LEGEND_WIDTH, PANEL_WIDTH),
        layout="constrained",
    )
    return fig, ax, pax


def _legend_outside(ax, **kw):
    """Returns a legend to the right of `ax`, where it cannot cover data."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kw)


def _paper_stars(ax, p: pd.DataFrame, x: str, colors: dict) -> None:
    """Draws the paper's values as stars coloured by size, and one legend entry for them."""
    ax.scatter(p[x], p["fid"], color=[colors[m] for m in p["model"]], gid="paper", **PAPER_STYLE)
    ax.scatter([], [], color="k", label=PAPER_LABEL, **PAPER_STYLE)


def _paper_panel(pax, x: str, colors: dict) -> None:
    """Draws the paper's 12 adaLN-Zero models against `x` on their own axes (other units than the sweep's)."""
    p = _paper()
    _paper_stars(pax, p, x, colors)
    for r in p.itertuples():
        pax.annotate(
            _name(r.model, r.patch), (getattr(r, x), r.fid), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    _finish(pax, PANEL_X_LABELS[x], "paper FID-50K at 400K steps (no guidance)")
    _set_ylim(pax, [p["fid"]], log=False)
    pax.set_title(PAPER_PANEL_TITLE, fontsize=8)
    pax.set_label("paper")


def floor_band(ax, rows: pd.DataFrame, metric: str) -> list:
    """Draws the metric's floor as a grey band (mean +- spread of what as many real images get against the same
    reference; harness.metrics.floors) across the panel, when the rows' records carry it; returns the values it
    spans (for the y-limits), [] when there is none."""
    col = f"{metric}_floor"
    if col not in rows or rows[col].isna().all():
        return []
    mean = float(rows[col].median())
    spread = float(rows.get(f"{col}_spread", pd.Series([0.0])).median() or 0.0)
    n = rows["num_samples"].dropna().iloc[0] if "num_samples" in rows and rows["num_samples"].notna().any() else None
    real = f"{int(n):,} real images" if n is not None else "real images"
    ax.axhspan(mean - spread, mean + spread, color="0.5", alpha=0.25, lw=0, zorder=1, gid="floor")
    ax.axhline(mean, color="0.4", lw=0.8, ls="--", zorder=1, label=f"floor: {real} ({mean:.3g} +- {spread:.2g})")
    return [pd.Series([mean - spread, mean + spread])]


def mark_repeated(ax, rows: pd.DataFrame, x: str, metric: str) -> None:
    """Rings the points measured past EPOCHS_WORTH_LESS epochs of repeated training images (worth less than fresh
    ones, Muennighoff et al. 2023), with a legend entry; nothing when no point is."""
    if "epochs" not in rows:
        return
    past = rows[pd.to_numeric(rows["epochs"], errors="coerce") > EPOCHS_WORTH_LESS]
    if len(past):
        ax.scatter(past[x], past[metric], s=90, facecolors="none", edgecolors="#d62728", linewidths=1.0, zorder=5,
                   gid="repeated", label=f"past {EPOCHS_WORTH_LESS:g} epochs of repeated images")


def _paper_and_axes(ax, pax, values, shared: bool, paper: bool, colors: dict, label: str) -> None:
    """Draws the paper's Table 4 points against Gflops (on `ax` when comparable, else in the side panel
    `pax`), labels the axes and sets y-limits from what `ax` shows."""
    shown = list(values) if isinstance(values, list) else [values]
    if shared:
        p = _paper()
        _paper_stars(ax, p, "gflops", colors)
        shown.append(p["fid"])
    elif paper:
        _paper_panel(pax, "gflops", colors)
    _finish(ax, GFLOPS_LABEL, label)
    _set_ylim(ax, shown, log=False)


def fig2_bubbles(
    df: pd.DataFrame,
    metric: str = "fid",
    step: int | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 2 (left): metric at one step for each model against Gflops, bubble area = Gflops."""
    df = with_variants(df)
    rows, label, step = select_points(df, "gflops", metric, step, allow_mixed)
    colors = size_colors(df)
    shared = paper and paper_comparable(rows, metric)
    fig, ax, pax = _figure(paper and not shared)
    area = np.maximum(BUBBLE_MAX_AREA * rows["gflops"] / rows["gflops"].max(), BUBBLE_MIN_AREA)
    for size in size_order(rows):
        r = rows[rows["model"] == size]
        ax.scatter(
            r["gflops"],
            r[metric],
            s=area[r.index],
            color=colors[size],
            alpha=0.6,
            edgecolors="k",
            linewidths=0.5,
            label=f"DiT-{size}",
            gid="sweep",
        )
    for r in rows.itertuples():
        ax.annotate(
            _name(r.model, r.patch),
            (r.gflops, getattr(r, metric)),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    _paper_and_axes(ax, pax, rows[metric], shared, paper, colors, label)
    fig.suptitle(f"Fig 2: {label} at step {step:,}; bubble area proportional to Gflops", fontsize=11)
    for handle in _legend_outside(ax).legend_handles:
        handle.set_sizes([60])  # legend markers of one size; the bubbles themselves encode Gflops
    return fig


def _cond_panel(pax) -> None:
    """Draws the paper's XL/2 FID-50K at 400K per conditioning variant on its own axes."""
    p = _paper(cond=None)
    p = p[(p["model"] == "XL") & (p["patch"] == 2)]
    names = [c for c in COND_NAMES if c in set(p["cond"])]
    for i, cond in enumerate(names):
        pax.scatter([i], p.loc[p["cond"] == cond, "fid"], color=COND_COLORS[cond], gid="paper", **PAPER_STYLE)
    pax.set_xticks(range(len(names)), [COND_NAMES[c] for c in names], rotation=30, fontsize=7)
    pax.set_xlim(-0.5, len(names) - 0.5)
    _set_ylim(pax, [p["fid"]], log=False)
    pax.set_ylabel("paper FID-50K at 400K steps (no guidance)")
    pax.set_title(PAPER_PANEL_TITLE.replace("S..XL", "XL/2"), fontsize=8)
    pax.grid(True, alpha=0.3)
    pax.set_label("paper")


def fig5_conditioning(
    df: pd.DataFrame,
    metric: str = "fid",
    model: str | None = None,
    patch: int | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 5: metric over training steps for each conditioning variant of one model (default XL/2)."""
    df = with_variants(df)
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    if model is None or patch is None:
        # The model with the most conditioning variants; the largest such one, as in the paper (XL/2).
        n_cond = rows.groupby(["model", "patch"]).agg(n=("cond", "nunique"), gflops=("gflops", "max"))
        model, patch = n_cond.sort_values(["n", "gflops"]).index[-1]
    patch = int(patch)
    rows = rows[(rows["model"] == model) & (rows["patch"] == patch)]
    shared = paper and paper_comparable(rows, metric)
    fig, ax, pax = _figure(paper and not shared)
    values, steps = [rows[metric]], [rows["step"]]
    for cond, r in rows.groupby("cond"):
        r = r.groupby("step")[metric].mean()
        ax.plot(
            r.index,
            r.to_numpy(),
            "-o",
            ms=3,
            color=COND_COLORS.get(cond),
            label=COND_NAMES.get(cond, cond),
            gid="sweep",
        )
    if shared:
        p = _paper(cond=None)
        p = p[(p["model"] == "XL") & (p["patch"] == 2)]
        ax.scatter(p["step"], p["fid"], color=[COND_COLORS.get(c, "k") for c in p["cond"]], gid="paper", **PAPER_STYLE)
        ax.scatter([], [], color="k", label=f"{PAPER_LABEL}, XL/2", **PAPER_STYLE)
        values.append(p["fid"])
        steps.append(p["step"])
    elif paper:
        _cond_panel(pax)
    _finish(ax, STEPS_LABEL, label, logx=False, logy=True)
    ax.set_xlim(0, 1.05 * max(s.max() for s in steps))
    _set_ylim(ax, values, log=True)
    fig.suptitle(f"Fig 5: conditioning variants, DiT-{_name(model, patch)}", fontsize=11)
    _legend_outside(ax)
    return fig


def fig6_training(
    df: pd.DataFrame,
    metric: str = "fid",
    cond: str = "adaln_zero",
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 6: metric over training steps; top row one panel per patch, bottom row one per size.

    Only the sweep's own sizes and patches get a panel.
    """
    df = with_variants(df)
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    rows = rows[rows["cond"] == cond]
    if rows.empty:
        raise ValueError(f"no evaluated cell with cond={cond!r}; conds present: {sorted(df['cond'].unique())}")
    colors = size_colors(df)
    sizes, patches = size_order(rows), patch_order(rows)
    shared = paper and paper_comparable(rows, metric)
    pap = _paper(cond) if shared else _paper(cond).iloc[:0]
    pap = pap[pap["model"].isin(sizes) & pap["patch"].isin(patches)]
    n_cols = max(len(sizes), len(patches))
    side = paper and not shared
    fig = plt.figure(figsize=(3.4 * (n_cols + side) + 0.6, 6.6), layout="constrained")
    grid = fig.add_gridspec(2, n_cols + side)
    first = fig.add_subplot(grid[0, 0])
    top = [first] + [fig.add_subplot(grid[0, i], sharey=first) for i in range(1, len(patches))]
    bottom = [fig.add_subplot(grid[1, i], sharey=first) for i in range(len(sizes))]

    def draw(ax, size, patch):
        model = rows[(rows["model"] == size) & (rows["patch"] == patch)]
        r = model.groupby("step")[metric].mean()
        style, marker = _patch_style(patch)
        if len(r):
            ax.plot(r.index, r.to_numpy(), style, marker=marker, ms=3, color=colors[size], gid="sweep")
            mark_repeated(ax, model, "step", metric)
        p = pap[(pap["model"] == size) & (pap["patch"] == patch)]
        if len(p):
            ax.scatter(p["step"], p["fid"], color=colors[size], gid="paper", **PAPER_STYLE)

    for ax, patch in zip(top, patches):
        for size in sizes:
            draw(ax, size, patch)
        ax.set_title(f"patch {patch}: varying size", fontsize=10)
    for ax, size in zip(bottom, sizes):
        for patch in patches:
            draw(ax, size, patch)
        ax.set_title(f"DiT-{size}: varying patch", fontsize=10)
    x_hi = 1.05 * max(rows["step"].max(), pap["step"].max() if len(pap) else 0)
    floor = []
    for ax in top + bottom:
        floor = floor_band(ax, rows, metric)
    for ax in top + bottom:
        _finish(ax, STEPS_LABEL, label if ax in (top[0], bottom[0]) else None, logx=False, logy=True)
        ax.set_xlim(0, x_hi)
    _set_ylim(first, [rows[metric], pap["fid"], *floor], log=True)
    handles = [Line2D([], [], color=colors[s], label=f"DiT-{s}") for s in sizes]
    handles += [
        Line2D([], [], color="gray", linestyle=_patch_style(p)[0], marker=_patch_style(p)[1], ms=4, label=f"patch {p}")
        for p in patches
    ]
    if len(pap):
        handles.append(Line2D([], [], color="k", marker="*", linestyle="none", ms=9, mfc="none", label=PAPER_LABEL))
    if side:
        _paper_panel(fig.add_subplot(grid[:, n_cols]), "gflops", colors)
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(f"Fig 6: {label} over training ({COND_NAMES.get(cond, cond)})")
    return fig


def fig8_gflops(
    df: pd.DataFrame,
    metric: str = "fid",
    step: int | None = None,
    law: ScalingLaw | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
    fallback: ScalingLaw | None = None,
):
    """Returns Fig 8: metric at one step against Gflops (log x), its correlation, optionally a fitted law.

    `law` is drawn unless its bootstrap leaves it undetermined (`law_problem`); then `fallback` (e.g. the
    power law when `law` is the floor law) is drawn instead, and the legend says so.
    """
    df = with_variants(df)
    rows, label, step = select_points(df, "gflops", metric, step, allow_mixed)
    corr = gflops_correlation(df, metric, step, allow_mixed)["pearson_log10_gflops"] if len(rows) >= 3 else np.nan
    colors = size_colors(df)
    shared = paper and paper_comparable(rows, metric)
    fig, ax, pax = _figure(paper and not shared)
    for r in rows.itertuples():
        ax.scatter(
            r.gflops,
            getattr(r, metric),
            color=colors[r.model],
            marker=_patch_style(r.patch)[1],
            s=40,
            zorder=4,
            gid="sweep",
        )
    for size in size_order(rows):
        ax.scatter([], [], color=colors[size], label=f"DiT-{size}")
    for patch in patch_order(rows):
        ax.scatter([], [], color="gray", marker=_patch_style(patch)[1], label=f"patch {patch}")
    _paper_and_axes(ax, pax, [rows[metric], *floor_band(ax, rows, metric)], shared, paper, colors, label)
    mark_repeated(ax, rows, "gflops", metric)
    _draw_law(ax, *choose_law(law, fallback), rows["gflops"].min(), rows["gflops"].max())
    fig.suptitle(f"Fig 8: {label} at step {step:,}; Pearson r(FID, log10 Gflops) = {corr:.3f}", fontsize=10)
    _legend_outside(ax)
    return fig


def _lines_against_compute(ax, rows: pd.DataFrame, metric: str, colors: dict, marker_size: float) -> None:
    """Draws `metric` against training compute, a line per model (colour: size; style and marker: patch), as
    the paper's Fig 9 and Fig 12 do; records at one compute are averaged."""
    for size in size_order(rows):
        for patch in patch_order(rows):
            r = rows[(rows["model"] == size) & (rows["patch"] == patch)]
            if r.empty:
                continue
            r = r.groupby("train_compute_gflops")[metric].mean()
            style, marker = _patch_style(patch)
            ax.plot(r.index, r.to_numpy(), style, marker=marker, ms=marker_size, color=colors[size],
                    label=f"DiT-{_name(size, patch)}", gid="sweep")


def fig9_compute(
    df: pd.DataFrame,
    metric: str = "fid",
    cond: str = "adaln_zero",
    law: ScalingLaw | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
    fallback: ScalingLaw | None = None,
):
    """Returns Fig 9: metric against training compute (Gflops x batch x steps x 3), a line per model.

    A line's colour is its size, its style and marker its patch (the paper's Fig 9); `law` and `fallback`
    as in `fig8_gflops`.
    """
    df = with_variants(df)
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    rows = rows[rows["cond"] == cond]
    if rows.empty:
        raise ValueError(f"no evaluated cell with cond={cond!r}; conds present: {sorted(df['cond'].unique())}")
    colors = size_colors(df)
    shared = paper and paper_comparable(rows, metric)
    fig, ax, pax = _figure(paper and not shared, width=MAIN_WIDTH + 1.0)
    _lines_against_compute(ax, rows, metric, colors, marker_size=4)
    values = [rows[metric], *floor_band(ax, rows, metric)]
    mark_repeated(ax, rows, "train_compute_gflops", metric)
    if shared:
        p = _paper(cond)
        _paper_stars(ax, p, "train_compute_gflops", colors)
        values.append(p["fid"])
    elif paper:
        _paper_panel(pax, "train_compute_gflops", colors)
    _finish(ax, COMPUTE_LABEL, label, logy=True)
    _set_ylim(ax, values, log=True)
    _draw_law(ax, *choose_law(law, fallback), rows["train_compute_gflops"].min(), rows["train_compute_gflops"].max())
    fig.suptitle(f"Fig 9: {label} against training compute", fontsize=11)
    _legend_outside(ax)
    return fig


# Fig 12 of the paper: every metric its evaluator reports, against training compute, one line per model.
FIG12_METRICS = ("fid", "sfid", "isc_mean", "precision", "recall")
FIG12_LOWER_IS_BETTER = {"fid": True, "sfid": True, "isc_mean": False, "precision": False, "recall": False}


def fig12_metrics(
    df: pd.DataFrame,
    metrics=FIG12_METRICS,
    cond: str = "adaln_zero",
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 12: FID, sFID, Inception Score, precision and recall against training compute, a panel per
    metric and a line per model (colour: size, style: patch, as in Fig 9).

    A metric the sweep did not measure gets a panel that says so (never zeros); the paper's values are drawn
    only where the repository's copy of Table 4 has them (FID-50K at 400K) and the units agree.
    """
    df = with_variants(df)
    base = df[df["cond"] == cond]
    if base.empty:
        raise ValueError(f"no cell with cond={cond!r}; conds present: {sorted(df['cond'].unique())}")
    colors = size_colors(df)
    n_cols = 3  # two rows of three: five metrics and the legend
    fig, grid = plt.subplots(2, n_cols, figsize=(3.6 * n_cols, 2 * FIG_HEIGHT - 1.0), layout="constrained")
    axes = list(grid.ravel())
    drawn = []
    for ax, metric in zip(axes, metrics):
        title = NAMES.get(metric, metric)
        measured = metric in base and base[metric].notna().any()
        try:
            rows, label = comparable(base, metric, allow_mixed=allow_mixed) if measured else (None, None)
            why = "not measured in this sweep"
        except ValueError as e:  # measured, but with settings that must not share one axis
            rows, why = None, one_line(e, limit=PANEL_NOTE_CHARS)
        if rows is None:
            ax.text(0.5, 0.5, f"{title}:\n{why}", ha="center", va="center", transform=ax.transAxes, fontsize=8,
                    wrap=True, gid="absent")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=10)
            continue
        drawn.append(metric)
        _lines_against_compute(ax, rows, metric, colors, marker_size=3)
        values = [rows[metric], *floor_band(ax, rows, metric)]
        mark_repeated(ax, rows, "train_compute_gflops", metric)
        if paper and metric == "fid" and paper_comparable(rows, metric):
            p = _paper(cond)
            _paper_stars(ax, p, "train_compute_gflops", colors)
            values.append(p["fid"])
        log_y = FIG12_LOWER_IS_BETTER.get(metric, True)
        _finish(ax, "training compute (Gflops, log)", label, logy=log_y)
        _set_ylim(ax, values, log=log_y)
        ax.set_title(f"{title} ({'lower' if log_y else 'higher'} is better)", fontsize=10)
    for ax in axes[len(metrics):]:
        ax.axis("off")
    if not drawn:
        plt.close(fig)
        raise ValueError(f"none of {list(metrics)} was measured in this sweep")
    handles, labels = next(a for a, m in zip(axes, metrics) if m in drawn).get_legend_handles_labels()
    legend_ax = axes[-1] if len(metrics) < len(axes) else None
    if legend_ax is not None:
        legend_ax.legend(handles, labels, loc="center", fontsize=8, ncol=2 if len(labels) > 8 else 1)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)
    fig.suptitle(f"Fig 12: the evaluator's metrics against training compute ({COND_NAMES.get(cond, cond)}); "
                 "the repository's Table 4 has the paper's FID only", fontsize=10)
    return fig


SAMPLES_SHOWN = 10  # samples per cell in the samples figure (sample i has the same label and noise in every row)


def fig_samples(df: pd.DataFrame, n: int = SAMPLES_SHOWN, cond: str | None = None):
    """Returns the samples figure: one row per cell, ordered by Gflops (smallest first), its last evaluation's
    first `n` samples; sample i has the same class label and initial noise in every row (both drawn from the
    evaluation's seed and i), so the rows show what model compute buys image by image, as the paper's Fig 1 and
    Fig 7 show it. ValueError when no evaluation kept its samples."""
    rows = df[df["evaluated"].astype(bool) & df["samples_npz"].notna()] if "samples_npz" in df else df.iloc[:0]
    if cond is not None:
        rows = rows[rows["cond"] == cond]
    rows = rows[[Path(p).exists() for p in rows["samples_npz"]]] if len(rows) else rows
    if rows.empty:
        raise ValueError("no evaluation with its samples on disk (samples/step_N_*/samples.npz): nothing to show")
    last = rows.sort_values("step").groupby("cell_id", sort=False).tail(1).sort_values(["gflops", "cell_id"])
    images = []
    for path in last["samples_npz"]:
        with np.load(path) as f:
            images.append(f["arr_0"][:n])
    k = min(len(a) for a in images)
    fig, axes = plt.subplots(len(last), 1, figsize=(1.0 * k + 2.6, 1.0 * len(last) + 0.8), layout="constrained",
                             squeeze=False)
    for ax, r, imgs in zip(axes[:, 0], last.itertuples(), images):
        strip = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=255) for im in imgs[:k]], axis=1)
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        metric = f", FID {r.fid:.3g}" if pd.notna(getattr(r, "fid", np.nan)) else ""
        ax.set_ylabel(f"DiT-{_name(r.model, r.patch)}\n{r.gflops:.3g} Gflops\nstep {r.step:,}{metric}", rotation=0,
                      ha="right", va="center", fontsize=7)
        ax.set_gid("samples")
    fig.suptitle(f"The first {k} samples of each cell's last evaluation, smallest model on top (sample i: the same "
                 "label and noise in every row)", fontsize=9)
    return fig


def table4(df: pd.DataFrame, metric: str = "fid", step: int | None = None, allow_mixed: bool = False) -> pd.DataFrame:
    """Returns Table 4: per model and conditioning: Gflops, params (M), ours at one step, paper FID-50K."""
    df = with_variants(df)
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    step = comparison_step(rows, metric) if step is None else int(step)
    rows = rows[rows["step"] == step]
    ours = (
        rows.groupby(["model", "patch", "cond"])
        .agg(
            gflops=("gflops", "first"),
            params_m=("params", lambda p: p.iloc[0] / 1e6),
            value=(metric, "mean"),
            seeds=("seed", "nunique"),
        )
        .reset_index()
    )
    ours = ours.rename(columns={"value": f"{label} @ {step:,}"})
    pap = _paper(cond=None)[["model", "patch", "cond", "fid"]].rename(columns={"fid": "paper FID-50K @ 400K"})
    out = ours.merge(pap, on=["model", "patch", "cond"], how="left")
    order = {s: i for i, s in enumerate(size_order(df))}
    return out.sort_values(
        ["cond", "model", "patch"],
        key=lambda s: s.map(order) if s.name == "model" else (-s if s.name == "patch" else s),
    ).reset_index(drop=True)


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Writes `fig` as PNG and PDF (atomically) into `out_dir` and returns the paths."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{name}.{ext}"
        with atomic_open(path) as f:
            fig.savefig(f, format=ext, dpi=150)
        paths.append(path)
    plt.close(fig)
    return paths
