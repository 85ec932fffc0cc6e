"""Builders of fixture sweep folders (docs/run_folder.md) for the results, scaling, report, notebook tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from harness.core.vocabulary import weights_id

REPO = Path(__file__).resolve().parents[1]
PAPER_CSV = REPO / "analysis" / "reference" / "dit_table4.csv"
PAPER_BATCH = 256
PAPER_STEPS = 400_000
TRAIN_STEPS = (50_000, 100_000, 200_000, 300_000, 400_000)
# Invented shape of FID over training for the fixture (the paper gives only the 400K point per model):
# FID(step) = FID_400K * (400K / step) ** CURVE_EXPONENT.
CURVE_EXPONENT = 0.35


def paper_rows() -> pd.DataFrame:
    """Returns Table 4's rows at 256x256 and 400K steps: 12 adaLN-Zero models, 3 other conditionings."""
    t = pd.read_csv(PAPER_CSV)
    return t[(t.resolution == 256) & (t.train_steps_k * 1000 == PAPER_STEPS)].reset_index(drop=True)


def cell_id(model: str, patch: int, cond: str, data: str, seed: int) -> str:
    """Returns a deterministic cell id in the contract's shape: DiT-B-4_adaln_zero_digits_s0_<hash8>."""
    key = json.dumps({"model": model, "patch": patch, "cond": cond, "data": data, "seed": seed}, sort_keys=True)
    return f"DiT-{model}-{patch}_{cond}_{data}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def write_cell(sweep_dir: Path, cell: dict, status: dict, evals: list[dict], metrics: list[dict] = ()) -> Path:
    """Writes one run folder (cell.json, status.json, metrics.jsonl, evals/step_N.json); returns its path."""
    run = Path(sweep_dir) / cell["cell_id"]
    (run / "evals").mkdir(parents=True, exist_ok=True)
    (run / "cell.json").write_text(json.dumps(cell))
    (run / "status.json").write_text(json.dumps(status))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    for ev in evals:
        (run / "evals" / f"step_{ev['step']}.json").write_text(json.dumps(ev))
    return run


def eval_record(
    step: int,
    fid: float,
    batch: int,
    num_samples: int = 50_000,
    extractor: str = "inception-v3-compat",
    data: str = "imagenet",
    unique: int | None = None,
    floor: tuple[float, float] | None = None,
) -> dict:
    """Returns an evals/step_N.json record in the contract's shape; `unique`: the distinct training images (its
    epochs), `floor`: the FID floor (mean, spread) of its sample count."""
    return {
        "unique_train_images": unique,
        "epochs": None if unique is None else step * batch / unique,
        "floor": None if floor is None else {"num_samples": num_samples, "method": "disjoint draws", "values": {
            "fid": {"mean": floor[0], "spread": floor[1]}}},
        "step": step,
        "images_seen": step * batch,
        "metrics": {"fid": fid, "isc_mean": 300.0 / fid, "precision": 0.7, "recall": 0.5},
        "num_samples": num_samples,
        "preset": f"fid{num_samples // 1000}k",
        "sampler": "ddpm",
        "sampling_steps": "250",
        "cfg_scale": 1.0,
        "cfg_channels": None,
        "label_sampling": "uniform",
        "weights": "ema",
        "extractor": extractor,
        "extractor_weights": weights_id(extractor),  # the shipped weights of an in-house extractor, None for Inception
        "reference_stats_id": f"{data}_ref_{extractor}",
        "data": data,
        "seed": 0,
        "versions": {"harness": "0.1.0"},
        "wall_s": 60.0,
        "gpu_hours": 0.5,
        "warnings": [],
    }


def make_paper_sweep(
    root: Path,
    steps=TRAIN_STEPS,
    num_samples: int = 50_000,
    extractor: str = "inception-v3-compat",
    broken: bool = False,
) -> Path:
    """Writes a sweep folder whose cells carry Table 4's Gflops, params and FID-50K at 400K; returns it.

    Steps before 400K get the invented curve above. With `broken`, adds a failed cell with no evaluation
    and a running cell evaluated at its first step only.
    """
    sweep = Path(root)
    sweep.mkdir(parents=True, exist_ok=True)
    ids = []
    for r in paper_rows().itertuples():
        cid = cell_id(r.model, r.patch, r.cond, "imagenet", 0)
        ids.append(cid)
        cell = {
            "cell_id": cid,
            "config_hash": cid[-8:],
            "model": r.model,
            "patch": int(r.patch),
            "cond": r.cond,
            "data": "imagenet",
            "seed": 0,
            "input_size": 32,
            "in_channels": 4,
            "tokens": (32 // int(r.patch)) ** 2,
            "params": int(r.params_m * 1e6),
            "gflops": r.gflops,
            "global_batch": PAPER_BATCH,
            "steps": PAPER_STEPS,
            "off_paper": False,
        }
        evals = [
            eval_record(
                s,
                r.fid50k_no_guidance * (PAPER_STEPS / s) ** CURVE_EXPONENT,
                PAPER_BATCH,
                num_samples,
                extractor,
            )
            for s in steps
        ]
        metrics = [
            {"step": s, "images_seen": s * PAPER_BATCH, "loss": 0.15, "wall_s": s / 10,
             **val_line(0.14 + 0.01 / r.gflops, split="val")}
            for s in steps
        ]
        status = {
            "state": "finished",
            "reason": None,
            "attempts": 1,
            "step": PAPER_STEPS,
            "total_steps": PAPER_STEPS,
            "wall_s": 3600.0,
            "gpu_hours": 8.0,
        }
        write_cell(sweep, cell, status, evals, metrics)
    if broken:
        for state, model, n_evals in (("failed", "S", 0), ("running", "B", 1)):
            cid = cell_id(model, 2, "adaln_zero", "imagenet", 1)
            ids.append(cid)
            cell = {
                "cell_id": cid,
                "model": model,
                "patch": 2,
                "cond": "adaln_zero",
                "data": "imagenet",
                "seed": 1,
                "tokens": 256,
                "params": 33_000_000,
                "gflops": 6.06,
                "global_batch": PAPER_BATCH,
                "steps": PAPER_STEPS,
            }
            status = {
                "state": state,
                "reason": "CUDA out of memory" if state == "failed" else None,
                "step": steps[0],
                "total_steps": PAPER_STEPS,
                "wall_s": 100.0,
                "gpu_hours": 0.1,
            }
            write_cell(
                sweep,
                cell,
                status,
                [eval_record(steps[0], 150.0, PAPER_BATCH, num_samples, extractor) for _ in range(n_evals)],
            )
    (sweep / "sweep.json").write_text(
        json.dumps({"name": sweep.name, "created": "2024-01-01T00:00:00", "grid": ids, "harness_version": "0.1.0"})
    )
    return sweep


# A sweep like outputs/demo: sizes off the paper's grid, the digits data set at 8x8 and its extractor, FID-500
# at 1K, 2K and 3K steps, validation loss every 500 steps. (model, patch) -> (gflops, params, FID at DEMO_STEPS,
# validation loss at DEMO_VAL_STEPS), values as measured by `make demo` (2026-11-30).
DEMO_STEPS = (1000, 2000, 3000)
DIGITS_TRAIN_IMAGES = 1501
DEMO_FID_FLOOR = (1.38, 0.13)  # FID-500 of 500 real digits (train split) against the test split's statistics
DEMO_VAL_STEPS = (500, 1000, 1500, 2000, 2500, 3000)
DEMO_BATCH = 64
DEMO_SIZE = 8
DEMO_CELLS = {
    ("demo-S", 8): (0.000188992, 191_488, (231.21, 181.52, 136.97), (0.1778, 0.1601, 0.1491, 0.1427, 0.138, 0.1356)),
    ("demo-S", 4): (0.000488704, 182_176, (41.58, 18.91, 11.19), (0.1436, 0.1245, 0.1161, 0.11, 0.1054, 0.1004)),
    ("demo-S", 2): (0.001733632, 179_848, (46.01, 20.2, 9.89), (0.1491, 0.128, 0.1177, 0.1094, 0.1019, 0.097)),
    ("demo-B", 8): (0.00128832, 1_296_000, (23.62, 16.45, 12.6), (0.1375, 0.1212, 0.1139, 0.1083, 0.106, 0.1004)),
    ("demo-B", 4): (0.003666432, 1_277_472, (17.6, 8.02, 6.04), (0.1287, 0.1085, 0.0985, 0.0959, 0.0949, 0.0901)),
    ("demo-B", 2): (0.0133632, 1_272_840, (32.26, 6.0, 4.27), (0.1318, 0.1087, 0.0939, 0.0883, 0.0867, 0.0823)),
}


def val_line(loss: float, split: str = "test", num_images: int = 296, legacy: bool = False) -> dict:
    """Returns the loss fields of a validation line of metrics.jsonl (harness.heldout): held-out losses with standard
    errors (0.4% of the loss), EMA beside raw; `legacy`: the form of an earlier version, a fixed training batch's
    loss under the name val_loss (which the results read as a training-batch loss)."""
    if legacy:
        return {"val_loss": loss, "val_loss_ema": loss * 0.98}
    return {"val_loss": loss, "val_loss_se": 0.004 * loss, "val_loss_ema": loss * 0.98,
            "val_loss_ema_se": 0.004 * loss * 0.98,
            "validation": {"split": split, "heldout": True, "num_images": num_images, "times": 8, "target": "mse",
                           "estimator": "stratified-times", "seed": 20231212}}


def make_demo_sweep(root: Path, extractor: str = "digits-cnn", num_samples: int = 500, legacy: bool = False) -> Path:
    """Writes a sweep folder with DEMO_CELLS (off-paper sizes, digits extractor) and returns it; `legacy`: its
    validation lines as an earlier version wrote them (a fixed training batch's loss, named val_loss)."""
    sweep = Path(root)
    sweep.mkdir(parents=True, exist_ok=True)
    ids = []
    for (model, patch), (gflops, params, fids, val_losses) in DEMO_CELLS.items():
        cid = cell_id(model, patch, "adaln_zero", "digits", 0)
        ids.append(cid)
        cell = {
            "cell_id": cid,
            "config_hash": cid[-8:],
            "model": model,
            "patch": patch,
            "cond": "adaln_zero",
            "data": "digits",
            "seed": 0,
            "input_size": DEMO_SIZE,
            "in_channels": 1,
            "tokens": (DEMO_SIZE // patch) ** 2,
            "params": params,
            "gflops": gflops,
            "global_batch": DEMO_BATCH,
            "steps": DEMO_STEPS[-1],
            "off_paper": True,
        }
        evals = [eval_record(s, fid, DEMO_BATCH, num_samples, extractor, data="digits", unique=DIGITS_TRAIN_IMAGES,
                             floor=DEMO_FID_FLOOR) | {"samples": f"samples/step_{s}_0123abcd/samples.npz"}
                 for s, fid in zip(DEMO_STEPS, fids)]
        metrics = [{"step": s, "images_seen": s * DEMO_BATCH, **val_line(v, legacy=legacy)}
                   for s, v in zip(DEMO_VAL_STEPS, val_losses)]
        status = {"state": "finished", "reason": None, "attempts": 1, "step": DEMO_STEPS[-1], "wall_s": 140.0}
        run = write_cell(sweep, cell, status, evals, metrics)
        for k, ev in enumerate(evals):  # 12 "samples" an evaluation kept: pixels that say which cell made them
            (run / ev["samples"]).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.full((12, DEMO_SIZE, DEMO_SIZE, 3), (40 * len(ids) + 20 * k) % 256, dtype=np.uint8)
            np.savez(run / ev["samples"], arr_0=pixels)
    (sweep / "sweep.json").write_text(
        json.dumps({"name": sweep.name, "created": "2024-01-01T00:00:00", "grid": ids, "harness_version": "0.1.0"})
    )
    return sweep
