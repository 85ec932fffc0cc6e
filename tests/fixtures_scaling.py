"""Synthetic sweeps from a known compute-optimal law, shared by the scaling and the figure tests."""

import math

import numpy as np
import pandas as pd

from harness.core.compute import FORWARD_BACKWARD_FACTOR, paper_table

# A validation loss in DiT's range (~0.1): E + A / gflops^alpha + B / images^beta.
TRUE = {"E": 0.10, "A": 0.02, "B": 12.6, "alpha": 0.5, "beta": 0.4}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ~ C^a
BATCH = 256
RECORD_STEPS = tuple(range(40_000, 400_001, 40_000))  # a 400K-step sweep validating every 40K steps
EVAL_EVERY = 80_000
# FID = FID_REF (loss / LOSS_REF)^FID_EXPONENT: an invented but DiT-like relation (FID 15..300 over the sweep).
FID_REF, LOSS_REF, FID_EXPONENT = 30.0, 0.12, 8.0


def law_value(gflops, images, law=TRUE):
    return law["E"] + law["A"] / np.asarray(gflops) ** law["alpha"] + law["B"] / np.asarray(images) ** law["beta"]


def dit_grid():
    """Returns (model, patch, gflops) of the paper's 12 adaLN-Zero models (Table 4, 256x256)."""
    return [
        (r["model"], r["patch"], r["gflops"])
        for r in paper_table()
        if r["resolution"] == 256 and r["cond"] == "adaln_zero" and r["train_steps_k"] == 400
    ]


def sweep_tables(law=TRUE, noise=0.005, fid_noise=0.03, seed=0, steps=RECORD_STEPS, grid=None, data="synth"):
    """Returns (validation table, results table) of a synthetic sweep over `grid` (default: DiT's 12 models):
    a validation record per step in `steps`, an FID evaluation every EVAL_EVERY steps; multiplicative noise."""
    rng = np.random.default_rng(seed)
    val, ev = [], []
    for model, patch, gflops in grid or dit_grid():
        cell = f"DiT-{model}-{patch}_adaln_zero_{data}_s0"
        for step in steps:
            images = step * BATCH
            loss = law_value(gflops, images, law) * math.exp(rng.normal(0, noise))
            row = {
                "cell_id": cell,
                "model": model,
                "patch": patch,
                "cond": "adaln_zero",
                "data": data,
                "gflops": gflops,
                "params": 1e6 * gflops,
                "global_batch": BATCH,
                "step": step,
                "images_seen": images,
                "train_compute_gflops": FORWARD_BACKWARD_FACTOR * gflops * images,
                "val_loss_ema": loss,
            }
            val.append(row)
            if step % EVAL_EVERY == 0:
                fid = FID_REF * (loss / LOSS_REF) ** FID_EXPONENT * math.exp(rng.normal(0, fid_noise))
                ev.append(
                    row
                    | {
                        "fid": fid,
                        "num_samples": 50_000,
                        "extractor": "inception-v3-compat",
                        "settings_hash": "0123abcd",
                        "state": "finished",
                        "evaluated": True,
                    }
                )
    return pd.DataFrame(val), pd.DataFrame(ev)


def dense_sweep(seed: int = 0) -> pd.DataFrame:
    """Returns a validation table dense enough for IsoFLOP profiles: 16 sizes, 12 records over 1000x images."""
    rng = np.random.default_rng(seed)
    rows = [
        {"cell_id": f"c{i}", "gflops": g, "images_seen": d,
         "val_loss_ema": law_value(g, d) * math.exp(rng.normal(0, 3e-3))}
        for i, g in enumerate(np.geomspace(0.5, 128, 16))
        for d in np.geomspace(3e5, 3e8, 12)
    ]
    return pd.DataFrame(rows)


def true_budget(size_opt):
    """Returns the training compute (Gflops) whose compute-optimal size under TRUE is `size_opt`."""
    alpha, beta = TRUE["alpha"], TRUE["beta"]
    g = (alpha * TRUE["A"] / (beta * TRUE["B"])) ** (1 / (alpha + beta))
    return FORWARD_BACKWARD_FACTOR * (np.asarray(size_opt) / g) ** (1 / TRUE_A)
