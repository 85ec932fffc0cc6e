"""The report's cost on a study's scale: a synthetic sweep folder of the paper's 48-cell grid (12 sizes x 4
conditionings, every cell with `records` evaluations and validation records drawn from a known joint law),
then `harness.report.build_report` with the bootstrap resamples a real report uses, timed."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.bench.common import environment
from harness.core.runfolder import atomic_write_json
from harness.model import flops
from harness.model.dit import CONDS, MODEL_SIZES, PATCH_SIZES
from harness.report import build_report

BATCH = 256
STEPS = 400_000
# A joint law of the validation loss in forward Gflops and images (Chinchilla's form), and a power law from loss to
# FID, to fill the synthetic records with values shaped like a study's; their values do not matter to the timing.
LAW = {"E": 0.12, "A": 0.02, "alpha": 0.35, "B": 40.0, "beta": 0.3}
FID_OF_LOSS = (20.0, 0.135, 12.0)  # FID = 20 (loss / 0.135)^12
NOISE = 0.02


def write_sweep(root: Path, records: int = 10, seed: int = 0) -> Path:
    """Writes a finished 48-cell sweep folder (run-folder contract) with `records` evaluations and validation
    records per cell; returns it."""
    rng = np.random.default_rng(seed)
    steps = np.unique(np.geomspace(STEPS / 2 ** (records - 1), STEPS, records).round(-3).astype(int))
    ids = []
    for model in MODEL_SIZES:
        for patch in PATCH_SIZES:
            for cond in CONDS:
                cost = flops.model_cost(model, patch, cond, counter="closed_form")
                cid = f"DiT-{model}-{patch}_{cond}_latents_s0_{len(ids):08x}"
                run = root / cid
                ids.append(cid)
                atomic_write_json(run / "cell.json", {
                    "cell_id": cid, "config_hash": cid, "model": model, "patch": patch, "cond": cond,
                    "data": "latents", "seed": 0, "input_size": 32, "in_channels": 4, "tokens": cost["tokens"],
                    "params": cost["params"], "gflops": cost["gflops"], "global_batch": BATCH, "steps": STEPS,
                    "off_paper": False})
                atomic_write_json(run / "status.json", {"state": "finished", "step": STEPS, "attempts": 1})
                images = steps * BATCH
                loss = (LAW["E"] + LAW["A"] / cost["gflops"] ** LAW["alpha"] + LAW["B"] / images ** LAW["beta"]) \
                    * np.exp(rng.normal(0, NOISE, len(steps)))
                (run / "metrics.jsonl").write_text("".join(
                    json.dumps({"step": int(s), "images_seen": int(i), "val_loss": float(v)}) + "\n"
                    for s, i, v in zip(steps, images, loss)))
                fid = FID_OF_LOSS[0] * (loss / FID_OF_LOSS[1]) ** FID_OF_LOSS[2]
                for s, i, f in zip(steps, images, fid):
                    atomic_write_json(run / "evals" / f"step_{s}.json", {
                        "step": int(s), "images_seen": int(i), "metrics": {"fid": float(f)}, "num_samples": 50_000,
                        "preset": "fid50k", "extractor": "inception-v3-compat", "cfg_scale": 1.0,
                        "settings_hash": "00000000"})
    atomic_write_json(root / "sweep.json", {"name": "bench", "grid": ids})
    return root


def bench_analysis(records: int = 10, resamples: int = 1000, root: str | None = None) -> dict:
    """Returns the record: seconds to write the report (all sections) of the synthetic 48-cell sweep."""
    if records < 2 or resamples < 0:
        raise ValueError(f"records={records} must be >= 2 and resamples={resamples} >= 0")
    with tempfile.TemporaryDirectory(prefix="bench_report_", dir=root) as tmp:
        sweep = write_sweep(Path(tmp) / "sweep", records)
        t0 = time.perf_counter()
        report = build_report([sweep], n_resamples=resamples)
        wall_s = time.perf_counter() - t0
        text = report.path.read_text()
    return {"kind": "analysis", "cells": 48, "records_per_cell": records, "resamples": resamples,
            "settings": [{"name": "report", "wall_s": wall_s, "not_written": report.not_written,
                          "compute_optimal": "## Compute-optimal" in text}],
            "complete": True}


def describe(record: dict) -> str:
    """Returns the record in one line."""
    row = record["settings"][0]
    env = record.get("env") or environment([])
    return (f"report of {record['cells']} cells x {record['records_per_cell']} records, {record['resamples']} "
            f"resamples: {row['wall_s']:.1f} s (not written: {row['not_written'] or 'none'}); "
            f"{env['cpu_model']}, load {env['loadavg_1m']}, {env['date']}")
