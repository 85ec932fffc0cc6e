"""Evaluation as a stage: train -> evaluate round trip, kill and resume, records never overwritten,
bad input with clear messages, and the presets."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from helpers import TINY_CELL, one_thread_env

from harness import evaluate
from harness.core import checkpoint
from harness.core.config import EvalConfig, compose
from harness.core.runfolder import read_jsonl
from harness.core.vocabulary import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR
from harness.metrics import inception
from harness.model import dit
from harness.results import comparable, load_results

TINY = [*TINY_CELL, "patch=4", "train.log_every=2", "train.val_every=10", "train.keep_last=100", "eval=digits"]
STEPS = 4
# 48 samples in 12 shards of 4, 100 sampler steps: long enough to be killed between shards
EVAL = ["eval.num_samples=48", "eval.sampling_steps=100", "eval.shard_size=4", "eval.batch_size=4",
        "eval.metrics=[fid,isc,kid,prc]"]
NUM_SHARDS = 12
QUICK = ["eval.num_samples=8", "eval.sampling_steps=5", "eval.shard_size=8", "eval.batch_size=8",
         "eval.metrics=[fid]"]
# docs/run_folder.md, evals/step_N.json
SCHEMA_KEYS = {"step", "images_seen", "metrics", "num_samples", "preset", "sampler", "sampling_steps",
               "cfg_scale", "cfg_channels", "label_sampling", "weights", "extractor", "reference_stats_id",
               "data", "seed", "versions", "wall_s", "gpu_hours", "warnings", "extractor_weights", "epochs",
               "unique_train_images", "floor"}
METRIC_KEYS = {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall"}
SHARD_LINE = re.compile(r"shard (\d+) \[\d+, \d+\) (kept|sampled)")


# in-process sampling computes as the one-thread subprocesses do; the cell is trained (and some evaluations run) by
# the commands in processes of their own: not in make test-fast
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.process]


def _evaluate_cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.evaluate", f"run_dir={run}", f"step={STEPS}", *EVAL, *extra]


@pytest.fixture(scope="module")
def trained(trained_cell, tmp_path_factory) -> Path:
    """The session's tiny trained cell (tests/conftest.py: trained to STEPS by `python -m harness.train`,
    checkpoints at 2 and 4), copied: this module's evaluations write into it."""
    run = tmp_path_factory.mktemp("eval_runs") / trained_cell.name
    shutil.copytree(trained_cell, run)
    assert checkpoint.list_steps(run / "checkpoints") == [2, STEPS]
    return run


@pytest.fixture(scope="module")
def straight(trained) -> dict:
    """The uninterrupted evaluation of the trained cell: its record, samples and stderr."""
    r = subprocess.run(_evaluate_cmd(trained), env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((trained / "evals" / f"step_{STEPS}.json").read_text())
    with np.load(trained / record["samples"]) as f:
        samples = {k: f[k] for k in f.files}
    return {"record": record, "samples": samples, "stderr": r.stderr, "stdout": r.stdout}


def _copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run folder with its checkpoints but without evaluations or samples."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("evals", "samples"))
    return dest


def test_train_evaluate_round_trip_record_has_every_schema_field(trained, straight):
    rec = straight["record"]
    assert rec.keys() >= SCHEMA_KEYS, SCHEMA_KEYS - rec.keys()
    assert set(rec["metrics"]) == METRIC_KEYS and all(np.isfinite(v) for v in rec["metrics"].values())
    assert rec["metrics_requested"] == ["fid", "isc", "kid", "prc"]
    assert {"torch", "torch_fidelity", "harness"} <= rec["versions"].keys()
    assert rec["step"] == STEPS and rec["images_seen"] == STEPS * 16
    assert (rec["num_samples"], rec["preset"], rec["data"]) == (48, "digits", "digits")
    assert (rec["sampler"], rec["sampling_steps"]) == ("ddpm", "100")
    assert (rec["cfg_scale"], rec["cfg_channels"]) == (1.0, None)
    assert (rec["label_sampling"], rec["weights"], rec["seed"]) == ("uniform", "ema", 0)
    assert rec["extractor"] == DIGITS_EXTRACTOR and rec["metric_label"] == "FID (digits extractor)"
    assert rec["reference_stats_id"].startswith("digits_test_8_digits-cnn_")
    assert rec["wall_s"] > 0 and rec["gpu_hours"] == 0.0  # CPU: no GPU-hours
    # 48 samples < 64 feature dimensions: warned loudly on stderr and written into the record
    assert any("fewer images than feature dimensions" in w for w in rec["warnings"])
    assert "fewer images than feature dimensions" in straight["stderr"]
    arr = straight["samples"]["arr_0"]
    assert arr.shape == (48, 8, 8, 3) and arr.dtype == np.uint8
    assert f"step {STEPS}: " in straight["stdout"] and "fid=" in straight["stdout"]
    # the extractor's shipped weights, the epochs the checkpoint is at, the floor of each metric at 48 samples
    assert rec["extractor_weights"] == rec["extractor_info"]["weights_sha256"][:12] == "0614089547d5"
    assert rec["epochs"] == pytest.approx(STEPS * 16 / 1501) and rec["unique_train_images"] == 1501
    floor = rec["floor"]
    assert floor["num_samples"] == 48 and floor["method"] == "disjoint draws" and floor["real_split"] == "train"
    assert set(floor["values"]) == METRIC_KEYS - {"isc_mean", "isc_std", "kid_std"}
    assert 0 < floor["values"]["fid"]["mean"] < rec["metrics"]["fid"]  # real images beat a 4-step model


def test_the_evaluated_step_has_its_validation_loss(trained, straight):
    """The trainer validated at STEPS (an evaluation step); the record pairs with that line, never an older one."""
    lines = [r for r in read_jsonl(trained / "metrics.jsonl") if "validation" in r]
    assert [r["step"] for r in lines] == [STEPS] and lines[0]["validation"]["heldout"]


def test_a_kept_checkpoint_gets_its_validation_loss_from_the_evaluate_command(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    lines = read_jsonl(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if "validation" not in r))
    r = subprocess.run([sys.executable, "-m", "harness.evaluate", f"run_dir={run}", "step=all", "validation=only"],
                       env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = {v["step"]: v for v in read_jsonl(run / "metrics.jsonl") if "validation" in v}
    assert sorted(got) == [2, STEPS] and all(v["source"] == "evaluate" for v in got.values())
    # the same estimator as the trainer's: the same number at STEPS, from the same checkpoint
    trainer_line = next(v for v in lines if "validation" in v)
    assert got[STEPS]["val_loss_ema"] == pytest.approx(trainer_line["val_loss_ema"], rel=1e-5)
    assert "val_loss=" in r.stdout and "(test split, 32 images)" in r.stdout
    again = subprocess.run([sys.executable, "-m", "harness.evaluate", f"run_dir={run}", "step=all",
                            "validation=only"], env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "has its validation loss already" in again.stdout


def test_killed_evaluation_resumes_without_redoing_finished_shards(trained, straight, tmp_path,
                                                                   caplog):
    run = _copy_run(trained, tmp_path / "run")
    proc = subprocess.Popen(_evaluate_cmd(run), env=one_thread_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(run.glob("samples/*/shard_*.npz")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the evaluation finished before it could be killed"
    finished = {int(p.stem.split("_")[1]) for p in run.glob("samples/*/shard_*.npz")}
    assert 1 <= len(finished) < NUM_SHARDS and not list(run.glob("samples/*/samples.npz"))
    assert not (run / "evals").exists()  # no partial record

    # the rerun in this process (as `python -m harness.evaluate` would run it, minus the start-up time)
    with caplog.at_level(logging.INFO, logger="harness.sample"), pytest.warns(UserWarning, match="fewer"):
        evaluate.main([f"run_dir={run}", f"step={STEPS}", *EVAL])
    lines = SHARD_LINE.findall(caplog.text)
    kept = {int(k) for k, how in lines if how == "kept"}
    sampled = {int(k) for k, how in lines if how == "sampled"}
    assert kept == finished and sampled == set(range(NUM_SHARDS)) - finished

    record = json.loads((run / "evals" / f"step_{STEPS}.json").read_text())
    with np.load(run / record["samples"]) as f:
        assert np.array_equal(f["arr_0"], straight["samples"]["arr_0"])
        assert np.array_equal(f["labels"], straight["samples"]["labels"])
    assert record["metrics"] == straight["record"]["metrics"]  # the same FID, bit for bit
    assert not list(run.glob("samples/*/.shard_*"))  # no torn temp files left behind


def test_same_settings_reuse_the_record_other_settings_go_beside_it(trained, straight):
    record_path = trained / "evals" / f"step_{STEPS}.json"
    before = record_path.read_bytes(), record_path.stat().st_mtime_ns
    cfg = evaluate.load_run_config(trained, EVAL)
    assert evaluate.evaluate(cfg, STEPS, trained) == straight["record"]

    other = evaluate.load_run_config(trained, [*QUICK, "eval.seed=1"])
    with pytest.warns(UserWarning, match="fewer images than feature dimensions"):
        rec = evaluate.evaluate(other, STEPS, trained)
    beside = trained / "evals" / f"step_{STEPS}_{evaluate.eval_hash(other)}.json"
    assert json.loads(beside.read_text()) == rec and rec["num_samples"] == 8 and rec["seed"] == 1
    assert (record_path.read_bytes(), record_path.stat().st_mtime_ns) == before  # kept as it was


def test_bad_input_gets_a_clear_message_and_writes_nothing(trained, tmp_path, monkeypatch):
    run = _copy_run(trained, tmp_path / "run")
    # a checkpoint of another architecture (width 64, not 32) and a truncated one
    other = dit.build("demo-S", 4, input_size=8, in_channels=1, num_classes=10, depth=1, hidden_size=64,
                         num_heads=2)
    checkpoint.save(run / "checkpoints", 6, {"model": other.state_dict(), "ema": other.state_dict(),
                                             "step": 6, "images_seen": 96})
    good = checkpoint.ckpt_path(run / "checkpoints", 2)
    good.write_bytes(good.read_bytes()[:1000])
    cfg = evaluate.load_run_config(run, QUICK)

    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .*have steps \[2, 4, 6\]"):
        evaluate.evaluate(cfg, 3, run)
    with pytest.raises(ValueError, match=r"does not match the model architecture.*shape mismatch"):
        evaluate.evaluate(cfg, 6, run)
    with pytest.raises(ValueError, match=r"cannot be trusted: checksum mismatch"):
        evaluate.evaluate(cfg, 2, run)
    with pytest.raises(ValueError, match=r"eval.sampler='euler' cannot sample a model trained with "
                                         r"objective='ddpm'; allowed: \['ddpm', 'ddim'\]"):
        evaluate.evaluate(evaluate.load_run_config(run, [*QUICK, "eval.sampler=euler"]), STEPS, run)
    with pytest.raises(ValueError, match=r"unknown eval preset 'fid1k'; allowed: .*'fid50k'"):
        evaluate.load_run_config(run, ["eval=fid1k"])

    # Inception weights missing and no network: says what to fetch and where, before any sampling
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # the network, not the code under test
    with_inception = evaluate.load_run_config(run, [*QUICK, f"eval.extractor={INCEPTION_EXTRACTOR}"])
    with pytest.raises(inception.MissingWeightsError) as err:
        evaluate.evaluate(with_inception, STEPS, run)
    assert str(inception.inception_weights_path()) in str(err.value)
    assert str(tmp_path / "torch_home") in str(err.value)

    assert not (run / "evals").exists() and not (run / "samples").exists()


def test_stage_cli_evaluates_the_configured_steps_each_resumable(trained, tmp_path, capsys):
    run = _copy_run(trained, tmp_path / "run")
    args = [f"run_dir={run}", "step=all", "eval.at_steps=[2,4]", *QUICK]
    with pytest.warns(UserWarning, match="fewer images"):
        evaluate.main(args)
    out = capsys.readouterr().out
    assert "step 2: fid=" in out and "step 4: fid=" in out
    records = {p.name: p.stat().st_mtime_ns for p in (run / "evals").iterdir()}
    assert set(records) == {"step_2.json", "step_4.json"}
    evaluate.main(args)  # both done: nothing sampled or written again
    assert {p.name: p.stat().st_mtime_ns for p in (run / "evals").iterdir()} == records
    assert "step 2: fid=" in capsys.readouterr().out


@pytest.mark.parametrize("preset,num_samples", [("fid50k", 50_000), ("fid10k", 10_000), ("fid5k", 5_000),
                                                ("digits", 500)])
def test_presets_are_named_and_carry_their_sample_count(trained, preset, num_samples):
    cfg = evaluate.load_run_config(trained, [f"eval={preset}"])
    assert (cfg.eval.preset, cfg.eval.num_samples, cfg.eval.sampler) == (preset, num_samples, "ddpm")
    assert (cfg.eval.cfg_scale, cfg.eval.label_sampling) == (1.0, "uniform")
    if preset != "digits":  # the paper's protocol: 250 DDPM steps, no guidance
        assert cfg.eval.sampling_steps == "250"
    assert evaluate.eval_settings(cfg)["num_samples"] == num_samples  # part of the record's identity


def test_fid50k_is_the_default_for_imagenet():
    cfg = compose(["data=imagenet256"])
    assert (cfg.eval.preset, cfg.eval.num_samples, cfg.eval.sampling_steps) == ("fid50k", 50_000, "250")
    assert (cfg.eval.cfg_scale, cfg.eval.sampler, cfg.eval.label_sampling) == (1.0, "ddpm", "uniform")
    default = EvalConfig()
    assert (default.preset, default.num_samples, default.sampling_steps) == ("fid50k", 50_000, "250")


def test_the_guided_protocol_gets_its_own_record_beside_the_unguided_one(trained, tmp_path):
    """eval=fid50k and eval=fid50k_cfg on one checkpoint: two records side by side, each saying its guidance,
    and the results table never mixes them unless asked."""
    run = _copy_run(trained, tmp_path / "run")
    small = ["eval.num_samples=8", "eval.sampling_steps=5", "eval.batch_size=8", "eval.shard_size=8",
             "eval.metrics=[fid]", "eval.extractor=digits-cnn", "eval.reference_split=test"]
    plain = evaluate.load_run_config(run, ["eval=fid50k", *small])
    guided = evaluate.load_run_config(run, ["eval=fid50k_cfg", *small, "eval.cfg_channels=1"])
    assert (guided.eval.preset, guided.eval.cfg_scale) == ("fid50k_cfg", 1.5)
    assert compose(["eval=fid50k_cfg"]).eval.cfg_channels == 3  # the public code's 3 of 4 latent channels
    with pytest.warns(UserWarning, match="fewer images"):
        a = evaluate.evaluate(plain, STEPS, run)
        b = evaluate.evaluate(guided, STEPS, run)
    assert (a["cfg_scale"], a["cfg_channels"], a["guided"]) == (1.0, None, False)
    assert (b["cfg_scale"], b["cfg_channels"], b["guided"]) == (1.5, 1, True)
    records = sorted(p.name for p in (run / "evals").iterdir())
    assert records[0] == f"step_{STEPS}.json" and len(records) == 2  # side by side, neither overwritten
    assert evaluate.record_for(plain, run, STEPS)[1] == a and evaluate.record_for(guided, run, STEPS)[1] == b
    table = load_results([run.parent])
    with pytest.raises(ValueError, match="refusing to mix guided and unguided"):
        comparable(table, "fid")
    rows, label = comparable(table[table.guided], "fid")
    assert len(rows) == 1 and label.endswith("cfg 1.5")
