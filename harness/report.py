"""A sweep's report: figures (PNG + PDF), Table 4, fitted laws with intervals, a Markdown page.

    python -m harness.report SWEEP_DIR [SWEEP_DIR...] [--out DIR] [--resamples 1000]

Writes into SWEEP_DIR/report/ by default (the first sweep folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import pandas as pd

from harness import plots, scaling
from harness.results import _atomic_write, comparable, load, save_table

REPORT_DIR = "report"


def _write_text(path: Path, text: str) -> Path:
    _atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _md_table(df: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """Returns `df` as a Markdown table (no tabulate dependency)."""

    def fmt(v):
        if isinstance(v, float):
            return "" if pd.isna(v) else format(v, floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(
    sweep_dirs,
    out_dir: str | os.PathLike | None = None,
    metric: str = "fid",
    n_resamples: int = scaling.N_RESAMPLES,
    allow_mixed: bool = False,
    seed: int = 0,
) -> Path:
    """Writes the report for one or several sweep folders (or saved tables) and returns the report.md path."""
    if isinstance(sweep_dirs, (str, os.PathLike)):
        sweep_dirs = [sweep_dirs]
    df = load(sweep_dirs)
    out = Path(out_dir) if out_dir is not None else Path(sweep_dirs[0]) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_table(df, out / "results.csv")
    cells = df.drop_duplicates("cell_id")
    md = [
        f"# Report: {', '.join(str(s) for s in sweep_dirs)}",
        "",
        f"{len(cells)} cells, {int(df['evaluated'].sum())} evaluations; cells by state: "
        f"{cells['state'].value_counts().to_dict()}. Full table: [results.csv](results.csv).",
        "",
    ]
    unfinished = cells[cells["state"] != "finished"]
    if len(unfinished):
        md += ["Cells not finished:", "", _md_table(unfinished[["cell_id", "state", "reason", "step"]]), ""]
    try:
        rows, label = comparable(df, metric, allow_mixed=allow_mixed)
    except ValueError as e:
        md += [f"**No figures or fits**: {e}", ""]
        return _write_text(out / "report.md", "\n".join(md))

    fits = {}
    for key, x, form in (
        ("gflops_floor", "gflops", "floor"),
        ("gflops_power", "gflops", "power"),
        ("compute_floor", "train_compute_gflops", "floor"),
        ("compute_power", "train_compute_gflops", "power"),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fits[key] = scaling.fit_table(
                    df,
                    x=x,
                    metric=metric,
                    form=form,
                    allow_mixed=allow_mixed,
                    n_resamples=n_resamples,
                    seed=seed,
                )
        except ValueError as e:
            md.append(f"- fit {key} skipped: {e}")
    if "val_loss" in df and df["val_loss"].notna().any():
        try:
            fits["val_loss_gflops_power"] = scaling.fit_table(
                df, x="gflops", metric="val_loss", form="power", n_resamples=n_resamples, seed=seed
            )
        except ValueError as e:
            md.append(f"- validation-loss fit skipped: {e}")

    # Each figure draws the floor law unless the bootstrap leaves it undetermined; then the power law.
    laws = {}
    for fig_name, key in (("fig8_gflops", "gflops"), ("fig9_compute", "compute")):
        floor, power = fits.get(f"{key}_floor"), fits.get(f"{key}_power")
        laws[fig_name] = {"law": floor, "fallback": power}
        drawn, _ = plots.choose_law(floor, power)
        if floor is not None and drawn is not floor:
            laws[fig_name]["note"] = (
                f"The line is the power law `{key}_power`: the floor law `{key}_floor` is undetermined "
                f"({plots.law_problem(floor)})."
            )
    figures = {
        "fig2_bubbles": ("Fig 2: FID at the comparison step, bubble area = Gflops", plots.fig2_bubbles, {}),
        "fig5_conditioning": ("Fig 5: conditioning variants over training", plots.fig5_conditioning, {}),
        "fig6_training": ("Fig 6: FID over training, by patch and by size", plots.fig6_training, {}),
        "fig8_gflops": ("Fig 8: FID against Gflops", plots.fig8_gflops, laws["fig8_gflops"]),
        "fig9_compute": ("Fig 9: FID against training compute", plots.fig9_compute, laws["fig9_compute"]),
    }
    md += ["## Figures", ""]
    for name, (title, fn, kw) in figures.items():
        if name == "fig5_conditioning" and df["cond"].nunique() < 2:
            md += [f"- {title}: skipped, the sweep has one conditioning variant only", ""]
            continue
        kw = dict(kw)
        note = kw.pop("note", None)
        try:
            fig = fn(df, metric=metric, allow_mixed=allow_mixed, **kw)
        except ValueError as e:
            md += [f"- {title}: skipped ({e})", ""]
            continue
        paths = plots.save_figure(fig, out, name)
        md += [f"### {title}", "", f"![{title}]({paths[0].name}) ([PDF]({paths[1].name}))", ""]
        if note:
            md += [note, ""]
    comparable_to_paper = plots.paper_comparable(rows, metric)
    md += [
        "Stars mark the paper's values (FID-50K, ImageNet 256x256, 400K steps, no guidance)."
        + (
            ""
            if comparable_to_paper
            else f" Our numbers ({label}) are another metric (another extractor or data set), so the paper's "
            "values are drawn in their own panel, on their own axes, and not directly comparable."
        )
        + ("" if label == "FID-50K" or not comparable_to_paper else " Fewer samples than 50K inflate FID."),
        "",
    ]

    t4 = plots.table4(df, metric=metric, allow_mixed=allow_mixed)
    save_table(t4, out / "table4.csv")
    md += ["## Table 4", "", _md_table(t4), "", "[table4.csv](table4.csv)", ""]

    md += [
        "## Scaling laws",
        "",
        f"Fitted in log space, Huber loss (delta {scaling.HUBER_DELTA:g}), L-BFGS from a "
        f"grid of starts; {n_resamples} bootstrap resamples over cells, {100 * scaling.LEVEL:g}% percentile "
        "intervals. Against training compute the fit uses the compute frontier.",
        "",
    ]
    md += [f"- `{k}`: {law.describe()} ({law.n_failed} resamples failed)" for k, law in fits.items()]
    _write_text(out / "fits.json", json.dumps({k: law.to_dict() for k, law in fits.items()}, indent=2))
    md += ["", "All parameters: [fits.json](fits.json).", ""]

    md += ["### Correlation of FID with Gflops", ""]
    try:
        ours = scaling.gflops_correlation(df, metric, allow_mixed=allow_mixed)
        paper = scaling.paper_correlations()
        corr = pd.DataFrame(
            {
                "correlation": [
                    "Pearson(FID, log10 Gflops)",
                    "Pearson(FID, Gflops)",
                    "Pearson(log FID, log Gflops)",
                    "Spearman",
                ],
                "ours": [ours[k] for k in ("pearson_log10_gflops", "pearson_gflops", "pearson_log_log", "spearman")],
                "paper Table 4": [
                    paper[k] for k in ("pearson_log10_gflops", "pearson_gflops", "pearson_log_log", "spearman")
                ],
            }
        )
        md += [
            f"{ours['label']} at step {ours['step']:,}, {ours['n']} cells. The paper's -0.93 (Fig 8) is "
            "the Pearson correlation of FID with log10 Gflops.",
            "",
            _md_table(corr, ".3f"),
            "",
        ]
    except ValueError as e:
        md += [f"skipped: {e}", ""]

    md += [
        "### Held-out extrapolation",
        "",
        "Power law fitted on the cheaper cells, predicting the two most expensive ones.",
        "",
    ]
    for x in ("gflops", "train_compute_gflops"):
        try:
            ex = scaling.extrapolation_check(df, x=x, metric=metric, form="power", allow_mixed=allow_mixed)
            md += [f"Against `{x}`:", "", _md_table(ex), ""]
        except ValueError as e:
            md += [f"Against `{x}`: skipped ({e})", ""]

    frontier = scaling.compute_frontier(df, metric=metric, allow_mixed=allow_mixed)
    md += [
        "### Compute frontier",
        "",
        "The cell with the lowest value within each training budget:",
        "",
        _md_table(frontier[["budget", "cell_id", "step", metric]]),
        "",
    ]
    return _write_text(out / "report.md", "\n".join(md))


def main(argv: list[str] | None = None) -> int:
    """CLI: write the report of one or several sweep folders."""
    ap = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", help="sweep folders or saved results tables")
    ap.add_argument("--out", help=f"output folder (default: first SWEEP_DIR/{REPORT_DIR})")
    ap.add_argument("--metric", default="fid")
    ap.add_argument("--resamples", type=int, default=scaling.N_RESAMPLES, help="bootstrap resamples")
    ap.add_argument("--allow-mixed", action="store_true", help="fit across sample counts / extractors")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.sweep_dirs, args.out, args.metric, args.resamples, args.allow_mixed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
