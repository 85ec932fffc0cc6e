"""The trainer's contract with the scheduler: exact resume after SIGKILL, DDP equals one process, no silent NaN."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_CELL, one_thread_env, wait_for_file

from harness.cell import build_model, load_run_config
from harness.core import checkpoint
from harness.core.runfolder import read_json, read_jsonl
from harness.train import DataOrder, batch_plan

TINY = [*TINY_CELL, "patch=4", "train.log_every=2", "train.val_every=10", "train.keep_last=100", "eval=digits"]


def _train_cmd(out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.train", *TINY, f"out_dir={out_dir}", *extra]


def _only_run_dir(out_dir: Path) -> Path:
    dirs = [p for p in out_dir.iterdir() if (p / "cell.json").exists()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _final_state(out_dir: Path, step: int) -> dict:
    return checkpoint.load(checkpoint.ckpt_path(_only_run_dir(out_dir) / "checkpoints", step))


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


@pytest.mark.process
def test_sigkill_at_several_moments_then_resume_is_bitwise_identical(tmp_path):
    steps, every = 40, 5
    extra = [f"train.steps={steps}", f"train.ckpt_every={every}"]
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, *extra), check=True, env=one_thread_env(), capture_output=True)

    killed = tmp_path / "killed"
    kills = 0
    # Kill right after checkpoint 5 appears, a little after 15, and a little after 30 (mid-step or mid-write).
    for target, delay_s in ((5, 0.0), (15, 0.05), (30, 0.13)):
        proc = subprocess.Popen(_train_cmd(killed, *extra), env=one_thread_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            run_dirs = [p for p in killed.glob("*/checkpoints")] if killed.exists() else []
            if run_dirs and any(s >= target for s in checkpoint.list_steps(run_dirs[0])):
                break
            time.sleep(0.01)
        time.sleep(delay_s)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the run finished before it could be killed: make it longer"
    subprocess.run(_train_cmd(killed, *extra), check=True, env=one_thread_env(), capture_output=True)

    a, b = _final_state(straight, steps), _final_state(killed, steps)
    for key in ("model", "ema", "opt"):
        _assert_same_tensors(a[key], b[key], key)
    assert a["images_seen"] == b["images_seen"] == steps * 16
    status = read_json(_only_run_dir(killed) / "status.json")
    assert status["state"] == "finished" and status["attempts"] >= kills + 1
    assert any(r.get("event") == "resume" for r in read_jsonl(_only_run_dir(killed) / "metrics.jsonl"))


@pytest.mark.process
def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    out = tmp_path / "run"
    subprocess.run(_train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    ckpts = _only_run_dir(out) / "checkpoints"
    newest = checkpoint.ckpt_path(ckpts, 10)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    assert checkpoint.verify(newest) is not None
    state = checkpoint.load_latest(ckpts)
    assert state is not None and state["step"] == 5


@pytest.mark.process
def test_two_gloo_processes_match_one_process(tmp_path):
    extra = ["train.steps=4", "train.ckpt_every=4", "train.global_batch=16"]
    one = tmp_path / "one"
    subprocess.run(_train_cmd(one, *extra), check=True, env=one_thread_env(), capture_output=True)
    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                "-m", "harness.train", *TINY, f"out_dir={two}", *extra]
    r = subprocess.run(torchrun, env=one_thread_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # Not bitwise: two processes reduce the gradients of their halves in another order than one process.
    a, b = _final_state(one, 4)["model"], _final_state(two, 4)["model"]
    for k in a:
        rel = (a[k] - b[k]).norm() / max(a[k].norm(), 1e-12)
        assert rel < 1e-5, f"{k}: relative error {rel:.2e}"
    # ...and both trained: every trainable tensor moved away from the initial weights (a cell's step-0 state is
    # its checkpoint-free init, rebuilt here from the same seed), the zero-initialised output layer included.
    init = _initial_model(one)
    moved = [k for k in a if not torch.equal(a[k], init[k])]
    frozen = {"pos_embed"}  # the fixed sin-cos embedding is not trained
    assert set(moved) == set(a) - frozen, sorted(set(a) - set(moved))


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """Returns {rank: pid} of torchrun's worker processes (read from their environments)."""
    out = {}
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [v.split(b"=", 1)[1] for v in env if v.startswith(b"RANK=")]
        if rank:
            out[int(rank[0])] = int(child)
    return out


@pytest.mark.process
def test_a_stop_signal_reaching_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    # SLURM signals each task of a job on its own: one rank sees USR2 steps before another. Had rank 0 stopped
    # alone, it would wait in its checkpoint's collectives while rank 1 waits in the next step's: a hang.
    out = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                "-m", "harness.train", *TINY, f"out_dir={out}", "train.steps=100000", "train.ckpt_every=100000",
                "train.log_every=4", "train.val_every=100000"]
    proc = subprocess.Popen(torchrun, env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(out, "*/metrics.jsonl", proc)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGUSR2)  # one rank only (the one that does not write)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    (run,) = [p for p in out.iterdir() if (p / "cell.json").exists()]
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted", (status, err[-2000:])
    (step,) = checkpoint.list_steps(run / "checkpoints")  # one checkpoint, where both stopped
    assert step % 4 == 0 and status["step"] == step and checkpoint.load_latest(run / "checkpoints")["step"] == step


def _initial_model(out_dir: Path) -> dict:
    """Returns the state dict a cell starts from (its seed, before any step), built from its run folder."""
    cfg = load_run_config(_only_run_dir(out_dir), [])
    torch.manual_seed(cfg.seed)  # as the trainer seeds before building
    return build_model(cfg).state_dict()


@pytest.mark.process
def test_non_finite_loss_stops_the_cell_as_failed(tmp_path):
    out = tmp_path / "nan"
    r = subprocess.run(_train_cmd(out, "train.steps=20", "train.lr=1e30", "train.ckpt_every=20"),
                       env=one_thread_env(), capture_output=True, text=True)
    assert r.returncode != 0
    status = read_json(_only_run_dir(out) / "status.json")
    assert status["state"] == "failed" and "non-finite" in status["reason"]
    assert checkpoint.list_steps(_only_run_dir(out) / "checkpoints") == []  # nothing NaN was saved


@pytest.mark.process
def test_loss_and_val_loss_fall_on_digits(tmp_path):
    out = tmp_path / "learn"
    subprocess.run(_train_cmd(out, "train.steps=60", "train.ckpt_every=60", "train.val_every=20",
                              "train.log_every=10", "model.hidden_size=64", "eval.at_steps=[30]",
                              "train.val_at_steps=[5,20]"),
                   check=True, env=one_thread_env(), capture_output=True)
    recs = read_jsonl(_only_run_dir(out) / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    vals = [r for r in recs if "validation" in r]
    assert losses[-1] < losses[0] and vals[-1]["val_loss"] < vals[0]["val_loss"], (losses, vals)
    # validated every val_every steps, at val_at_steps and at every evaluation step, on the held-out split, with
    # error bars
    assert [r["step"] for r in vals] == [5, 20, 30, 40, 60]
    for r in vals:
        assert r["validation"]["split"] == "test" and r["validation"]["num_images"] == 32
        assert 0 < r["val_loss_se"] < r["val_loss"] and 0 < r["val_loss_ema_se"] < r["val_loss_ema"]
        assert r["epochs"] == pytest.approx(r["images_seen"] / 1501) and r["unique_train_images"] == 1501
    assert all(r["epochs"] == pytest.approx(r["images_seen"] / 1501) for r in recs if "loss" in r)
    # at the last step the same estimator also reads as many training images
    assert [r["step"] for r in vals if "train_batch_loss" in r] == [60]
    assert all(r["train_batch_validation"]["split"] == "train" for r in vals if "train_batch_loss" in r)


@pytest.mark.process
def test_bad_input_fails_before_training_and_leaves_checkpoints(tmp_path):
    out = tmp_path / "bad"
    subprocess.run(_train_cmd(out, "train.steps=5", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    before = {p.name: p.stat().st_mtime_ns for p in (_only_run_dir(out) / "checkpoints").iterdir()}
    for bad in (["patch=3"], ["data=imagenet256", "data.path=/no/such/folder"],
                ["train.global_batch=15", "resources.gpus_per_node=2"]):
        r = subprocess.run(_train_cmd(out, "train.steps=10", *bad), env=one_thread_env(), capture_output=True,
                           text=True)
        assert r.returncode != 0
        assert any(word in r.stderr for word in ("patch", "folder", "divisible")), r.stderr[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in (_only_run_dir(out) / "checkpoints").iterdir()}
    assert before == after


@pytest.mark.parametrize("world,per_gpu,expected", [(1, None, (16, 1)), (2, 4, (4, 2)), (4, None, (4, 1))])
def test_batch_plan_derives_micro_batch_and_accumulation(world, per_gpu, expected):
    assert batch_plan(16, world, per_gpu) == expected


def test_batch_plan_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        batch_plan(15, 2, None)
    with pytest.raises(ValueError, match="does not divide"):
        batch_plan(16, 2, 3)


@pytest.mark.process
def test_an_s_size_cell_learns_on_the_digits_default(tmp_path):
    """Issue acceptance: a paper-size DiT-S (12 blocks, width 384) on the embedded digits (16x16, the data
    config's default) trains on the CPU with the paper's learning rate, and both losses fall."""
    out = tmp_path / "s4"
    cmd = [sys.executable, "-m", "harness.train", "model=S", "patch=4", "data=digits", "train=demo",
           "train.lr=1e-4", "train.global_batch=16", "train.steps=30", "train.log_every=5", "train.val_every=15",
           "train.val_batch=64", "train.val_images=32", "train.val_times=4", "train.ckpt_every=30", "device=cpu",
           f"out_dir={out}"]
    subprocess.run(cmd, check=True, env=one_thread_env(), capture_output=True)
    run_dir = _only_run_dir(out)
    facts = read_json(run_dir / "cell.json")
    assert (facts["model"], facts["params"] > 30e6, facts["tokens"]) == ("S", True, 16)
    recs = read_jsonl(run_dir / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0], vals
    assert losses[-1] < losses[0], losses


def test_a_stream_that_never_repeats_hands_out_consecutive_items_and_resumes_in_place():
    order = DataOrder(None, seed=3, global_batch=4)
    first = [order.next_indices().tolist() for _ in range(3)]
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]] and order.state() == {"epoch": 0, "pos": 12}
    resumed = DataOrder(None, seed=3, global_batch=4, **order.state())
    assert resumed.next_indices().tolist() == [12, 13, 14, 15]
    finite = DataOrder(10, seed=3, global_batch=4)
    seen = [i for _ in range(5) for i in finite.next_indices().tolist()]
    assert len(set(seen[:8])) == 8 and finite.epoch >= 1  # a finite set repeats after an epoch
