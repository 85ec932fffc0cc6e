"""Results table: run folders -> one tidy row per (cell, evaluated step); bad input gives clear errors."""

import json

import numpy as np
import pandas as pd
import pytest
from fixtures_results import (
    PAPER_BATCH,
    PAPER_STEPS,
    TRAIN_STEPS,
    eval_record,
    make_demo_sweep,
    make_paper_sweep,
    paper_rows,
)

from harness.model.flops import train_compute_gflops
from harness.results import comparable, comparison_step, load, load_results, load_validation, main, paper_results


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_paper_sweep(tmp_path_factory.mktemp("r") / "paper", broken=True)


def test_one_row_per_cell_and_step_with_compute_columns(sweep):
    df = load_results(sweep)
    done = df[df.state == "finished"]
    assert len(done) == len(paper_rows()) * len(TRAIN_STEPS)
    assert not done.duplicated(["cell_id", "step"]).any()
    row = done[
        (done.model == "XL") & (done.patch == 2) & (done.cond == "adaln_zero") & (done.step == PAPER_STEPS)
    ]
    assert row.fid.item() == pytest.approx(19.47)
    assert row.num_samples.item() == 50_000
    assert row.train_compute_gflops.item() == pytest.approx(
        train_compute_gflops(118.64, PAPER_BATCH, PAPER_STEPS)
    )
    assert row.train_flops.item() == pytest.approx(2e9 * row.train_compute_gflops.item())
    assert row.images_seen.item() == PAPER_STEPS * PAPER_BATCH
    assert row.val_loss.notna().all() and row.gpu_hours.item() == 8.0


def test_failed_and_running_cells_load_with_their_state(sweep):
    df = load_results(sweep)
    failed = df[df.state == "failed"]
    assert len(failed) == 1 and not failed.evaluated.item() and np.isnan(failed.fid.item())
    assert failed.reason.item() == "CUDA out of memory"
    assert df[df.state == "running"].evaluated.all()
    # The comparison step is the grid's length, not the early step the unfinished cells share.
    assert comparison_step(df) == PAPER_STEPS


def test_cli_writes_csv_and_parquet_round_trip(sweep, tmp_path):
    assert main([str(sweep), "--csv", str(tmp_path / "r.csv"), "--parquet", str(tmp_path / "r.parquet")]) == 0
    a, b = load(tmp_path / "r.csv"), load(tmp_path / "r.parquet")
    assert len(a) == len(b) == len(load_results(sweep))
    assert a.fid.sum() == pytest.approx(b.fid.sum())


def test_not_a_sweep_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a sweep folder"):
        load_results(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_results(tmp_path / "missing")
    assert main([str(tmp_path / "empty")]) == 2


def test_cells_without_evaluations_give_a_clear_message(tmp_path):
    sweep = make_paper_sweep(tmp_path / "s", steps=(50_000,))
    for p in sweep.glob("*/evals/*.json"):
        p.unlink()
    df = load_results(sweep)
    assert len(df) == len(paper_rows()) and not df.evaluated.any()
    with pytest.raises(ValueError, match="no cell has an evaluation"):
        comparable(df, "fid")


def test_mixed_sample_counts_or_extractors_refused_unless_allowed(tmp_path):
    sweep = make_paper_sweep(tmp_path / "s", steps=(PAPER_STEPS,))
    run = sorted(p for p in sweep.iterdir() if p.is_dir())[0]
    (run / "evals" / "step_400000.json").write_text(
        json.dumps(eval_record(PAPER_STEPS, 90.0, PAPER_BATCH, 5_000))
    )
    df = load_results(sweep)
    with pytest.raises(ValueError, match=r"sample counts \[5000, 50000\]"):
        comparable(df, "fid")
    assert len(comparable(df, "fid", allow_mixed=True)[0]) == len(df)
    df.loc[0, ["num_samples", "extractor"]] = [50_000, "digits-cnn"]
    with pytest.raises(ValueError, match="extractors"):
        comparable(df, "fid")


def test_paper_results_match_table4():
    t = paper_results()
    assert isinstance(t, pd.DataFrame) and len(t) == 17  # the 19 rows of Table 4 less the two at 512x512
    assert t[(t.model == "XL") & (t.patch == 2) & (t.cond == "in_context")].fid.item() == pytest.approx(35.24)


# ---- what an upgrade reads: earlier validation lines, earlier extractor weights ----

def test_validation_lines_of_an_earlier_version_read_as_training_batch_losses(tmp_path):
    """Before held-out validation, "val_loss" was a fixed training batch's loss: it is never read as a validation
    loss again, and nothing of it is lost."""
    sweep = make_demo_sweep(tmp_path / "demo", legacy=True)
    val = load_validation(sweep)
    assert len(val) and val["val_loss"].isna().all() and val["train_batch_loss"].notna().all()
    assert val["train_batch_loss_ema"].notna().all()
    df = load_results(sweep)
    assert df["val_loss"].isna().all() and df["train_batch_loss"].notna().all()
    current = load_validation(make_demo_sweep(tmp_path / "demo2"))
    assert current["val_loss"].notna().all() and (current["val_split"] == "test").all()
    assert (current["val_images"] == 296).all() and current["val_loss_se"].notna().all()


def test_a_loss_pairs_with_an_evaluation_at_its_own_step_only(tmp_path):
    """An evaluation at a step without a validation line gets no loss, never an older line's."""
    sweep = make_demo_sweep(tmp_path / "demo")
    run = next(p for p in sweep.iterdir() if p.is_dir())
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    kept = [ln for ln in lines if ln["step"] != 2000]  # drop the line of an evaluated step
    (run / "metrics.jsonl").write_text("".join(json.dumps(ln) + "\n" for ln in kept))
    df = load_results(sweep)
    rows = df[df.run_dir == str(run)].set_index("step")
    assert np.isnan(rows.loc[2000, "val_loss"]) and rows.loc[1000, "val_loss"] == pytest.approx(
        next(ln["val_loss"] for ln in lines if ln["step"] == 1000))


def test_records_of_earlier_extractor_weights_are_labelled_and_never_mixed(tmp_path):
    sweep = make_demo_sweep(tmp_path / "demo")
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    for run in runs:  # every record as an earlier version wrote it: weights trained on first use, per machine
        for rec_path in (run / "evals").glob("step_*.json"):
            rec = json.loads(rec_path.read_text())
            rec.pop("extractor_weights")
            rec["extractor_info"] = {"name": "digits-cnn", "weights_sha256": "ab" * 32}
            rec_path.write_text(json.dumps(rec))
    df = load_results(sweep)
    assert not df["extractor_current"].any() and set(df["extractor_weights"]) == {"ab" * 6}
    rows, label = comparable(df, "fid")
    assert len(rows) == len(df) and "earlier extractor weights abababababab" in label
    # the shipped weights measure one cell again: that cell's new records are used, the old ones left out
    run = runs[0]
    for rec_path in (run / "evals").glob("step_*.json"):
        rec = json.loads(rec_path.read_text())
        rec.update(extractor_weights="0614089547d5", settings_hash="feedbeef")
        (run / "evals" / rec_path.name.replace(".json", "_feedbeef.json")).write_text(json.dumps(rec))
    df = load_results(sweep)
    rows, label = comparable(df, "fid")
    assert rows["extractor_current"].all() and set(rows["cell_id"]) == {run.name} and "earlier" not in label
    # two sets of earlier weights never meet in one figure or fit
    other = runs[1]
    for rec_path in (other / "evals").glob("step_*.json"):
        rec = json.loads(rec_path.read_text())
        rec["extractor_info"]["weights_sha256"] = "cd" * 32
        rec_path.write_text(json.dumps(rec))
    old_only = load_results(sweep)
    old_only = old_only[~old_only["extractor_current"]]
    with pytest.raises(ValueError, match="different weights"):
        comparable(old_only, "fid")


def test_a_record_measured_again_the_same_way_counts_once(tmp_path):
    """A folder of an earlier harness relaunched: its records lack settings the settings hash now covers, so the
    evaluation writes a second record of the same measurement beside each (same step, settings and extractor
    weights); the table holds each measurement once, the later record's, and keeps records that differ."""
    sweep = make_demo_sweep(tmp_path / "demo")
    before = load_results(sweep)
    for run in (p for p in sweep.iterdir() if p.is_dir()):
        for rec_path in sorted((run / "evals").glob("step_*.json")):
            rec = json.loads(rec_path.read_text())
            rec.update(settings_hash="feedbeef", floor={"values": {"fid": {"mean": 1.5, "spread": 0.1}}})
            (run / "evals" / rec_path.name.replace(".json", "_feedbeef.json")).write_text(json.dumps(rec))
            rec.update(settings_hash="0ddba115", num_samples=rec["num_samples"] * 2)
            (run / "evals" / rec_path.name.replace(".json", "_0ddba115.json")).write_text(json.dumps(rec))
    after = load_results(sweep)
    assert len(after) == 2 * len(before)
    same = after[after["num_samples"].isin(before["num_samples"])]
    assert len(same) == len(before) and set(same["settings_hash"]) == {"feedbeef"}
    assert (same["fid_floor"] == 1.5).all()


def test_the_loss_paired_with_fid_is_that_of_the_evaluated_weights():
    from harness.results import evaluated_loss

    assert evaluated_loss(pd.DataFrame({"weights": ["ema", "ema"]})) == "val_loss_ema"
    assert evaluated_loss(pd.DataFrame({"weights": ["model", "model"]})) == "val_loss"
    assert evaluated_loss(pd.DataFrame({"weights": ["model", "ema"]})) == "val_loss_ema"  # mixed: the paper's
    assert evaluated_loss(None) == "val_loss_ema"
