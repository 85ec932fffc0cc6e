"""The paper's figures from a results table, with the paper's own numbers drawn alongside.

One function per figure (Fig 2, 5, 6, 8, 9 of Peebles & Xie 2023) and Table 4; the notebooks, the report
and the tests call these, so they all draw the same thing. Each returns a matplotlib Figure.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on cluster nodes and in tests
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness.results import _atomic_write, comparable, comparison_step, paper_results  # noqa: E402
from harness.scaling import ScalingLaw, gflops_correlation, select_points  # noqa: E402

SIZES = ("S", "B", "L", "XL")
PATCHES = (8, 4, 2)
SIZE_COLORS = {"S": "#4c72b0", "B": "#55a868", "L": "#dd8452", "XL": "#c44e52"}
PATCH_STYLES = {8: ":", 4: "--", 2: "-"}
PATCH_MARKERS = {8: "s", 4: "^", 2: "o"}
COND_COLORS = {"in_context": "#8172b3", "cross_attn": "#937860", "adaln": "#da8bc3", "adaln_zero": "#c44e52"}
COND_NAMES = {
    "in_context": "In-Context",
    "cross_attn": "Cross-Attention",
    "adaln": "adaLN",
    "adaln_zero": "adaLN-Zero",
}
PAPER_LABEL = "paper (FID-50K, ImageNet 256)"
PAPER_STYLE = {"marker": "*", "s": 120, "facecolors": "none", "linewidths": 1.2, "zorder": 5}
BUBBLE_AREA_PER_GFLOP = 6.0  # points^2 per Gflop: XL/2 (118.6 Gflops) is a ~700 pt^2 bubble


def _name(model, patch) -> str:
    return f"{model}/{int(patch)}"


def _paper(cond: str | None = "adaln_zero", step: int | None = 400_000) -> pd.DataFrame:
    t = paper_results()
    if cond is not None:
        t = t[t["cond"] == cond]
    return t if step is None else t[t["step"] == step]


def _finish(ax, xlabel: str, ylabel: str, logx: bool = True, logy: bool = False) -> None:
    if logx:
        ax.set_xscale("log")
    elif xlabel == "training steps":
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}K"))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def fig2_bubbles(
    df: pd.DataFrame,
    metric: str = "fid",
    step: int | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 2 (left): metric at one step for each model against Gflops, bubble area = Gflops."""
    rows, label, step = select_points(df, "gflops", metric, step, allow_mixed)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for size in SIZES:
        r = rows[rows["model"] == size]
        if len(r):
            ax.scatter(
                r["gflops"],
                r[metric],
                s=BUBBLE_AREA_PER_GFLOP * r["gflops"],
                color=SIZE_COLORS[size],
                alpha=0.6,
                edgecolors="k",
                linewidths=0.5,
                label=f"DiT-{size}",
            )
    for r in rows.itertuples():
        ax.annotate(
            _name(r.model, r.patch),
            (r.gflops, getattr(r, metric)),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    if paper:
        p = _paper()
        ax.scatter(p["gflops"], p["fid"], color="k", label=PAPER_LABEL, **PAPER_STYLE)
    _finish(ax, "transformer Gflops (forward pass, one image; log scale)", label)
    ax.set_title(f"Fig 2: {label} at step {step:,}, bubble area = Gflops")
    for handle in ax.legend(fontsize=8).legend_handles:
        handle.set_sizes([60])  # legend markers of one size; the bubbles themselves encode Gflops
    fig.tight_layout()
    return fig


def fig5_conditioning(
    df: pd.DataFrame,
    metric: str = "fid",
    model: str | None = None,
    patch: int | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 5: metric over training steps for each conditioning variant of one model (default XL/2)."""
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    if model is None or patch is None:
        # The model with the most conditioning variants; the largest such one, as in the paper (XL/2).
        n_cond = rows.groupby(["model", "patch"])["cond"].nunique().reset_index()
        n_cond["rank"] = (
            n_cond["model"].map({s: i for i, s in enumerate(SIZES)}).fillna(-1) - n_cond["patch"] / 100
        )
        best = n_cond.sort_values(["cond", "rank"]).iloc[-1]
        model, patch = best["model"], int(best["patch"])
    rows = rows[(rows["model"] == model) & (rows["patch"] == patch)]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for cond, r in rows.groupby("cond"):
        r = r.groupby("step")[metric].mean()
        ax.plot(
            r.index, r.to_numpy(), "-o", ms=3, color=COND_COLORS.get(cond), label=COND_NAMES.get(cond, cond)
        )
    if paper:
        p = _paper(cond=None)
        p = p[(p["model"] == "XL") & (p["patch"] == 2)]
        for r in p.itertuples():
            ax.scatter([r.step], [r.fid], color=COND_COLORS.get(r.cond), **PAPER_STYLE)
        ax.scatter([], [], color="k", label=f"{PAPER_LABEL}, XL/2", **PAPER_STYLE)
    _finish(ax, "training steps", label, logx=False, logy=True)
    ax.set_title(f"Fig 5: conditioning variants, DiT-{_name(model, patch)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fig6_training(
    df: pd.DataFrame,
    metric: str = "fid",
    cond: str = "adaln_zero",
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 6: metric over training steps; top row one panel per patch, bottom row one per size."""
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    rows = rows[rows["cond"] == cond]
    pap = _paper(cond) if paper else None
    fig, axes = plt.subplots(2, 4, figsize=(15, 7), sharey=True)
    for ax, patch in zip(axes[0], PATCHES):
        for size in SIZES:
            r = rows[(rows["model"] == size) & (rows["patch"] == patch)].groupby("step")[metric].mean()
            if len(r):
                ax.plot(
                    r.index, r.to_numpy(), "-o", ms=3, color=SIZE_COLORS[size], label=f"DiT-{size}/{patch}"
                )
            if paper:
                p = pap[(pap["model"] == size) & (pap["patch"] == patch)]
                ax.scatter(p["step"], p["fid"], color=SIZE_COLORS[size], **PAPER_STYLE)
        ax.set_title(f"patch {patch}: varying size")
    axes[0, 3].axis("off")
    for ax, size in zip(axes[1], SIZES):
        for patch in PATCHES:
            r = rows[(rows["model"] == size) & (rows["patch"] == patch)].groupby("step")[metric].mean()
            if len(r):
                ax.plot(
                    r.index,
                    r.to_numpy(),
                    PATCH_STYLES[patch],
                    marker=PATCH_MARKERS[patch],
                    ms=3,
                    color=SIZE_COLORS[size],
                    label=f"DiT-{size}/{patch}",
                )
            if paper:
                p = pap[(pap["model"] == size) & (pap["patch"] == patch)]
                ax.scatter(p["step"], p["fid"], color=SIZE_COLORS[size], **PAPER_STYLE)
        ax.set_title(f"DiT-{size}: varying patch")
    for ax in axes.flat:
        if ax.axison:
            _finish(ax, "training steps", label, logx=False, logy=True)
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize=7)
    if paper:
        axes[0, 3].scatter([], [], color="k", label=f"{PAPER_LABEL}, 400K steps", **PAPER_STYLE)
        axes[0, 3].legend(loc="center", fontsize=9)
    fig.suptitle(f"Fig 6: {label} over training ({COND_NAMES.get(cond, cond)})")
    fig.tight_layout()
    return fig


def _draw_law(ax, law: ScalingLaw | None, x_lo: float, x_hi: float) -> None:
    if law is None:
        return
    xs = np.logspace(np.log10(x_lo), np.log10(x_hi), 100)
    ax.plot(xs, law.predict(xs), "k-", lw=1, label=f"fit ({law.form}): b = {law.exponent:.2f}")
    lo, hi = law.predict_interval(xs)
    if np.isfinite(lo).all():
        ax.fill_between(xs, lo, hi, color="k", alpha=0.12, label=f"{100 * law.level:g}% bootstrap band")


def fig8_gflops(
    df: pd.DataFrame,
    metric: str = "fid",
    step: int | None = None,
    law: ScalingLaw | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 8: metric at one step against Gflops (log x), its correlation, optionally a fitted law."""
    rows, label, step = select_points(df, "gflops", metric, step, allow_mixed)
    corr = (
        gflops_correlation(df, metric, step, allow_mixed)["pearson_log10_gflops"]
        if len(rows) >= 3
        else np.nan
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for r in rows.itertuples():
        ax.scatter(
            r.gflops,
            getattr(r, metric),
            color=SIZE_COLORS.get(r.model, "gray"),
            marker=PATCH_MARKERS.get(r.patch, "o"),
            s=40,
            zorder=4,
        )
    for size in SIZES:
        ax.scatter([], [], color=SIZE_COLORS[size], label=f"DiT-{size}")
    for patch in PATCHES:
        ax.scatter([], [], color="gray", marker=PATCH_MARKERS[patch], label=f"patch {patch}")
    x_lo, x_hi = rows["gflops"].min(), rows["gflops"].max()
    if paper:
        p = _paper()
        ax.scatter(p["gflops"], p["fid"], color="k", label=f"{PAPER_LABEL}, 400K steps", **PAPER_STYLE)
        x_lo, x_hi = min(x_lo, p["gflops"].min()), max(x_hi, p["gflops"].max())
    _draw_law(ax, law, x_lo, x_hi)
    _finish(ax, "transformer Gflops (forward pass, one image; log scale)", label)
    ax.set_title(f"Fig 8: {label} at step {step:,}; Pearson r(FID, log10 Gflops) = {corr:.3f}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def fig9_compute(
    df: pd.DataFrame,
    metric: str = "fid",
    cond: str = "adaln_zero",
    law: ScalingLaw | None = None,
    paper: bool = True,
    allow_mixed: bool = False,
):
    """Returns Fig 9: metric against training compute (Gflops x batch x steps x 3), a line per model."""
    rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    rows = rows[rows["cond"] == cond]
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    for (size, patch), r in rows.groupby(["model", "patch"]):
        r = r.groupby("train_compute_gflops")[metric].mean()
        ax.plot(
            r.index,
            r.to_numpy(),
            PATCH_STYLES.get(patch, "-"),
            marker=PATCH_MARKERS.get(patch, "o"),
            ms=3,
            color=SIZE_COLORS.get(size, "gray"),
            label=f"DiT-{_name(size, patch)}",
        )
    x_lo, x_hi = rows["train_compute_gflops"].min(), rows["train_compute_gflops"].max()
    if paper:
        p = _paper(cond)
        ax.scatter(
            p["train_compute_gflops"], p["fid"], color="k", label=f"{PAPER_LABEL}, 400K steps", **PAPER_STYLE
        )
        x_lo, x_hi = min(x_lo, p["train_compute_gflops"].min()), max(x_hi, p["train_compute_gflops"].max())
    _draw_law(ax, law, x_lo, x_hi)
    _finish(ax, "training compute (Gflops x batch x steps x 3; log scale)", label, logy=True)
    ax.set_title(f"Fig 9: {label} against training compute")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    return fig


def table4(
    df: pd.DataFrame, metric: str = "fid", step: int | None = None, allow_mixed: bool = False
) -> pd.DataFrame:
    """Returns Table 4: per model and conditioning: Gflops, params (M), ours at one step, paper FID-50K."""
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
    order = {s: i for i, s in enumerate(SIZES)}
    return out.sort_values(
        ["cond", "model", "patch"],
        key=lambda s: s.map(order) if s.name == "model" else (-s if s.name == "patch" else s),
    ).reset_index(drop=True)


def save_figure(fig, out_dir: str | os.PathLike, name: str) -> list[Path]:
    """Writes `fig` as PNG and PDF (atomically) into `out_dir` and returns the paths."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{name}.{ext}"
        _atomic_write(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=150))
        paths.append(path)
    plt.close(fig)
    return paths
