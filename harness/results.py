"""Run folders -> one tidy pandas table, a row per (cell, evaluated step).

The analysis reads what each run wrote (cell.json, status.json, metrics.jsonl, evals/step_N.json, see
docs/run_folder.md), never a launcher's idea of what happened. Half-finished and failed cells load with
their state; a cell with no evaluation yet gives one row with `evaluated=False` and empty metrics.

    python -m harness.results SWEEP_DIR... --csv results.csv [--parquet results.parquet]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from harness.core import cli
from harness.core.compute import paper_table, train_compute_gflops, train_flops
from harness.core.config import Config, training_settings
from harness.core.runfolder import atomic_open, read_jsonl, read_status
from harness.core.vocabulary import (  # noqa: F401 - the labels the results table uses, read from here by the analysis
    NAMES,
    PAPER_EXTRACTOR,
    VALUE_KEYS,
    format_samples,
    metric_label,
    weights_id,
)

SWEEP_MARKER = "sweep.json"
CELL_FILE = "cell.json"
# step_N.json, and step_N_<settings hash>.json for a later evaluation of the same step with other settings
EVAL_FILE_RE = re.compile(r"^step_(\d+)(?:_[0-9a-f]{8})?\.json$")
PAPER_NUM_SAMPLES = 50_000  # FID-50K (paper, Table 4)
PAPER_GLOBAL_BATCH = 256  # paper, section 5: every cell of the grid trains with batch 256
METRICS = VALUE_KEYS  # the metric columns, in the order tables show them
# Evaluation settings carried into the table: they decide whether two numbers are comparable.
EVAL_SETTINGS = (
    "num_samples",
    "preset",
    "extractor",
    "reference_stats_id",
    "sampler",
    "sampling_steps",
    "cfg_scale",
    "cfg_channels",
    "weights",
    "label_sampling",
    "guided",
    "settings_hash",
)
CELL_COLUMNS = (
    "model",
    "patch",
    "cond",
    "data",
    "seed",
    "input_size",
    "in_channels",
    "tokens",
    "params",
    "gflops",
    "global_batch",
    "steps",
    "off_paper",
    "objective",
    "parametrization",
    "mup_base_width",
    "lr",
    "config_hash",
)
# The facts of cell.json that are training settings, what a cell without a readable config.yaml is compared by.
SETTING_FACTS = ("cond", "data", "objective", "parametrization", "mup_base_width", "lr", "global_batch")
# What cells made before a fact existed did: cell.json of an older harness lacks these keys.
CELL_DEFAULTS = {"objective": "ddpm", "parametrization": "sp"}
COLUMNS = (
    "sweep",
    "cell_id",
    *CELL_COLUMNS,
    "state",
    "reason",
    "evaluated",
    "step",
    "images_seen",
    "train_compute_gflops",
    "train_flops",
    *METRICS,
    *EVAL_SETTINGS,
    "val_loss",
    "train_loss",
    "wall_s",
    "gpu_hours",
    "eval_wall_s",
    "eval_gpu_hours",
    "val_loss_se",
    "val_loss_ema",
    "val_loss_ema_se",
    "train_batch_loss",
    "train_batch_loss_ema",
    "val_split",
    "val_images",
    "epochs",
    "unique_train_images",
    "extractor_weights",
    "extractor_current",
    "settings_key",
    "settings",
    "samples_npz",
    *(f"{k}_floor{s}" for k in ("fid", "sfid", "precision", "recall") for s in ("", "_spread")),
    "run_dir",
)
# The metrics whose floor a record carries, as columns `<metric>_floor` and `<metric>_floor_spread`.
FLOOR_KEYS = ("fid", "sfid", "kid_mean", "precision", "recall", "fd_dinov2")


def _read_json(path: Path) -> dict:
    """Returns the JSON object in `path`; a clear ValueError when it is not one."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_jsonl(path: Path) -> list[dict]:
    """Returns the records of the current training run of an append-only JSON-lines log: a torn last line
    (a killed writer) is skipped, and so is everything before the last `restart` event (a run started over
    after its checkpoints were lost: the results read only the new run)."""
    records = read_jsonl(path)
    starts = [i for i, r in enumerate(records) if r.get("event") == "restart"]
    return records[starts[-1] + 1:] if starts else records


def is_sweep_dir(path: str | os.PathLike) -> bool:
    """Returns True when `path` holds sweep.json or at least one run folder (a subfolder with cell.json)."""
    path = Path(path)
    return path.is_dir() and ((path / SWEEP_MARKER).exists() or any(path.glob(f"*/{CELL_FILE}")))


def run_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """Returns the run folders of a sweep folder, sorted by name; ValueError when it is not a sweep folder."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep folder {str(sweep_dir)!r} does not exist or is not a folder")
    if not is_sweep_dir(sweep_dir):
        raise ValueError(
            f"{str(sweep_dir)!r} is not a sweep folder: it has neither {SWEEP_MARKER} nor "
            f"run folders (subfolders with {CELL_FILE}); see docs/run_folder.md"
        )
    return sorted(p.parent for p in sweep_dir.glob(f"*/{CELL_FILE}"))


# The loss columns of a validation line (harness.heldout): `val_*` on held-out images, `train_batch_*` on a fixed
# batch of training images (a data set without a held-out split), each with its standard error.
HELDOUT_COLUMNS = ("val_loss", "val_loss_se", "val_loss_ema", "val_loss_ema_se", "val_vb", "val_vb_ema")
TRAIN_BATCH_COLUMNS = ("train_batch_loss", "train_batch_loss_se", "train_batch_loss_ema", "train_batch_loss_ema_se",
                       "train_batch_vb", "train_batch_vb_ema")
LOSS_COLUMNS = HELDOUT_COLUMNS + TRAIN_BATCH_COLUMNS
# Epochs past which repeated images are worth less than fresh ones (Muennighoff et al. 2023, "Scaling Data-
# Constrained Language Models": up to about 4 epochs of repetition is nearly as good as new data).
EPOCHS_WORTH_LESS = 4.0


def validation_lines(metrics: list[dict]) -> dict[int, dict]:
    """Returns {step: {loss column: value, "val_split", "val_images", "val_times", "images_seen", "epochs",
    "unique_train_images"}} of a run's log, the last line of a step winning per column.

    Important: lines written before held-out validation existed hold "val_loss"/"val_loss_ema" measured on a fixed
    batch of training images (and, under DDPM, mse + vb): they read as `train_batch_loss`/`train_batch_loss_ema`,
    never as validation losses."""
    out: dict[int, dict] = {}
    for r in metrics:
        if "step" not in r:
            continue
        how = r.get("validation")
        if isinstance(how, dict):
            values = {k: r[k] for k in LOSS_COLUMNS if k in r}
            if how.get("heldout"):
                values.update(val_split=how.get("split"), val_images=how.get("num_images"), val_times=how.get("times"))
        elif "val_loss" in r:  # an earlier version's fixed training batch
            values = {"train_batch_loss": r["val_loss"], "train_batch_loss_ema": r.get("val_loss_ema", np.nan)}
        else:
            continue
        for k in ("images_seen", "epochs", "unique_train_images"):
            if r.get(k) is not None:
                values[k] = r[k]
        out.setdefault(int(r["step"]), {}).update(values)
    return out


# The validation loss of the weights an evaluation sampled from (eval.weights): what a loss-to-FID law pairs with
# its FID, and so the loss the compute-optimal laws fit when they predict FID.
LOSS_OF_WEIGHTS = {"ema": "val_loss_ema", "model": "val_loss"}


def evaluated_loss(eval_df: pd.DataFrame | None) -> str:
    """Returns the validation-loss column of the weights the table's evaluations sampled from (the EMA model's,
    the paper's protocol, unless every record says `weights: model`)."""
    weights = set() if eval_df is None or "weights" not in eval_df else set(eval_df["weights"].dropna())
    return LOSS_OF_WEIGHTS["model"] if weights == {"model"} else LOSS_OF_WEIGHTS["ema"]


def epochs_of(images_seen, unique) -> float:
    """Returns images seen / distinct training images (NaN when unknown or for a stream that never repeats)."""
    if unique is None or pd.isna(unique) or not unique or images_seen is None or pd.isna(images_seen):
        return np.nan
    return float(images_seen) / float(unique)


def _train_loss_at(metrics: list[dict], step: int) -> float:
    """Returns the last training loss logged at or before `step` (NaN when none)."""
    vals = [m["loss"] for m in metrics if "loss" in m and m.get("step", -1) <= step]
    return float(vals[-1]) if vals else float("nan")


def load_run(run_dir: str | os.PathLike, sweep: str | None = None) -> list[dict]:
    """Returns the table rows of one run folder: one per evaluation, or one `evaluated=False` row if none."""
    run_dir = Path(run_dir)
    cell = _read_json(run_dir / CELL_FILE)
    status = read_status(run_dir)  # a torn status.json reads as rebuilt from the run folder
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    base = {
        "sweep": sweep if sweep is not None else run_dir.parent.name,
        "cell_id": cell.get("cell_id", run_dir.name),
        "run_dir": str(run_dir),
    }
    for k in CELL_COLUMNS:
        base[k] = cell.get(k, CELL_DEFAULTS.get(k))
    settings = _settings(run_dir, cell)
    base["settings"] = json.dumps(settings, sort_keys=True, default=str)
    base["settings_key"] = hashlib.sha256(base["settings"].encode()).hexdigest()[:8]
    base["state"] = status.get("state", "pending")
    base["reason"] = status.get("reason")
    base["wall_s"] = status.get("wall_s", np.nan)
    base["gpu_hours"] = status.get("gpu_hours", np.nan)

    evals = []
    eval_dir = run_dir / "evals"
    if eval_dir.is_dir():
        for p in eval_dir.iterdir():
            if EVAL_FILE_RE.match(p.name):
                try:
                    evals.append(_read_json(p))
                except ValueError as e:  # a torn record: the next evaluation writes it again
                    warnings.warn(f"skipping evaluation record {p}: {e}", stacklevel=2)
    val = validation_lines(metrics)
    unique = cell.get("unique_train_images")
    rows = []
    evals.sort(key=lambda e: e["step"])
    for ev in evals:
        row = dict(base, evaluated=True, step=int(ev["step"]))
        row["images_seen"] = ev.get("images_seen", row["step"] * (base["global_batch"] or 0))
        for k, v in ev.get("metrics", {}).items():
            row[k] = v
        for k in EVAL_SETTINGS:
            row[k] = ev.get(k)
        if row.get("guided") is None:  # records older than the field: guided exactly when cfg_scale > 1
            row["guided"] = bool((ev.get("cfg_scale") or 1.0) > 1.0)
        row["samples_npz"] = str(run_dir / ev["samples"]) if ev.get("samples") else None
        row["eval_wall_s"] = ev.get("wall_s", np.nan)
        row["eval_gpu_hours"] = ev.get("gpu_hours", np.nan)
        floor = (ev.get("floor") or {}).get("values") or {}
        for k in FLOOR_KEYS:  # what as many real images get against the same reference (harness.metrics.floors)
            row[f"{k}_floor"] = floor.get(k, {}).get("mean", np.nan)
            row[f"{k}_floor_spread"] = floor.get(k, {}).get("spread", np.nan)
        row["extractor_weights"] = _extractor_weights(ev)
        row["extractor_current"] = weights_id(row["extractor"]) in (None, row["extractor_weights"])
        unique = ev.get("unique_train_images") or unique
        rows.append(row)
    rows = _one_per_measurement(rows, [len(ev) for ev in evals])
    if not rows:
        # A pending, running or failed cell: keep it in the table so its state is visible.
        step = int(status.get("step", 0) or 0)
        rows.append(dict(base, evaluated=False, step=step, images_seen=step * (base["global_batch"] or 0)))
    for row in rows:
        # The losses measured at exactly this step (the trainer validates at every evaluation step; so does the
        # evaluation of a kept checkpoint): never an older line's.
        at = val.get(row["step"], {})
        for k in LOSS_COLUMNS + ("val_split", "val_images"):
            row[k] = at.get(k, np.nan)
        row["unique_train_images"] = at.get("unique_train_images", unique)
        row["epochs"] = epochs_of(row["images_seen"], row["unique_train_images"])
        row["train_loss"] = _train_loss_at(metrics, row["step"])
    return rows


def _one_per_measurement(rows: list[dict], fields: list[int]) -> list[dict]:
    """Returns `rows` with one row per measurement: records of one step made the same way (every evaluation
    setting equal, the extractor's weights included) but under two settings hashes are one measurement, the
    record of an earlier harness (whose hash covers fewer settings) and the one a later harness wrote beside it.
    Counted twice they would weigh twice in a fit. Keeps the one with more fields (the later); order kept."""
    def key(row: dict) -> tuple:
        return (row["step"], row["extractor_weights"],
                *(json.dumps(row.get(k), default=str) for k in EVAL_SETTINGS if k != "settings_hash"))

    best: dict[tuple, int] = {}
    for i, row in enumerate(rows):
        j = best.get(key(row))
        if j is None or fields[i] >= fields[j]:
            best[key(row)] = i
    keep = set(best.values())
    return [row for i, row in enumerate(rows) if i in keep]


def _extractor_weights(record: dict) -> str | None:
    """Returns the 12-digit weights id of the extractor a record was made with: its own field, else (records older
    than the field) the hash its extractor_info holds; None for extractors pinned elsewhere (Inception)."""
    if record.get("extractor_weights"):
        return record["extractor_weights"]
    info = record.get("extractor_info") or {}
    return str(info["weights_sha256"])[:12] if info.get("weights_sha256") else None


def _settings(run_dir: Path, cell: dict) -> dict:
    """Returns what a cell trained with off the law's axes (harness.core.config.training_settings): from cell.json,
    or for a cell made before cell.json held it, from its config.yaml read onto the schema."""
    if isinstance(cell.get("settings"), dict):
        return cell["settings"]
    if not (run_dir / "config.yaml").exists():  # a folder written by hand (or a test fixture): its facts only
        return {k: cell.get(k, CELL_DEFAULTS.get(k)) for k in SETTING_FACTS}
    try:
        saved = OmegaConf.load(run_dir / "config.yaml")
        return training_settings(OmegaConf.merge(OmegaConf.structured(Config), saved))
    except Exception as e:  # noqa: BLE001 - an unreadable config: the cell is compared by its cell.json facts only
        warnings.warn(f"{run_dir}: cannot read config.yaml for its training settings ({e})", stacklevel=2)
        return {k: cell.get(k, CELL_DEFAULTS.get(k)) for k in SETTING_FACTS}


VALIDATION_COLUMNS = ("sweep", "cell_id", *CELL_COLUMNS, "state", "step", "images_seen", "epochs",
                      "unique_train_images", "train_compute_gflops", *LOSS_COLUMNS, "val_split", "val_images",
                      "val_times", "settings_key", "settings", "run_dir")


def load_validation_run(run_dir: str | os.PathLike, sweep: str | None = None) -> list[dict]:
    """Returns one row per validated step of a run's current training: its held-out losses (`val_*`) and
    training-batch losses (`train_batch_*`), each with its standard error where measured, NaN where not."""
    run_dir = Path(run_dir)
    cell = _read_json(run_dir / CELL_FILE)
    settings = json.dumps(_settings(run_dir, cell), sort_keys=True, default=str)
    base = {"sweep": sweep if sweep is not None else run_dir.parent.name, "cell_id": cell.get("cell_id", run_dir.name),
            "state": read_status(run_dir).get("state", "pending"), "run_dir": str(run_dir), "settings": settings,
            "settings_key": hashlib.sha256(settings.encode()).hexdigest()[:8]}
    for k in CELL_COLUMNS:
        base[k] = cell.get(k, CELL_DEFAULTS.get(k))
    rows = []
    for step, values in sorted(validation_lines(_read_jsonl(run_dir / "metrics.jsonl")).items()):
        row = dict(base, step=step, images_seen=values.get("images_seen", step * (base["global_batch"] or 0)))
        row.update({k: values.get(k, np.nan) for k in (*LOSS_COLUMNS, "val_split", "val_images", "val_times")})
        row["unique_train_images"] = values.get("unique_train_images")
        row["epochs"] = epochs_of(row["images_seen"], row["unique_train_images"])
        rows.append(row)
    return rows


def _folder_list(sweep_dirs: str | os.PathLike | list) -> list:
    """Returns one sweep folder or several as a list; ValueError when none is given."""
    if isinstance(sweep_dirs, (str, os.PathLike)):
        sweep_dirs = [sweep_dirs]
    if not sweep_dirs:
        raise ValueError("no sweep folder given")
    return list(sweep_dirs)


def load_validation(sweep_dirs: str | os.PathLike | list) -> pd.DataFrame:
    """Returns the validation table: one row per (cell, validation record) of one or several sweep folders, with
    the cell's facts, images seen and training compute (Gflop units, the paper's convention). The validation
    loss is recorded often (every train.val_every steps), so the compute-optimal laws fit it
    (harness.scaling: fit_joint_table, isoflop_profiles)."""
    sweep_dirs = _folder_list(sweep_dirs)
    rows = []
    for sweep_dir in sweep_dirs:
        for run_dir in run_dirs(sweep_dir):
            try:
                rows.extend(load_validation_run(run_dir, sweep=Path(sweep_dir).name))
            except (ValueError, KeyError) as e:
                warnings.warn(f"skipping run folder {run_dir}: {e}", stacklevel=2)
    df = pd.DataFrame(rows, columns=list(VALIDATION_COLUMNS))
    if len(df):
        df["train_compute_gflops"] = _per_row(train_compute_gflops, df["gflops"], df["global_batch"], df["step"])
        df = df.sort_values(["sweep", "cell_id", "step"], kind="stable").reset_index(drop=True)
    return df


def learning_rate_table(val_df: pd.DataFrame, metric: str = "val_loss") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Returns (final `metric` of each cell by learning rate: a row per (objective, parametrization, model,
    patch), a column per lr; the best lr of each row with its value): the learning-rate transfer check of
    muP (Yang et al., Tensor Programs V), read from the cells' last validation records. ValueError when the
    table holds one learning rate."""
    if val_df.empty or val_df["lr"].nunique() < 2:
        raise ValueError(f"the sweep trains {val_df['lr'].nunique() if len(val_df) else 0} learning rate(s); "
                         "a learning-rate table needs at least 2")
    last = val_df.sort_values("step").groupby("cell_id").tail(1)
    keys = ["objective", "parametrization", "model", "patch"]
    table = last.pivot_table(index=keys, columns="lr", values=metric, aggfunc="mean")
    best = pd.DataFrame({"best_lr": table.idxmin(axis=1), f"best_{metric}": table.min(axis=1)})
    return table, best


def _per_row(fn, gflops, global_batch, steps) -> np.ndarray:
    """Returns fn(gflops, global_batch, steps) per row (flops takes scalars); NaN if one is missing."""
    return np.array(
        [
            fn(float(g), int(b), int(s)) if not (pd.isna(g) or pd.isna(b) or pd.isna(s)) else np.nan
            for g, b, s in zip(gflops, np.broadcast_to(global_batch, len(gflops)), steps)
        ],
        dtype=float,
    )


def load_results(sweep_dirs: str | os.PathLike | list) -> pd.DataFrame:
    """Returns one tidy DataFrame, a row per (cell, evaluated step), from one or several sweep folders."""
    sweep_dirs = _folder_list(sweep_dirs)
    rows = []
    for sweep_dir in sweep_dirs:
        sweep_dir = Path(sweep_dir)
        name = sweep_dir.name
        if (sweep_dir / SWEEP_MARKER).exists():
            try:
                name = _read_json(sweep_dir / SWEEP_MARKER).get("name", name)
            except ValueError as e:  # torn: the folder's name serves; the next launch rewrites it
                warnings.warn(f"{e}; naming the sweep {name!r} after its folder", stacklevel=2)
        for run_dir in run_dirs(sweep_dir):
            try:
                rows.extend(load_run(run_dir, sweep=name))
            except (ValueError, KeyError) as e:
                # A corrupt run folder is reported and skipped; one bad cell must not hide the others.
                warnings.warn(f"skipping run folder {run_dir}: {e}", stacklevel=2)
    df = pd.DataFrame(rows)
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    extra = [c for c in df.columns if c not in COLUMNS]  # metrics this harness does not know yet
    df = df[list(COLUMNS) + extra]
    if len(df):
        df["train_compute_gflops"] = _per_row(
            train_compute_gflops, df["gflops"], df["global_batch"], df["step"]
        )
        df["train_flops"] = _per_row(train_flops, df["gflops"], df["global_batch"], df["step"])
        df = df.sort_values(["sweep", "cell_id", "step"], kind="stable").reset_index(drop=True)
    return df


def variant(objective: str | None, parametrization: str | None) -> str:
    """Returns how a cell's training differs from the paper's: '' for the paper's (ddpm, sp), else e.g.
    'flow', 'mup', 'flow mup'."""
    parts = [v for v, paper in ((objective, "ddpm"), (parametrization, "sp")) if v not in (None, paper)
             and not pd.isna(v)]
    return " ".join(str(p) for p in parts)


def variants(df: pd.DataFrame) -> list[str]:
    """Returns the training variants (objective and parametrization, see `variant`) present in `df`."""
    cols = [df.get(c, pd.Series([None] * len(df), index=df.index)) for c in ("objective", "parametrization")]
    return sorted({variant(o, p) for o, p in zip(*cols)})


def comparable(df: pd.DataFrame, metric: str = "fid", allow_mixed: bool = False) -> tuple[pd.DataFrame, str]:
    """Returns (rows with `metric`, axis label); ValueError when they mix sample counts, extractors, guided and
    unguided samples, or (for the validation loss, whose scale is the objective's own) objectives."""
    if metric not in df.columns:
        raise ValueError(
            f"metric {metric!r} is not in the results table; columns with metrics: "
            f"{[c for c in df.columns if c in METRICS or c == 'val_loss']}"
        )
    rows = df[df[metric].notna()]
    if rows.empty:
        states = dict(df.groupby("state")["cell_id"].nunique()) if "state" in df else {}
        raise ValueError(
            f"no cell has an evaluation with {metric!r} (cells by state: {states}); run the evaluation first"
        )
    if metric not in METRICS:  # losses have no sample count or extractor, but each objective its own scale
        objectives = sorted(rows.get("objective", pd.Series(dtype=object)).dropna().unique().tolist())
        if len(objectives) > 1 and not allow_mixed:
            raise ValueError(f"refusing to compare {NAMES.get(metric, metric)} across objectives {objectives}: "
                             "each objective's loss has its own scale. Select one, e.g. "
                             f"df[df.objective == {objectives[0]!r}], or pass allow_mixed=True")
        return rows, metric_label(metric)
    guided = sorted(set(rows["guided"].dropna().astype(bool))) if "guided" in rows else []
    if len(guided) > 1 and not allow_mixed:
        scales = sorted(rows["cfg_scale"].dropna().unique().tolist())
        raise ValueError(f"refusing to mix guided and unguided {NAMES.get(metric, metric)} values (cfg scales "
                         f"{scales}): guidance lowers FID by a factor of several. Select one, e.g. "
                         "df[~df.guided] (the grid's protocol) or df[df.preset == 'fid50k_cfg'], or pass "
                         "allow_mixed=True")
    rows, weights_note = _current_extractor(rows, metric, allow_mixed)
    counts = sorted(rows["num_samples"].dropna().unique().tolist())
    extractors = sorted(rows["extractor"].dropna().unique().tolist())
    hashes = rows["settings_hash"].dropna().unique().tolist() if "settings_hash" in rows else []
    if len(hashes) > 1 and rows.duplicated(["cell_id", "step"]).any() and not allow_mixed:
        raise ValueError(
            f"some (cell, step) pairs were evaluated with several settings ({sorted(hashes)}); select one, "
            f"e.g. df[df.settings_hash == {hashes[0]!r}] or df[df.preset == 'fid50k'], or pass allow_mixed=True"
        )
    mixed = len(counts) > 1 or len(extractors) > 1
    if mixed and not allow_mixed:
        raise ValueError(
            f"refusing to mix incomparable {NAMES.get(metric, metric)} values: sample counts "
            f"{[int(c) for c in counts]}, extractors {extractors} (fewer samples inflate FID; another "
            f"extractor is another metric). Select one setting, e.g. df[df.num_samples == {int(counts[-1])}],"
            f" or pass allow_mixed=True"
        )
    if mixed or len(guided) > 1:
        return rows, f"{NAMES.get(metric, metric)} (mixed settings)"
    label = metric_label(metric, counts[0] if counts else None, extractors[0] if extractors else None) + weights_note
    if guided == [True]:
        scales = sorted(rows["cfg_scale"].dropna().unique().tolist())
        label += f", cfg {'/'.join(f'{s:g}' for s in scales)}"
    return rows, label


def _current_extractor(rows: pd.DataFrame, metric: str, allow_mixed: bool) -> tuple[pd.DataFrame, str]:
    """Returns (the rows measured with the extractor weights this harness ships, a label note): records made with
    an in-house extractor's earlier weights (trained on first use, per machine) are left out wherever the shipped
    weights measured the same metric, and never mixed with them; alone, they are kept and labelled."""
    if "extractor_current" not in rows or allow_mixed:
        return rows, ""
    current = rows["extractor_current"].astype(object).fillna(True).astype(bool)
    if current.any() and not current.all():
        rows = rows[current]
    weights = sorted({str(w) for w in rows.get("extractor_weights", pd.Series(dtype=object)).dropna()})
    if len(weights) > 1:
        raise ValueError(f"refusing to mix {NAMES.get(metric, metric)} values of one extractor with different "
                         f"weights {weights}: each set of weights is another feature space. Select one, e.g. "
                         f"df[df.extractor_weights == {weights[0]!r}], or pass allow_mixed=True")
    if not current.any():
        return rows, f" [earlier extractor weights {weights[0] if weights else '?'}: not comparable across machines]"
    return rows, ""


def differing_settings(rows: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Returns {setting: {value: number of cells}} for every training setting off the law's axes (the `settings`
    column, harness.core.config.training_settings) on which the rows' cells disagree; {} when they all agree. A
    table without the column (hand-made) is compared by the facts every results table has (SETTING_FACTS)."""
    if rows.empty:
        return {}
    per_cell = rows.drop_duplicates("cell_id") if "cell_id" in rows else rows
    if "settings" in per_cell and per_cell["settings"].notna().all():
        settings = [json.loads(s) for s in per_cell["settings"]]
    else:
        cols = [c for c in SETTING_FACTS if c in per_cell]
        settings = [{c: (None if pd.isna(v) else v) for c, v in zip(cols, vals)}
                    for vals in per_cell[cols].itertuples(index=False)]
    keys = sorted({k for s in settings for k in s})
    out = {}
    for k in keys:
        counts: dict[str, int] = {}
        for s in settings:
            v = json.dumps(s.get(k), default=str)
            counts[v] = counts.get(v, 0) + 1
        if len(counts) > 1:
            out[k] = counts
    return out


def alike(rows: pd.DataFrame, what: str, allow_mixed: bool = False) -> None:
    """Raises a ValueError naming each training setting (and its values) on which the rows' cells differ, unless
    `allow_mixed`: one law fits cells that differ only along its axes (size, images seen, seed). A sweep over
    learning rates, batches or EMA decays is several experiments; the ways out are a selection, `allow_mixed`, or
    `envelope` (the best cell at each size and duration, as compute-optimal studies tune the rate per size)."""
    if allow_mixed:
        return
    differ = differing_settings(rows)
    if differ:
        named = "; ".join(f"{k}: " + ", ".join(f"{v} ({n} cells)" for v, n in sorted(vals.items()))
                          for k, vals in differ.items())
        raise ValueError(f"refusing to fit one {what} to cells that differ in {named}; a law's axes are size, "
                         "images seen and seed. Select one setting, pass allow_mixed=True, or fit the envelope "
                         "(envelope=True: at each size and duration, the best cell)")


def envelope(rows: pd.DataFrame, metric: str, size: str = "gflops", duration: str = "images_seen") -> pd.DataFrame:
    """Returns the best-per-size envelope: at each (size, duration), the row with the lowest `metric` among cells
    that differ in their training settings (e.g. the best learning rate of each model at each point of training),
    its cell named `envelope@<size>` so a law sees one curve per size; `envelope_of` keeps the cell it came from."""
    rows = rows[rows[metric].notna()]
    best = rows.loc[rows.groupby([size, duration])[metric].idxmin()].copy()
    best["envelope_of"] = best["cell_id"]
    best["cell_id"] = [f"envelope@{g:.6g}" for g in best[size]]
    return best.sort_values([size, duration]).reset_index(drop=True)


def comparison_step(df: pd.DataFrame, metric: str = "fid") -> int:
    """Returns the step where cells are compared: the latest step evaluated in at least half as many cells
    as the best-covered step (a grid's planned length, undisturbed by a few cells stopped early)."""
    rows = df[df[metric].notna()]
    if rows.empty:
        raise ValueError(f"no evaluated rows with {metric!r}")
    counts = rows.groupby("step")["cell_id"].nunique()
    return int(counts[counts >= counts.max() / 2].index.max())


def save_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Writes `df` atomically as CSV or Parquet (by suffix) and returns the path."""
    path = Path(path)
    if path.suffix not in (".csv", ".parquet"):
        raise ValueError(f"unknown table format {path.suffix!r} for {path}; allowed: '.csv', '.parquet'")
    with atomic_open(path) as f:
        if path.suffix == ".csv":
            df.to_csv(f, index=False)
        else:
            df.to_parquet(f, index=False)
    return path


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Returns a results table saved by `save_table` (CSV or Parquet)."""
    path = Path(path)
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"unknown table format {path.suffix!r} for {path}; allowed: '.csv', '.parquet'")


def load(sources) -> pd.DataFrame:
    """Returns the results table from sweep folders or saved tables (.csv / .parquet), in any mix."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    tables, sweeps = [], []
    for s in sources:
        (tables if Path(s).suffix in (".csv", ".parquet") else sweeps).append(s)
    parts = [read_table(t) for t in tables] + ([load_results(sweeps)] if sweeps else [])
    if not parts:
        raise ValueError("no sweep folder or results table given")
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def paper_results() -> pd.DataFrame:
    """Returns the paper's Table 4 at 256x256 as a results table (FID-50K, Inception, no guidance)."""
    t = pd.DataFrame(paper_table())
    t = t[t["resolution"] == 256]
    steps = (t["train_steps_k"] * 1000).astype(int)
    df = pd.DataFrame(
        {
            "sweep": "paper",
            "cell_id": [
                f"paper_DiT-{m}-{p}_{c}_{s // 1000}k"
                for m, p, c, s in zip(t["model"], t["patch"], t["cond"], steps)
            ],
            "model": t["model"].to_numpy(),
            "patch": t["patch"].to_numpy(),
            "cond": t["cond"].to_numpy(),
            "data": "imagenet",
            "tokens": (32 // t["patch"]).to_numpy() ** 2,
            "params": (t["params_m"] * 1e6).to_numpy(),
            "gflops": t["gflops"].to_numpy(),
            "global_batch": PAPER_GLOBAL_BATCH,
            "steps": steps.to_numpy(),
            "state": "finished",
            "evaluated": True,
            "step": steps.to_numpy(),
            "fid": t["fid50k_no_guidance"].to_numpy(),
            "num_samples": PAPER_NUM_SAMPLES,
            "extractor": PAPER_EXTRACTOR,
            "cfg_scale": 1.0,
        }
    )
    df["images_seen"] = df["step"] * PAPER_GLOBAL_BATCH
    df["train_compute_gflops"] = _per_row(train_compute_gflops, df["gflops"], PAPER_GLOBAL_BATCH, df["step"])
    df["train_flops"] = _per_row(train_flops, df["gflops"], PAPER_GLOBAL_BATCH, df["step"])
    return df.reset_index(drop=True)


@cli.guard
def main(argv: list[str] | None = None) -> int:
    """CLI: load sweep folders, print a summary, optionally save the table; bad input is one line, exit 2."""
    ap = cli.ArgumentParser(prog="python -m harness.results", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", help="sweep folders (sweep.json and/or run folders)")
    ap.add_argument("--csv", help="write the table as CSV here")
    ap.add_argument("--parquet", help="write the table as Parquet here")
    args = ap.parse_args(argv)
    for flag, path in (("--csv", args.csv), ("--parquet", args.parquet)):  # checked before any work is shown
        if path is None:
            continue
        if Path(path).suffix != f".{flag[2:]}":
            ap.error(f"argument {flag}: {path} must end in .{flag[2:]}")
        if not Path(path).resolve().parent.is_dir():
            ap.error(f"argument {flag}: {path}: the folder {Path(path).resolve().parent} does not exist")
        if Path(path).is_dir():
            ap.error(f"argument {flag}: {path} is a folder, not a file")
    try:
        df = load_results(args.sweep_dirs)
    except ValueError as e:
        if cli.debug():
            raise
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return cli.BAD_INPUT_EXIT  # returned, not raised: callers in Python read the exit code
    n_cells = df["cell_id"].nunique()
    states = df.drop_duplicates("cell_id")["state"].value_counts().to_dict()
    print(f"{len(df)} rows, {n_cells} cells, states {states}, {int(df['evaluated'].sum())} evaluations")
    if args.csv:
        print(f"wrote {save_table(df, args.csv)}")
    if args.parquet:
        print(f"wrote {save_table(df, args.parquet)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
