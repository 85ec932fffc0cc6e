"""A sweep's report: figures (PNG + PDF), Table 4, fitted laws with intervals, a Markdown page.

    python -m harness.report SWEEP_DIR [SWEEP_DIR...] [--out DIR] [--resamples 1000]

Writes into SWEEP_DIR/report/ by default (the first sweep folder). The page is built section by section;
a section that fails says why in its place and every other section, figure and table is still written
(`Report.not_written` names the ones that were not).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness import scaling
from harness.core import cli, vocabulary
from harness.core.runfolder import atomic_write_bytes
from harness.core.vocabulary import NAMES
from harness.plots import figures, optimal
from harness.results import (
    EPOCHS_WORTH_LESS,
    comparable,
    learning_rate_table,
    load,
    load_validation,
    save_table,
    variant,
    variants,
)

REPORT_DIR = "report"
FIGURES = {
    "fig2_bubbles": ("Fig 2: FID at the comparison step, bubble area = Gflops", figures.fig2_bubbles),
    "fig5_conditioning": ("Fig 5: conditioning variants over training", figures.fig5_conditioning),
    "fig6_training": ("Fig 6: FID over training, by patch and by size", figures.fig6_training),
    "fig8_gflops": ("Fig 8: FID against Gflops", figures.fig8_gflops),
    "fig9_compute": ("Fig 9: FID against training compute", figures.fig9_compute),
    "fig12_metrics": ("Fig 12: FID, sFID, IS, precision and recall against training compute", figures.fig12_metrics),
    "samples": ("Samples: each cell's last evaluation, smallest model on top, the same labels and noise in each row",
                figures.fig_samples),
}
FITS = (
    ("gflops_floor", "gflops", "floor"),
    ("gflops_power", "gflops", "power"),
    ("compute_floor", "train_compute_gflops", "floor"),
    ("compute_power", "train_compute_gflops", "power"),
)
CORRELATIONS = {
    "pearson_log10_gflops": "Pearson(FID, log10 Gflops)",
    "pearson_gflops": "Pearson(FID, Gflops)",
    "pearson_log_log": "Pearson(log FID, log Gflops)",
    "spearman": "Spearman",
}


@dataclass
class Report:
    """A written report: where its page is, what it could not write, the FID-Gflops correlation."""

    path: Path
    not_written: list[str] = field(default_factory=list)
    correlation: dict | None = None
    last: pd.DataFrame | None = None  # each cell's last evaluation (last_evaluations)
    table: pd.DataFrame | None = None  # the results table the report was made from


@dataclass
class Context:
    """What every section reads: the table, the options, the output folder, the fits made so far."""

    df: pd.DataFrame
    out: Path
    metric: str
    n_resamples: int
    allow_mixed: bool
    seed: int
    fits: dict = field(default_factory=dict)
    correlation: dict | None = None
    val_df: pd.DataFrame | None = None  # the validation table (sweep folders only: a saved table has none)
    optimal_jobs: dict = field(default_factory=dict)  # variant -> Future of (summary, fits) computed beside


def _write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode())
    return path


def _json_text(obj) -> str:
    """Returns strict JSON, which any tool reads (Python's default writes NaN, which is not JSON): a value
    that is not determined (NaN, infinite) is written null."""

    def finite(v):
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps(finite(obj), indent=2, allow_nan=False)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """Returns a Markdown table of `header` and `rows`, cells already written as text (no tabulate dependency)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _md_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """Returns `df` as a Markdown table, floats in `floatfmt` and NaN as an empty cell."""

    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else format(v, floatfmt)
        return str(v)

    return _markdown_table([str(c) for c in df.columns], [[fmt(v) for v in row] for row in df.itertuples(index=False)])


# ---- the sections: each returns its Markdown lines (and may raise; the page then says why) ----

LAST_COLUMNS = ("cell_id", "gflops", "step", "epochs", "num_samples", "extractor", "extractor_weights", "cfg_scale",
                "fid", "fid_floor", "sfid", "isc_mean", "precision", "recall", "fd_dinov2", "val_loss_ema",
                "val_loss_ema_se", "train_batch_loss")
ALWAYS_SHOWN = ("cell_id", "gflops", "step", "num_samples", "extractor")


def last_evaluations(df: pd.DataFrame) -> pd.DataFrame:
    """Returns each cell's last evaluation (one row per cell and evaluation setting), smallest model first,
    with the metrics measured: the table a sweep prints when it ends and the report's overview shows."""
    rows = df[df["evaluated"].astype(bool)]
    if rows.empty:
        return rows.reindex(columns=["cell_id", "gflops", "step"])
    keys = ["cell_id", "settings_hash"] if "settings_hash" in rows else ["cell_id"]
    last = rows.sort_values("step").groupby(keys, dropna=False, sort=False).tail(1)
    cols = [c for c in LAST_COLUMNS if c in last and (c in ALWAYS_SHOWN or last[c].notna().any())]
    if "cfg_scale" in cols and (last["cfg_scale"].fillna(1.0) == 1.0).all():
        cols.remove("cfg_scale")  # unguided throughout: nothing to tell apart
    if "extractor_weights" in cols and last.get("extractor_current", pd.Series([True])).astype(bool).all():
        cols.remove("extractor_weights")  # every record made with the shipped weights: nothing to tell apart
    out = last.sort_values(["gflops", "cell_id"])
    if "extractor_weights" in cols:  # records made with an in-house extractor's earlier weights say so
        out = out.assign(extractor_weights=[w if cur else f"{w} (earlier weights)" for w, cur in
                                            zip(out["extractor_weights"], out["extractor_current"].astype(bool))])
    return out[cols].reset_index(drop=True)


def measurements(ctx: Context) -> list[str]:
    """Says what each number of the page is: the validation loss's split, images, times and standard error; each
    metric's sample count, extractor (and its weights) and floor; how far the training data was repeated."""
    md = ["## What the numbers are", ""]
    val = ctx.val_df
    if val is not None and len(val):
        held = val[val["val_loss_ema"].notna()] if "val_loss_ema" in val else val.iloc[:0]
        if len(held):
            share = (held["val_loss_ema_se"] / held["val_loss_ema"]).median()
            md.append(f"- Validation loss: the EMA and raw models' loss (the MSE term under DDPM) on the held-out "
                      f"'{held['val_split'].mode().iloc[0]}' split, {int(held['val_images'].max())} images at "
                      f"{int(held['val_times'].max())} stratified times each, fixed noise; its standard error is "
                      f"{100 * share:.2g}% of the loss (median over {len(held)} records).")
        batch = val[val["train_batch_loss"].notna()] if "train_batch_loss" in val else val.iloc[:0]
        if len(batch):
            md.append(f"- {batch['cell_id'].nunique()} cell(s) hold a fixed training-batch loss ({len(batch)} records: "
                      "a data set without a held-out split, or lines written before held-out validation existed): "
                      "not a validation loss, and no law fits it unless asked to by name.")
    ev = ctx.df[ctx.df["evaluated"].astype(bool)] if "evaluated" in ctx.df else ctx.df.iloc[:0]
    for (n, extractor, weights), g in ev.groupby(["num_samples", "extractor", "extractor_weights"], dropna=False):
        name = vocabulary.metric_label("fid", n, extractor)
        w = "" if pd.isna(weights) else f", extractor weights {weights}"
        if "extractor_current" in g and not g["extractor_current"].astype(bool).all():
            w += " (an earlier version's, trained on first use: not comparable across machines)"
        floor = g["fid_floor"].dropna() if "fid_floor" in g else pd.Series(dtype=float)
        fl = (f"; its floor (as many real images against the same reference): {floor.median():.3g} +- "
              f"{g['fid_floor_spread'].dropna().median():.2g}" if len(floor) else "; no floor measured")
        md.append(f"- {name}: {len(g)} records{w}{fl}.")
    if "epochs" in ev and ev["epochs"].notna().any():
        past = ev[ev["epochs"] > EPOCHS_WORTH_LESS]
        md.append(f"- Repetition: records at up to {ev['epochs'].max():.3g} epochs of the training images; "
                  f"{len(past)} of {len(ev)} evaluations lie past {EPOCHS_WORTH_LESS:g} epochs (ringed in the "
                  "figures).")
    return md + [""]


def overview(ctx: Context) -> list[str]:
    cells = ctx.df.drop_duplicates("cell_id")
    md = [f"{len(cells)} cells, {int(ctx.df['evaluated'].sum())} evaluations; cells by state: "
          f"{cells['state'].value_counts().to_dict()}. Full table: [results.csv](results.csv).", ""]
    unfinished = cells[cells["state"] != "finished"]
    if len(unfinished):
        md += ["Cells not finished:", "", _md_table(unfinished[["cell_id", "state", "reason", "step"]]), ""]
    last = last_evaluations(ctx.df)
    if len(last):
        md += ["Each cell's last evaluation:", "", _md_table(last.rename(columns=NAMES)), ""]
    return md


def fit_laws(ctx: Context) -> list[str]:
    """Fits the metric against Gflops and training compute (both forms); the figures draw them."""
    md = []
    for key, x, form in FITS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ctx.fits[key] = scaling.fit_table(ctx.df, x=x, metric=ctx.metric, form=form,
                                                  allow_mixed=ctx.allow_mixed, n_resamples=ctx.n_resamples,
                                                  seed=ctx.seed)
        except ValueError as e:
            md.append(f"- fit {key} skipped: {e}")
    if "val_loss" in ctx.df and ctx.df["val_loss"].notna().any():
        try:
            ctx.fits["val_loss_gflops_power"] = scaling.fit_table(ctx.df, x="gflops", metric="val_loss", form="power",
                                                                  n_resamples=ctx.n_resamples, seed=ctx.seed)
        except ValueError as e:
            md.append(f"- validation-loss fit skipped: {e}")
    return md


def _figure_laws(ctx: Context, name: str) -> tuple[dict, str | None]:
    """Returns the keyword arguments that draw a figure's law (floor, else power) and a note when the floor
    law is undetermined."""
    key = {"fig8_gflops": "gflops", "fig9_compute": "compute"}.get(name)
    if key is None:
        return {}, None
    floor, power = ctx.fits.get(f"{key}_floor"), ctx.fits.get(f"{key}_power")
    drawn, _ = figures.choose_law(floor, power)
    note = None
    if floor is not None and drawn is not floor:
        note = (f"The line is the power law `{key}_power`: the floor law `{key}_floor` is undetermined "
                f"({figures.law_problem(floor)}).")
    return {"law": floor, "fallback": power}, note


def figure(ctx: Context, name: str) -> list[str]:
    """Draws one of the paper's figures into PNG and PDF; returns its Markdown."""
    title, fn = FIGURES[name]
    if name == "fig5_conditioning" and ctx.df["cond"].nunique() < 2:
        return [f"- {title}: skipped, the sweep has one conditioning variant only", ""]
    kw, note = _figure_laws(ctx, name)
    if name not in ("fig12_metrics", "samples"):  # Fig 12 draws every metric, the samples figure pixels
        kw["metric"] = ctx.metric
    if name != "samples":
        kw["allow_mixed"] = ctx.allow_mixed
    try:
        fig = fn(ctx.df, **kw)
    except ValueError as e:
        return [f"- {title}: skipped ({e})", ""]
    paths = figures.save_figure(fig, ctx.out, name)
    md = [f"### {title}", "", f"![{title}]({paths[0].name}) ([PDF]({paths[1].name}))", ""]
    return md + ([note, ""] if note else [])


def paper_note(ctx: Context) -> list[str]:
    rows, label = comparable(ctx.df, ctx.metric, allow_mixed=ctx.allow_mixed)
    shared = figures.paper_comparable(rows, ctx.metric)
    text = "Stars mark the paper's values (FID-50K, ImageNet 256x256, 400K steps, no guidance)."
    if not shared:
        text += (f" Our numbers ({label}) are another metric (another extractor or data set), so the paper's values "
                 "are drawn in their own panel, on their own axes, and not directly comparable.")
    elif label != "FID-50K":
        text += " Fewer samples than 50K inflate FID."
    return [text, ""]


def table4(ctx: Context) -> list[str]:
    t4 = figures.table4(ctx.df, metric=ctx.metric, allow_mixed=ctx.allow_mixed)
    save_table(t4, ctx.out / "table4.csv")
    return ["## Table 4", "", _md_table(t4), "", "[table4.csv](table4.csv)", ""]


def laws(ctx: Context) -> list[str]:
    md = ["## Scaling laws", "",
          f"Fitted in log space, Huber loss (delta {scaling.HUBER_DELTA:g}), L-BFGS from a grid of starts; "
          f"{ctx.n_resamples} bootstrap resamples over cells, {100 * scaling.LEVEL:g}% percentile intervals. "
          "Against training compute the fit uses the compute frontier.", ""]
    md += [f"- `{k}`: {law.describe()} ({law.n_failed} resamples failed)" for k, law in ctx.fits.items()]
    _write_text(ctx.out / "fits.json", _json_text({k: law.to_dict() for k, law in ctx.fits.items()}))
    return md + ["", "All parameters: [fits.json](fits.json).", ""]


def correlation(ctx: Context) -> list[str]:
    md = ["### Correlation of FID with Gflops", ""]
    try:
        ours = scaling.gflops_correlation(ctx.df, ctx.metric, allow_mixed=ctx.allow_mixed)
    except ValueError as e:
        return md + [f"skipped: {e}", ""]
    ctx.correlation = ours
    paper = scaling.paper_correlations()
    corr = pd.DataFrame({"correlation": list(CORRELATIONS.values()),
                         "ours": [ours[k] for k in CORRELATIONS], "paper Table 4": [paper[k] for k in CORRELATIONS]})
    return md + [f"{ours['label']} at step {ours['step']:,}, {ours['n']} cells. The paper's -0.93 (Fig 8) is the "
                 "Pearson correlation of FID with log10 Gflops.", "", _md_table(corr, ".3f"), ""]


def held_out(ctx: Context) -> list[str]:
    md = ["### Held-out extrapolation", "", "Power law fitted on the cheaper cells, predicting the two most "
          "expensive ones.", ""]
    for x in ("gflops", "train_compute_gflops"):
        try:
            ex = scaling.extrapolation_check(ctx.df, x=x, metric=ctx.metric, form="power", allow_mixed=ctx.allow_mixed)
            md += [f"Against `{x}`:", "", _md_table(ex), ""]
        except ValueError as e:
            md += [f"Against `{x}`: skipped ({e})", ""]
    return md


def frontier(ctx: Context) -> list[str]:
    f = scaling.compute_frontier(ctx.df, metric=ctx.metric, allow_mixed=ctx.allow_mixed)
    return ["### Compute frontier", "", "The cell with the lowest value within each training budget:", "",
            _md_table(f[["budget", "cell_id", "step", ctx.metric]]), ""]


def _eval_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The unguided evaluations (the grid's protocol): what the loss-to-FID map is fitted to."""
    if "guided" not in df:
        return df
    return df[~df["guided"].astype(object).eq(True)]  # NaN (not evaluated) or False: unguided


# file name -> (title, the fit it needs, how to draw it from the fits)
COMPUTE_OPTIMAL_FIGURES = {
    "compute_optimal_isoflop": ("IsoFLOP profiles", "isoflop",
                                lambda f: optimal.fig_isoflop_profiles(f["isoflop"])),
    "compute_optimal_size": ("Compute-optimal size against training compute", "isoflop",
                             lambda f: optimal.fig_size_opt(f["isoflop"], f["joint"])),
    "compute_optimal_loss_to_fid": ("FID against validation loss", "loss_to_fid",
                                    lambda f: optimal.fig_loss_to_fid(f["loss_to_fid"])),
    "compute_optimal_joint": ("The joint law against what was measured", "joint",
                              lambda f: optimal.fig_joint_predicted(f["joint"], f.get("holdout"))),
}


def compute_optimal(ctx: Context) -> list[str]:
    """The compute-optimal section: for a few budgets in the sweep's range and two beyond, the size, images,
    validation loss and FID with intervals (harness.scaling), its JSON and four figures; one per training variant
    (objective, parametrization) when the sweep has several: their losses are not one loss surface."""
    if ctx.val_df is None or ctx.val_df.empty:
        return ["## Compute-optimal", "", "skipped: no validation records (the laws read metrics.jsonl of sweep "
                "folders; a saved results table has none)", ""]
    tables = _variant_tables(ctx)
    if list(tables) == [""]:
        return _compute_optimal(ctx, *tables[""], "")
    md = []
    for name, (val_df, eval_df) in tables.items():
        try:
            md += _compute_optimal(ctx, val_df, eval_df, name)
        except ValueError as e:
            md += [f"## Compute-optimal ({name})", "", f"not written: {cli.one_line(e)}", ""]
    return md


def optimal_summary(val_df: pd.DataFrame, eval_df: pd.DataFrame, n_resamples: int, seed: int) -> tuple[dict, dict]:
    """Returns (compute-optimal summary, the fitted objects) of one training variant (see harness.scaling)."""
    fits: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = scaling.compute_optimal_summary(val_df, eval_df if len(eval_df) else None,
                                                  n_resamples=n_resamples, seed=seed, fits=fits)
    fits["holdout"] = (summary.get("holdout") or {}).get("joint")
    return summary, fits


def _variant_tables(ctx: Context) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Returns {variant name: (validation rows, unguided evaluation rows)}; '' for a sweep of one variant."""
    groups = variants(ctx.val_df)
    if len(groups) == 1:
        return {"": (ctx.val_df, _eval_rows(ctx.df))}

    def keep(d, g):
        return d[[variant(o, p) == g for o, p in zip(d["objective"], d["parametrization"])]]

    return {g or "ddpm sp": (keep(ctx.val_df, g), keep(_eval_rows(ctx.df), g)) for g in groups}


# The compute-optimal fits (thousands of L-BFGS runs) go to a second process while this one fits and draws the
# paper's figures: the report of a 48-cell sweep with 1,000 resamples then takes about half its serial time on two
# cores (docs/benchmarks.md). Below this many resamples the second process's start-up costs more than it saves.
PARALLEL_MIN_RESAMPLES = 500


def _start_optimal_jobs(ctx: Context, pool) -> None:
    if ctx.val_df is None or ctx.val_df.empty or ctx.n_resamples < PARALLEL_MIN_RESAMPLES:
        return
    for name, (val_df, eval_df) in _variant_tables(ctx).items():
        ctx.optimal_jobs[name] = pool.submit(optimal_summary, val_df, eval_df, ctx.n_resamples, ctx.seed)


def _compute_optimal(ctx: Context, val_df: pd.DataFrame, eval_df: pd.DataFrame, name: str) -> list[str]:
    suffix = "_" + name.replace(" ", "_") if name else ""
    job = ctx.optimal_jobs.get(name)
    summary, fits = job.result() if job is not None else optimal_summary(val_df, eval_df, ctx.n_resamples, ctx.seed)
    _write_text(ctx.out / f"compute_optimal{suffix}.json", _json_text(summary))
    section = format_compute_optimal_markdown(summary)
    if name:
        section = section.replace("## Compute-optimal", f"## Compute-optimal ({name})", 1)
    md = [section, "", f"All values: [compute_optimal{suffix}.json](compute_optimal{suffix}.json).", ""]
    for fig_name, (title, key, draw) in COMPUTE_OPTIMAL_FIGURES.items():
        if fits.get(key) is None:
            md += [f"- {title}: not drawn (no such fit, see the notes above)", ""]
            continue
        try:
            paths = figures.save_figure(draw(fits), ctx.out, fig_name + suffix)
        except ValueError as e:
            md += [f"- {title}: not drawn ({cli.one_line(e)})", ""]
            continue
        md += [f"### {title}", "", f"![{title}]({paths[0].name}) ([PDF]({paths[1].name}))", ""]
    return md


# ---- the compute-optimal section's Markdown, from harness.scaling.compute_optimal_summary's plain values ----


def _fmt_value(v: dict | None, fmt: str = ".3g") -> str:
    """Returns a summary value {"value", "low", "high"} as "value [low, high]" ("not determined" for None)."""
    if v is None:
        return "not determined"
    if v.get("at_floor"):
        floor = v["floor"]
        return (f"at the floor (real images: {floor['value']:{fmt}} +- {floor['spread']:.2g}; "
                f"predicted {v['value']:{fmt}})")
    lo, hi = v["low"], v["high"]
    ci = "" if not (math.isfinite(lo) and math.isfinite(hi)) else f" [{lo:{fmt}}, {hi:{fmt}}]"
    return f"{v['value']:{fmt}}{ci}"


def _budgets_markdown(summary: dict) -> str:
    """Returns the table of budgets: per budget where it lies, the compute-optimal size, images, metric, FID."""
    metric, label = summary["metric"], summary["label"]
    rows = []
    for b in summary["budgets"]:
        where = "beyond the sweep" if b["beyond_sweep"] else "inside the sweep"
        if b["size_outside_trained"]:
            where += ", size extrapolated"
        rows.append(
            [
                f"{b['compute_gflops']:.3g}",
                where,
                _fmt_value(b["size_opt"]),
                _fmt_value(b["images_opt"]),
                _fmt_value(b[metric], ".4g"),
                _fmt_value(b["fid"]),
                _fmt_value(b["isoflop_size_opt"]),
            ]
        )
    header = ["training compute (Gflops)", "where", "size (Gflops)", "images seen", label, "FID",
              "IsoFLOP size (Gflops)"]
    return _markdown_table(header, rows)


def _isoflop_markdown(profiles: list[dict], label: str) -> str:
    """Returns the table of IsoFLOP budgets: cells, the parabola's minimum, or why there is none."""
    return _markdown_table(
        ["budget (Gflops)", "cells", "minimum at size (Gflops)", f"{label} at the minimum", "why no minimum"],
        [
            [
                f"{p['budget_gflops']:.3g}",
                str(len(p["points"])),
                "-" if p["size_opt"] is None else f"{p['size_opt']:.3g}",
                "-" if p["metric_opt"] is None else f"{p['metric_opt']:.4g}",
                p["reason"] or "",
            ]
            for p in profiles
        ],
    )


def _holdout_markdown(hold: dict, label: str, pct: str) -> list[str]:
    """Returns the lines of the held-out check: what was fitted, and each prediction's error and coverage."""
    if "error" in hold:
        return [f"Not run: {hold['error']}"]
    md = [
        f"Fitted on the {hold['n_train_cells']} cells below {min(hold['held_out_sizes']):.3g} Gflops; predicting "
        f"the held-out cells {', '.join(hold['held_out_cells'])} ({hold['n_resamples']} resamples).",
        "",
    ]
    table = []
    for key, what in (
        ("joint", f"{label} (joint law)"),
        ("isoflop", "size_opt (IsoFLOP law)"),
        ("loss_to_fid", "FID from measured loss"),
        ("fid_from_predicted_loss", "FID from predicted loss"),
    ):
        part = hold.get(key)
        if part is None:
            continue
        if "error" in part:
            table.append([what, "-", "-", "-", part["error"]])
        else:
            table.append(
                [
                    what,
                    str(part["n"]),
                    f"{100 * part['median_abs_rel_error']:.1f}%",
                    f"{100 * part['fraction_inside']:.0f}%" if math.isfinite(part["fraction_inside"]) else "-",
                    "",
                ]
            )
    header = ["prediction", "points", "median abs error", f"inside the {pct} interval", "note"]
    return md + [_markdown_table(header, table)]


def findings(summary: dict) -> list[str]:
    """Returns what a compute-optimal study found, in plain words, for the top of its section: the allocation
    exponent a (N_opt ~ C^a) by each method with its interval and whether the two agree, how many budgets had an
    IsoFLOP minimum inside the trained sizes, the held-out cells' predicted and measured loss and FID, and what the
    study cannot say."""
    pct = f"{100 * summary['level']:g}%"
    joint, iso, hold = summary.get("joint_law") or {}, summary.get("isoflop") or {}, summary.get("holdout") or {}
    md = ["**What this study found.**", ""]
    intervals = {}
    if joint.get("allocation_exponents"):
        (lo, hi), _ = joint["allocation_exponents_ci"]
        intervals["joint law (Approach 3)"] = (joint["allocation_exponents"][0], lo, hi)
    if iso.get("determined"):
        lo, hi = iso["exponent_ci"]
        intervals["IsoFLOP minima (Approach 2)"] = (iso["exponent"], lo, hi)
    for method, (a, lo, hi) in intervals.items():
        md.append(f"- Compute-optimal size N_opt ~ C^a by the {method}: a = {a:.3g} [{lo:.3g}, {hi:.3g}] ({pct}; "
                  f"width {hi - lo:.2g}).")
    if len(intervals) == 2:
        (_, l1, h1), (_, l2, h2) = intervals.values()
        agree = max(l1, l2) <= min(h1, h2)
        verdict = "agree: their intervals overlap" if agree else "disagree: their intervals do not overlap"
        md.append(f"- The two methods {verdict}.")
    else:
        missing = [m for m in ("joint law (Approach 3)", "IsoFLOP minima (Approach 2)") if m not in intervals]
        md.append(f"- Not determined by the {' nor the '.join(missing)}: see the notes below.")
        if iso.get("exponent_point") is not None and not iso.get("determined"):
            md.append(f"- The IsoFLOP minima lie on a line of slope a = {iso['exponent_point']:.3g}, a point without "
                      f"an interval (the bootstrap over cells cannot give one): not compared with the joint law. "
                      "How many cells per size would give one: harness.scaling.design.isoflop_replicates.")
    minima = [p for p in iso.get("profiles", []) if p.get("size_opt") is not None]
    if iso.get("profiles"):
        md.append(f"- IsoFLOP: {len(minima)} of {len(iso['profiles'])} budgets have a minimum inside the sizes "
                  "trained at that budget.")
    if hold and "error" not in hold:
        cells = ", ".join(hold["held_out_cells"])
        for key, what in (("joint", f"{summary['label']}"), ("loss_to_fid", "FID from its measured loss"),
                          ("fid_from_predicted_loss", "FID from the predicted loss")):
            part = hold.get(key)
            if part and "error" not in part:
                rows = part.get("rows") or []
                last = rows[-1] if rows else None
                example = (f"; at its last record predicted {last['predicted']:.4g}, measured {last['measured']:.4g}"
                           if last and "predicted" in last else "")
                inside = (f", {100 * part['fraction_inside']:.0f}% of its records inside the {pct} prediction interval"
                          if math.isfinite(part.get("fraction_inside", math.nan)) else "")
                md.append(f"- The held-out largest cell ({cells}), {what}: median absolute error "
                          f"{100 * part['median_abs_rel_error']:.1f}%{inside}{example}.")
    per_size = summary.get("cells_per_size", 1)  # a summary written before the field existed: one seed per size
    seeds = ("one cell (seed) per size leaves seed-to-seed spread out of the intervals" if per_size < 2 else
             f"the intervals hold the spread of the {per_size} or more cells (seeds) per size, no more")
    md.append("- What it cannot say: the laws hold over the sizes and budgets measured; beyond them (the budgets "
              f"marked beyond the sweep) they are extrapolations, {seeds}, and the FID is the in-house extractor's, "
              "comparable only with itself.")
    return md + [""]


def format_compute_optimal_markdown(summary: dict) -> str:
    """Returns the summary of harness.scaling.compute_optimal_summary as a Markdown section titled
    "Compute-optimal": the table of budgets, the laws, the IsoFLOP budgets, the held-out check, the notes."""
    label = summary["label"]
    pct = f"{100 * summary['level']:g}%"
    md = [
        "## Compute-optimal",
        "",
        f"Given a training budget, the model size and number of training images that minimise the {label}, and "
        "what they reach. Conventions: " + summary["conventions"] + ". Joint law "
        f"{label} = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, Approach 3; Huber loss in log space, "
        "L-BFGS from a grid of starts, as refit by Besiroglu et al. 2024); IsoFLOP profiles (Approach 2) as a check. "
        f"Each value has its {pct} bootstrap percentile interval over cells in brackets "
        f"({summary['n_resamples']} resamples). "
        f"Budgets: {summary['budget_rule']}.",
        "",
        *findings(summary),
        _budgets_markdown(summary),
        "",
    ]
    for key, title in (("joint_law", "Joint law"), ("isoflop", "IsoFLOP profiles"), ("loss_to_fid", "Loss to FID")):
        part = summary.get(key) or {}
        md.append(f"- {title}: " + (part.get("description") or f"not fitted ({part.get('error', 'no data')})"))
    iso = summary.get("isoflop") or {}
    if iso.get("profiles"):
        md += ["", "IsoFLOP budgets:", "", _isoflop_markdown(iso["profiles"], label)]
    md += ["", "### Held-out check", ""] + _holdout_markdown(summary.get("holdout") or {}, label, pct)
    if summary["notes"]:
        md += ["", "Notes:", ""] + [f"- {n}" for n in summary["notes"]]
    return "\n".join(md) + "\n"


def learning_rates(ctx: Context) -> list[str]:
    """The learning-rate table of a sweep that varies train.lr (muP's transfer check); nothing otherwise."""
    if ctx.val_df is None or ctx.val_df.empty or ctx.val_df["lr"].nunique() < 2:
        return []
    table, best = learning_rate_table(ctx.val_df)
    flat = table.reset_index()
    flat.columns = [c if isinstance(c, str) else f"lr {c:g}" for c in flat.columns]
    return ["## Learning rates", "", "Final validation loss of each cell by learning rate (the last validation "
            "record); under muP the best rate found at one width should hold at the others (docs/mup.md).", "",
            _md_table(flat), "", _md_table(best.reset_index()), ""]


def _sections(ctx: Context) -> list[tuple[str, Callable[[Context], list[str]]]]:
    """The page, in order: (name, section). Figures come after the fits they draw."""
    figures = [(name, lambda c, n=name: figure(c, n)) for name in FIGURES]
    return ([("overview", overview), ("measurements", measurements), ("fits", fit_laws),
             ("figures header", lambda c: ["## Figures", ""])]
            + figures + [("paper note", paper_note), ("table 4", table4), ("scaling laws", laws),
                         ("correlation", correlation), ("held-out extrapolation", held_out),
                         ("compute frontier", frontier), ("learning rates", learning_rates),
                         ("compute-optimal", compute_optimal)])


def build_report(sweep_dirs, out_dir: str | os.PathLike | None = None, metric: str = "fid",
                 n_resamples: int = scaling.N_RESAMPLES, allow_mixed: bool = False, seed: int = 0) -> Report:
    """Writes the report of sweep folders (or saved tables); returns where it is and what was not written.

    Raises ValueError only when there is nothing to report (no sweep folder, no cell)."""
    if isinstance(sweep_dirs, (str, os.PathLike)):
        sweep_dirs = [sweep_dirs]
    df = load(sweep_dirs)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dirs[0]) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_table(df, out / "results.csv")
    ctx = Context(df=df, out=out, metric=metric, n_resamples=n_resamples, allow_mixed=allow_mixed, seed=seed)
    sweeps = [s for s in sweep_dirs if Path(s).suffix not in (".csv", ".parquet")]
    if sweeps:
        ctx.val_df = load_validation(sweeps)
    md = [f"# Report: {', '.join(str(s) for s in sweep_dirs)}", ""]
    try:
        comparable(df, metric, allow_mixed=allow_mixed)
        sections = _sections(ctx)
    except ValueError as e:  # nothing evaluated yet: the overview, and what the validation loss says
        md += [f"**No figures or fits of {metric}**: {e}", ""]
        sections = [("overview", overview), ("learning rates", learning_rates), ("compute-optimal", compute_optimal)]
    not_written = []
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            _start_optimal_jobs(ctx, pool)
        except Exception as e:  # noqa: BLE001 - no second process here: the section computes in this one
            ctx.optimal_jobs.clear()
            warnings.warn(f"the compute-optimal fits run in this process ({cli.one_line(e)})", stacklevel=2)
        for name, section in sections:
            try:
                md += section(ctx)
            except Exception as e:  # noqa: BLE001 - one failing section must not cost the others
                not_written.append(name)
                md += [f"**{name}: not written** ({type(e).__name__}: {cli.one_line(e)})", ""]
    if not_written:
        md[2:2] = [f"Not written, see below: {', '.join(not_written)}.", ""]
    path = _write_text(out / "report.md", "\n".join(md))
    return Report(path=path, not_written=not_written, correlation=ctx.correlation, last=last_evaluations(df), table=df)


def write_report(sweep_dirs, out_dir: str | os.PathLike | None = None, metric: str = "fid",
                 n_resamples: int = scaling.N_RESAMPLES, allow_mixed: bool = False, seed: int = 0) -> Path:
    """Writes the report (see build_report) and returns the report.md path."""
    return build_report(sweep_dirs, out_dir, metric, n_resamples, allow_mixed, seed).path


@cli.guard
def main(argv: list[str] | None = None) -> int:
    """CLI: write the report of one or several sweep folders."""
    ap = cli.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", help="sweep folders or saved results tables")
    ap.add_argument("--out", help=f"output folder (default: first SWEEP_DIR/{REPORT_DIR})")
    ap.add_argument("--metric", default="fid")
    ap.add_argument("--resamples", type=int, default=scaling.N_RESAMPLES, help="bootstrap resamples")
    ap.add_argument("--allow-mixed", action="store_true", help="fit across sample counts / extractors")
    args = ap.parse_args(argv)
    if args.resamples < 0:
        ap.error(f"argument --resamples: {args.resamples} is negative; allowed: 0 or more")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"argument --out: {args.out} is a file; allowed: a folder (created when missing)")
    report = build_report(args.sweep_dirs, args.out, args.metric, args.resamples, args.allow_mixed)
    print(f"wrote {report.path}")
    if report.not_written:
        print(f"not written: {', '.join(report.not_written)} (see the report)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
