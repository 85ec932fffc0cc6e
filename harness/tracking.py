"""Experiment tracking in wandb, as researchers use it: one run per cell, the cell id as the run id, grouped by
sweep, with the training curves, the held-out validation losses, every evaluation's metrics and its sample grid in
that one run, and the sweep's results table logged once when the sweep ends.

Every process that works on a cell (the training job, an evaluation job started later, perhaps in another SLURM
job) opens the cell's run by its id (`resume="allow"`). Its x-axis is the training step, logged as the metric
`step` (`define_metric("*", step_metric="step")`): an evaluation of step 1,000 that runs after training logged step
3,000 lands at 1,000, which wandb's own step counter (monotonic per process) could not do.

Defaults need no account: `train.wandb=offline` writes each process's run under `<run folder>/wandb/`; sync them
later from a machine with network, oldest first, with `wandb sync --append <run folder>/wandb/offline-run-*`
(wandb cannot resume a run offline: each process's part is its own folder with the same id). `disabled` writes
nothing; `online` logs live. Project, entity, group (default: the sweep's name) and tags are `wandb.*` in the
config (docs/tracking.md).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from harness.core.vocabulary import metric_label

log = logging.getLogger(__name__)

MAX_RUN_ID = 64  # wandb's limit on a run id
SECTIONS = {"train": "train/", "val": "val/", "eval": "eval/"}  # panels of the run page, by what logged a value


def run_id(name: str) -> str:
    """Returns the wandb run id of a cell: its id, or (beyond wandb's 64 characters) a prefix and a hash of it."""
    if len(name) <= MAX_RUN_ID:
        return name
    return f"{name[:MAX_RUN_ID - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def open_run(cfg: Any, run_dir: Path, job_type: str, run_name: str | None = None):
    """Opens (or resumes) the wandb run of a cell, or of a sweep's summary with `run_name`; None when
    train.wandb is disabled. Wandb's own files go under `run_dir/wandb/`."""
    mode = cfg.train.wandb
    if mode == "disabled":
        return None
    import wandb  # here: seconds to import, and most runs log to files only

    w = cfg.get("wandb") or {}
    name = run_name or Path(run_dir).name
    run = wandb.init(
        project=w.get("project") or "harness", entity=w.get("entity") or None,
        group=w.get("group") or str(cfg.sweep_name), tags=list(w.get("tags") or []), job_type=job_type,
        name=name, id=run_id(name), resume="allow", dir=str(run_dir), mode=mode,
        config=run_config(cfg), settings=wandb.Settings(silent=True),
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def close_run(run) -> None:
    """Finishes a run and returns only once its log is on disk. wandb-core writes the log asynchronously, and
    `run.finish()` can return first (offline, the .wandb file then held only its header in 2 of 10 tries), so a
    stage that recorded itself finished and was then killed could lose the run's end. Tearing wandb down waits for
    the writer; the next run of this process starts wandb again (under a second). Nothing is torn down while
    another run of this process is still open."""
    if run is None:
        return
    import wandb  # see open_run

    run.finish()
    if wandb.run is None:
        try:
            wandb.teardown()
        except SystemExit as e:  # wandb exits the process when its service ended badly: not a reason to fail a cell
            log.warning("wandb's service ended with exit code %s; %s's log may be incomplete", e.code, run.id)


def log_line(run, record: dict, section: str) -> None:
    """Logs the numbers of a metrics.jsonl line (training or validation) at its training step, under `section`'s
    panel (train/ or val/); the step, images seen and epochs stay at the top level."""
    if run is None:
        return
    top = {k: record[k] for k in ("step", "images_seen", "epochs") if record.get(k) is not None}
    values = {f"{SECTIONS[section]}{k}": v for k, v in record.items()
              if k not in top and isinstance(v, (int, float)) and not isinstance(v, bool)}
    run.log({**top, **values})


def log_evaluation(run, record: dict, grid_png: Path | None) -> None:
    """Logs an evaluation record's metrics (and their floors) at its training step under eval/, with the sample
    grid as an image captioned with what it is."""
    if run is None:
        return
    import wandb  # see open_run

    values = {"step": record["step"], "images_seen": record.get("images_seen")}
    values.update({f"eval/{k}": v for k, v in record.get("metrics", {}).items() if isinstance(v, (int, float))})
    for k, floor in ((record.get("floor") or {}).get("values") or {}).items():
        values[f"eval/{k}_floor"] = floor.get("mean")
    if grid_png is not None and Path(grid_png).exists():
        name = metric_label("fid", record.get("num_samples"), record.get("extractor"))
        fid = record.get("metrics", {}).get("fid", float("nan"))
        values["eval/samples"] = wandb.Image(str(grid_png), caption=f"step {record['step']}: the first samples "
                                             f"(labels and noise fixed by the seed), {name} {fid:.4g}")
    run.log({k: v for k, v in values.items() if v is not None})


def run_config(cfg: Any) -> dict:
    """The config a run records: every section but Hydra's own, whose sweep paths (`hydra.sweep.subdir` reads
    `hydra.job.num`) resolve only inside a job, not in the sweep that logs its results table."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def log_results_table(cfg: Any, sweep_dir: Path, table) -> None:
    """Logs a sweep's results table (a pandas DataFrame) once, in a run of its own named after the sweep (in the
    sweep's group), when the sweep ends."""
    run = open_run(cfg, Path(sweep_dir), "sweep-results", run_name=f"{cfg.sweep_name}-results")
    if run is None:
        return
    import wandb  # see open_run

    try:
        plain = table.copy()
        for col in plain.columns:  # wandb tables take plain values: everything else as text
            if plain[col].dtype == object:
                plain[col] = plain[col].map(lambda v: v if isinstance(v, (str, int, float, bool)) or v is None
                                            else str(v))
        run.log({"results": wandb.Table(dataframe=plain)})
    finally:
        close_run(run)
