"""wandb as researchers use it, read back from the offline runs: one run per cell (the cell id), grouped by sweep,
its training and validation curves at their training steps, and each evaluation's metrics and sample grid at the
step it evaluated, also when the evaluation ran in another process."""

import json
import subprocess
import sys

import pytest
from helpers import QUICK_EVAL, TINY_CELL, one_thread_env, read_wandb_run
from omegaconf import OmegaConf

pytestmark = pytest.mark.process


def test_a_cells_run_holds_its_curves_and_every_evaluation(tmp_path):
    out = tmp_path / "sw"
    base = [*TINY_CELL, "patch=4", f"out_dir={out}", "sweep_name=tracked", "train.steps=20", "train.log_every=5",
            "train.val_every=10", "train.wandb=offline", "wandb.project=study", "wandb.tags=[cpu,demo]",
            "eval.at_steps=[10,20]"]
    env = one_thread_env()
    subprocess.run([sys.executable, "-m", "harness.train", *base], check=True, env=env, capture_output=True,
                   timeout=300)
    (run_dir,) = [p for p in out.iterdir() if (p / "cell.json").exists()]
    # the evaluation: another process (as another SLURM job would be), resuming the cell's run by its id
    r = subprocess.run([sys.executable, "-m", "harness.evaluate", f"run_dir={run_dir}", "step=all", *QUICK_EVAL,
                        "eval.at_steps=[10,20]"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    parts = [read_wandb_run(p) for p in runs]
    assert len(parts) == 2 and [p["run"]["job_type"] for p in parts] == ["train", "evaluate"]
    for p in parts:  # one run: the cell's id, the sweep's group, the configured project and tags
        assert p["run"] == {**p["run"], "id": run_dir.name, "group": "tracked", "project": "study",
                            "tags": ["cpu", "demo"]}
    train_hist = parts[0]["history"]
    assert [h["step"] for h in train_hist if "train/loss" in h] == [5, 10, 15, 20]
    assert [h["step"] for h in train_hist if "val/val_loss_ema" in h] == [10, 20]
    assert all(h["val/val_loss_ema_se"] > 0 for h in train_hist if "val/val_loss_ema" in h)
    evals = [h for h in parts[1]["history"] if "eval/fid" in h]
    assert [h["step"] for h in evals] == [10, 20]  # at the training steps evaluated, after training logged 20
    records = {r["step"]: r for r in (json.loads(p.read_text()) for p in (run_dir / "evals").glob("step_*.json"))}
    assert [h["eval/fid"] for h in evals] == pytest.approx([records[s]["metrics"]["fid"] for s in (10, 20)])
    assert all(h["eval/samples/_type"] == "image-file" and h["eval/samples/caption"].startswith(
        f"step {h['step']}: the first samples (labels and noise fixed by the seed), FID-20 (digits extractor)")
        for h in evals)
    assert sum(name.startswith("samples_") and name.endswith(".png") for name in parts[1]["files"]) == 2
    grid = run_dir / records[20]["samples_grid"]
    assert grid.is_file() and grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sweeps_results_table_is_logged_once_in_a_run_of_its_own(tmp_path):
    from fixtures_results import make_demo_sweep

    from harness import tracking
    from harness.core.config import compose
    from harness.results import load_results

    # five times: wandb writes its log asynchronously, and the log must be complete when the call returns (a
    # plain run.finish() left only the log's header in about one call in five)
    for i in range(5):
        sweep = make_demo_sweep(tmp_path / f"demo{i}")
        cfg = compose(["sweeps=demo", "train.wandb=offline", f"out_dir={sweep}"])
        # as the sweep holds it: with Hydra's node, whose job number is set only inside a job
        OmegaConf.set_struct(cfg, False)
        cfg.hydra = {"sweep": {"subdir": "${hydra.job.num}"}, "job": {"num": "???"}}
        table = load_results(sweep)
        tracking.log_results_table(cfg, sweep, table)
        (run,) = (sweep / "wandb").glob("offline-run-*")
        got = read_wandb_run(run)
        assert got["run"].get("id") == "demo-results" and got["run"]["group"] == "demo", f"call {i}: {got}"
        assert got["run"]["job_type"] == "sweep-results"
        (row,) = [h for h in got["history"] if "results/_type" in h]
        assert row["results/_type"] == "table-file" and row["results/nrows"] == len(table)
    assert tracking.open_run(compose(["sweeps=demo"]), sweep, "x") is None  # the demo's train.wandb: disabled


def test_a_wandb_service_that_ends_badly_does_not_end_the_process(tmp_path, monkeypatch, caplog):
    """wandb.teardown calls sys.exit with its service's exit code when that is not 0; closing a cell's run must not
    turn that into the end of a sweep that runs its cells in one process."""
    import wandb

    from harness import tracking

    cfg = OmegaConf.create({"train": {"wandb": "offline"}, "wandb": {}, "sweep_name": "s", "seed": 0})
    run = tracking.open_run(cfg, tmp_path, "train", run_name="cell")
    run.log({"step": 1, "train/loss": 0.5})
    real = wandb.teardown

    def teardown_whose_service_failed(exit_code=None):
        real(exit_code)
        raise SystemExit(3)

    monkeypatch.setattr(wandb, "teardown", teardown_whose_service_failed)
    tracking.close_run(run)  # would raise SystemExit(3)
    assert "exit code 3" in caplog.text and "cell" in caplog.text
    (part,) = (tmp_path / "wandb").glob("offline-run-*")
    assert [h["train/loss"] for h in read_wandb_run(part)["history"] if "train/loss" in h] == [0.5]
