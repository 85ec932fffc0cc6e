"""The rows a compute-optimal law is fitted to, and what the data must hold for a law to be determined.

Which rows may share one law (one data set, objective and parametrization: `_one_setting`), the validation
table's rows (`validation_points`), the checks every fit makes of its input (positive values, one size per
cell, enough records per cell), and the thresholds those checks and "not determined" use. The conventions
(size in forward Gflops per image, D in images seen) are those of harness.scaling.joint.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from harness.results import EPOCHS_WORTH_LESS, HELDOUT_COLUMNS, TRAIN_BATCH_COLUMNS, alike
from harness.results import envelope as envelope_rows

# The joint law has 5 parameters. alpha needs sizes beyond two (with two, alpha and A trade against E),
# beta needs several record points per cell (each cell's curve over images); 3 sizes x 2 records = 6 points.
MIN_SIZES = 3
MIN_RECORDS_PER_CELL = 2
# A term whose largest value on the data is below this fraction of the smallest measured value is not told
# apart from no term at all; an interval that reaches it is "not determined".
NEGLIGIBLE_FRAC = 0.01
# Columns whose values must agree for points to share one law: another data set or another objective is
# another loss surface (e.g. a flow-matching loss is not a DDPM loss), another parametrization another training
# recipe. An absent column counts as one value.
MIX_COLUMNS = ("data", "objective", "parametrization")
VALIDATION_COLUMNS = ("cell_id", "gflops", "images_seen")


def warn_repeated(rows: pd.DataFrame, what: str) -> None:
    """Warns when a law fits records past EPOCHS_WORTH_LESS epochs (repeated images are worth less than fresh ones:
    such points bend a law fitted as if every image were new)."""
    if "epochs" not in rows:
        return
    past = rows[pd.to_numeric(rows["epochs"], errors="coerce") > EPOCHS_WORTH_LESS]
    if len(past):
        cells = sorted(past["cell_id"].astype(str).unique())[:6]
        warnings.warn(f"the {what} fits {len(past)} of {len(rows)} records past {EPOCHS_WORTH_LESS:g} epochs (up to "
                      f"{float(past['epochs'].max()):.0f}) in cells {cells}: repeated images are worth less than "
                      "fresh ones (Muennighoff et al. 2023)", stacklevel=3)


def _as_1d(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    return arr


def _check_positive(name: str, values: np.ndarray, groups: np.ndarray) -> None:
    bad = ~np.isfinite(values) | (values <= 0)
    if bad.any():
        cells = sorted({str(g) for g in groups[bad]})
        raise ValueError(
            f"{name} must be finite and positive for a log-space fit; {int(bad.sum())} bad values in cells "
            f"{cells[:8]}{' ...' if len(cells) > 8 else ''}"
        )


def _check_cells(size: np.ndarray, images: np.ndarray, groups: np.ndarray, what: str) -> None:
    """Raises a ValueError naming cells with one size but several, or with too few records."""
    df = pd.DataFrame({"g": groups, "size": size, "images": images})
    per = df.groupby("g").agg(n_sizes=("size", "nunique"), n_images=("images", "nunique"))
    several = per.index[per["n_sizes"] > 1].tolist()
    if several:
        raise ValueError(f"each cell must have one size; cells with several: {[str(g) for g in several[:8]]}")
    few = per.index[per["n_images"] < MIN_RECORDS_PER_CELL].tolist()
    if few:
        raise ValueError(
            f"{what} needs at least {MIN_RECORDS_PER_CELL} records (distinct images seen) per cell to see "
            f"each cell's curve over data; cells with fewer: {[str(g) for g in few[:8]]}"
            f"{' ...' if len(few) > 8 else ''} (drop them, or wait for more records)"
        )


def _one_setting(rows: pd.DataFrame, allow_mixed: bool, what: str, settings: bool = True) -> None:
    """Raises a ValueError when `rows` mix data sets, objectives or parametrizations (each another loss surface),
    then, with `settings`, when they differ in any other training setting (harness.results.alike); nothing with
    `allow_mixed`."""
    if allow_mixed:
        return
    for col in MIX_COLUMNS:
        if col in rows:
            values = sorted(str(v) for v in rows[col].dropna().unique())
            if len(values) > 1:
                by = rows.groupby(col)["cell_id"].unique().map(lambda c: [str(x) for x in c[:3]]).to_dict()
                raise ValueError(
                    f"refusing to fit one {what} across {col} values {values} (another {col} is another loss "
                    f"surface); cells by {col}: {by}. Select one, e.g. df[df.{col} == {values[0]!r}], "
                    f"or pass allow_mixed=True"
                )
    if settings:
        alike(rows, what, allow_mixed)


def validation_points(
    val_df: pd.DataFrame,
    metric: str = "val_loss_ema",
    cond: str | None = "adaln_zero",
    allow_mixed: bool = False,
    envelope: bool = False,
) -> pd.DataFrame:
    """Returns the validation table's rows to fit: columns cell_id, gflops, images_seen, `metric`, one row per
    (cell, images seen), sorted. ValueError naming the cells with missing or non-positive values.

    Only `cond` cells are used when the table has a `cond` column (cond=None keeps all). Cells that differ in any
    training setting off the law's axes are refused, naming the settings, unless `allow_mixed`; `envelope` fits
    the best cell at each size and duration instead (harness.results.envelope). A fixed training batch's loss
    (`train_batch_loss`: a data set without a held-out split) is fitted only when asked for by name; records past
    EPOCHS_WORTH_LESS epochs of repetition are fitted with a warning.
    """
    if not isinstance(val_df, pd.DataFrame):
        raise ValueError(f"expected a validation table (pandas DataFrame), got {type(val_df).__name__}")
    missing = [c for c in (*VALIDATION_COLUMNS, metric) if c not in val_df.columns]
    if missing:
        raise ValueError(f"the validation table lacks columns {missing}; it has {list(val_df.columns)}")
    rows = val_df
    if cond is not None and "cond" in rows:
        rows = rows[rows["cond"] == cond]
        if rows.empty:
            raise ValueError(f"no row with cond={cond!r}; conds present: {sorted(val_df['cond'].dropna().unique())}")
    if rows.empty:
        raise ValueError("the validation table has no rows")
    train_batch = [c for c in TRAIN_BATCH_COLUMNS if c in rows and rows[c].notna().any()]
    if metric in HELDOUT_COLUMNS and rows[metric].isna().all() and train_batch:
        raise ValueError(f"no held-out {metric} in these cells: only a fixed training-batch loss (a data set "
                         "without a held-out split, or cells validated before held-out validation existed; "
                         "python -m harness.evaluate run_dir=... step=all validation=only measures kept checkpoints). "
                         "Fit it anyway by name: metric='train_batch_loss' (or 'train_batch_loss_ema')")
    _one_setting(rows, allow_mixed, f"law of {metric}", settings=not envelope)
    if envelope:
        rows = envelope_rows(rows, metric)
    warn_repeated(rows, f"law of {metric}")
    for col in ("gflops", "images_seen", metric):
        v = pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(v) | (v <= 0)
        if bad.any():
            cells = sorted(rows.loc[bad, "cell_id"].astype(str).unique())
            raise ValueError(
                f"{col} must be finite and positive; missing or non-positive in {int(bad.sum())} rows of cells "
                f"{cells[:8]}{' ...' if len(cells) > 8 else ''} (drop those cells, or fill the values)"
            )
    keep = ["cell_id", "gflops", "images_seen", metric]
    # A record logged twice (e.g. around a resume) counts once: the mean of its values.
    out = rows[keep].groupby(["cell_id", "gflops", "images_seen"], as_index=False)[metric].mean()
    return out.sort_values(["gflops", "cell_id", "images_seen"]).reset_index(drop=True)

