"""The compute-optimal summary gives each budget its size, images, loss and FID with intervals, says what it
cannot determine, and reads as the report's Markdown section."""

import importlib

import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import TRUE, sweep_tables
from test_powerlaw import assert_json_ready

from harness.core.compute import FORWARD_BACKWARD_FACTOR
from harness.report import findings, format_compute_optimal_markdown
from harness.scaling.summary import compute_optimal_summary


def test_summary_gives_each_budget_size_images_loss_and_fid_with_intervals(sweep):
    val, ev = sweep
    summary = compute_optimal_summary(val, ev, n_resamples=100, holdout_resamples=50)
    assert_json_ready(summary)
    budgets = summary["budgets"]
    final = (FORWARD_BACKWARD_FACTOR * val["gflops"] * val["images_seen"]).groupby(val["cell_id"]).max()
    assert [b["beyond_sweep"] for b in budgets] == [False] * 3 + [True] * 2
    assert budgets[0]["compute_gflops"] == pytest.approx(final.min())
    assert budgets[2]["compute_gflops"] == pytest.approx(final.max())
    for b in budgets:
        size, images = b["size_opt"]["value"], b["images_opt"]["value"]
        assert FORWARD_BACKWARD_FACTOR * size * images == pytest.approx(b["compute_gflops"], rel=1e-9)
        for key in ("size_opt", "images_opt", "val_loss_ema", "fid"):
            v = b[key]
            assert v["low"] <= v["value"] * (1 + 1e-9) and v["value"] <= v["high"] * (1 + 1e-9), (key, v)
    # More compute buys a lower loss, and (through the loss) a lower FID.
    assert np.all(np.diff([b["val_loss_ema"]["value"] for b in budgets]) < 0)
    assert np.all(np.diff([b["fid"]["value"] for b in budgets]) < 0)
    hold = summary["holdout"]
    assert hold["held_out_cells"] == ["DiT-XL-2_adaln_zero_synth_s0"]
    assert hold["joint"]["median_abs_rel_error"] < 0.05 and hold["loss_to_fid"]["median_abs_rel_error"] < 0.2
    md = format_compute_optimal_markdown(summary)
    assert md.startswith("## Compute-optimal\n")
    assert md.count("beyond the sweep") >= 2 and "Held-out check" in md
    assert f"{budgets[1]['size_opt']['value']:.3g}" in md
    # the section opens with what the study found, in plain words
    found = md[md.index("**What this study found.**"):md.index("| training compute")]
    a = summary["joint_law"]["allocation_exponents"][0]
    assert f"by the joint law (Approach 3): a = {a:.3g}" in found and "What it cannot say" in found
    assert "held-out largest cell (DiT-XL-2_adaln_zero_synth_s0)" in found
    if summary["isoflop"].get("determined"):
        assert "by the IsoFLOP minima (Approach 2)" in found and "The two methods" in found
        assert "a point without an interval" not in found
    # minima on a line whose interval the bootstrap cannot give: the slope is said, labelled, and not compared
    slope = summary["isoflop"]["exponent_point"]
    assert slope is not None
    undetermined = summary | {"isoflop": summary["isoflop"] | {"determined": False, "exponent_ci": None}}
    lines = findings(undetermined)
    assert "- Not determined by the IsoFLOP minima (Approach 2): see the notes below." in lines
    assert any(f"slope a = {slope:.3g}, a point without an interval" in line for line in lines)
    assert not any("The two methods" in line for line in lines)
    # and it names the function that says how many cells per size would give an interval
    pointer = next(line for line in lines if "a point without an interval" in line)
    module, name = pointer.rsplit(" ", 1)[1].rstrip(".").rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module), name))


def test_summary_of_data_that_cannot_determine_the_optimum_says_so():
    val, ev = sweep_tables(law=TRUE | {"A": 0.0})
    summary = compute_optimal_summary(val, ev, n_resamples=100, holdout_resamples=30)
    assert_json_ready(summary)
    assert all(b["size_opt"] is None and b["fid"] is None for b in summary["budgets"])
    assert any("not determined" in n for n in summary["notes"])
    md = format_compute_optimal_markdown(summary)
    assert "not determined" in md
    assert "alpha not determined" in summary["joint_law"]["description"]



def test_the_findings_say_whether_seed_to_seed_spread_is_in_the_intervals():
    """One cell per size: the bootstrap over cells cannot see seed luck, and the findings say so; two seeds of every
    size (the same law, other noise): they say the intervals hold that spread."""
    one_val, one_ev = sweep_tables(seed=0)
    other_val, other_ev = sweep_tables(seed=1)
    for df in (other_val, other_ev):
        df["cell_id"] = df["cell_id"].str.replace("_s0", "_s1")
    two_val, two_ev = pd.concat([one_val, other_val]), pd.concat([one_ev, other_ev])
    for (val, ev), per_size, words in (((one_val, one_ev), 1, "one cell (seed) per size leaves seed-to-seed spread"),
                                       ((two_val, two_ev), 2, "the intervals hold the spread of the 2 or more cells")):
        summary = compute_optimal_summary(val, ev, n_resamples=30, holdout_resamples=10)
        assert summary["cells_per_size"] == per_size
        cannot = [line for line in findings(summary) if line.startswith("- What it cannot say")]
        assert len(cannot) == 1 and words in cannot[0], cannot
