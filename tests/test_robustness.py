"""Nothing lost, nothing done twice: one writer per cell, torn files recovered, failed writes recorded, temp
files of killed writes cleaned, lost checkpoints never silently retrained. Real processes, real files."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
from fixtures_results import make_demo_sweep
from helpers import REPO, TINY_CELL, one_thread_env, run_module, wait_for_file

from harness import status
from harness.core import checkpoint, lease
from harness.core.runfolder import read_json, read_jsonl, read_status
from harness.report import build_report
from harness.results import load_results

# Every test here runs the commands as processes (kills, two writers, relaunches): not in make test-fast.
pytestmark = pytest.mark.process

STEPS = 40
TINY = [*TINY_CELL, "patch=4", "train.log_every=5", "train.val_every=20", "train.keep_last=100", "eval=digits",
        "eval.at_steps=[]"]


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.train", *TINY, f"out_dir={out}", *extra]


def only_run_dir(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if (p / "cell.json").exists()]
    return run


def trained_lines(run: Path) -> list[int]:
    """Steps of the training-loss lines of the log (every step logged once unless a step was trained twice)."""
    return [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def test_two_trainings_of_one_cell_started_together_train_each_step_once(tmp_path):
    out = tmp_path / "run"
    extra = [f"train.steps={STEPS}", "train.ckpt_every=10"]
    procs = [subprocess.Popen(train_cmd(out, *extra), cwd=REPO, env=one_thread_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results  # one trains, the other refuses at once naming the holder
    refusal = next(err for code, _, err in results if code == 1).strip().splitlines()
    assert len(refusal) == 1 and "is busy: its lease is held by pid" in refusal[0], refusal
    run = only_run_dir(out)
    lines = trained_lines(run)
    assert lines == list(range(5, STEPS + 1, 5)), "a step was trained by both"  # each logged step once
    for step in checkpoint.list_steps(run / "checkpoints"):
        assert checkpoint.verify(checkpoint.ckpt_path(run / "checkpoints", step)) is None, step
    assert read_status(run)["attempts"] == 1 and not (run / lease.LEASE_FILE).exists()


def test_two_sweeps_into_one_folder_train_and_evaluate_every_cell_once(tmp_path):
    out = tmp_path / "sweep"
    args = [*TINY_CELL, "train.steps=10", "train.ckpt_every=5", "train.log_every=5", "train.val_every=5",
            "eval=digits", "eval.num_samples=20", "eval.sampling_steps=5", "eval.at_steps=[10]", "eval.batch_size=20",
            "eval.shard_size=20", "report=false", "patch=2,4,8", f"out_dir={out}"]
    cmd = [sys.executable, "-m", "harness.sweep", "-m", *args]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    # A cell the other sweep held when this one planned is skipped ("held by other processes"); one it took
    # between the plan and the task is waited for ("done by another process"): which happens depends on timing.
    summaries = [re.search(r"(\d+) already done, (\d+) run now(?:, (\d+) done by another process[^,]*)?"
                           r"(?:, (\d+) held by other processes)?", out_).groups() for _, out_, _ in results]
    ran = [int(s[1]) for s in summaries]
    by_other = [int(s[0]) + int(s[2] or 0) + int(s[3] or 0) for s in summaries]
    assert sum(ran) == 3 and [r + o for r, o in zip(ran, by_other)] == [3, 3], summaries  # each says who did what
    runs = [p for p in out.iterdir() if (p / "cell.json").exists()]
    assert len(runs) == 3
    for run in runs:
        st = read_json(run / "status.json")
        assert (st["state"], st["attempts"]) == ("finished", 1), (run.name, st)  # trained once, by one sweep
        assert trained_lines(run) == [5, 10], run.name
        assert [p.name for p in (run / "evals").iterdir()] == ["step_10.json"]  # evaluated once
        assert not list(run.rglob(".*.tmp")) and not (run / lease.LEASE_FILE).exists()


def test_temp_files_of_killed_writes_are_removed_when_the_cell_next_starts(tmp_path):
    out = tmp_path / "run"
    subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    run = only_run_dir(out)
    # What kills in the middle of atomic writes leave behind: a whole checkpoint, a status, a samples shard.
    torn = [run / "checkpoints" / ".step_0000015.pt.k1ll3d.tmp", run / ".status.json.x7.tmp",
            run / "samples" / "step_10_abcd" / ".shard_00000.npz.q2.tmp"]
    for path in torn:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 4096)
    # The same cell started again (trained already: it only finishes) cleans them up under its lease.
    subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    assert not list(run.rglob(".*.tmp"))
    assert read_status(run)["state"] == "finished" and checkpoint.list_steps(run / "checkpoints")[-1] == 10


def test_a_kill_during_checkpoint_writes_then_resume_leaves_no_temp_file(tmp_path):
    out = tmp_path / "run"
    extra = ["train.steps=60", "train.ckpt_every=1"]  # a checkpoint every step: a kill lands in a write often
    for delay_s in (0.6, 1.1, 1.7):
        proc = subprocess.Popen(train_cmd(out, *extra), env=one_thread_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_file(out, "*/checkpoints/step_*.pt", proc)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    subprocess.run(train_cmd(out, *extra), check=True, env=one_thread_env(), capture_output=True)
    run = only_run_dir(out)
    assert not list(run.rglob(".*.tmp"))
    assert read_status(run)["state"] == "finished" and read_status(run)["step"] == 60


def test_torn_small_files_are_recovered_not_fatal(tmp_path, capsys):
    out = tmp_path / "run"
    subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    run = only_run_dir(out)
    # A torn sidecar beside a whole checkpoint (every zip record passes its CRC-32) loses the checksum, not the
    # checkpoint: it is trusted. Beside a torn checkpoint it is not: the previous one is used, and the log says so.
    ckpt = checkpoint.ckpt_path(run / "checkpoints", 10)
    sidecar = ckpt.with_suffix(".json")
    sidecar.write_text(sidecar.read_text()[:7])
    assert checkpoint.verify(ckpt) is None and checkpoint.load_latest(run / "checkpoints")["step"] == 10
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    assert "sidecar is torn and it is not a whole zip archive" in checkpoint.verify(ckpt)
    assert checkpoint.load_latest(run / "checkpoints")["step"] == 5
    # A torn status.json reads as rebuilt from the checkpoints and the log; status shows the rest of a sweep.
    (run / "status.json").write_text('{"state": "runn')
    rebuilt = read_status(run)
    assert rebuilt["rebuilt"] and rebuilt["state"] == "interrupted" and "rebuilt" in rebuilt["reason"]
    assert status.main([str(out)]) == 0
    assert "interrupted" in capsys.readouterr().out
    # A torn cell.json: status shows the cell as unreadable and still lists the others...
    other = out / "DiT-other"
    other.mkdir()
    (other / "cell.json").write_text('{"cell_id": "DiT-oth')
    rows = {r["cell_id"]: r for r in status.sweep_rows(out)}
    assert rows["DiT-other"]["state"] == "unreadable" and "cell.json" in rows["DiT-other"]["reason"]
    assert rows[run.name]["state"] == "interrupted"
    # ...and the next start of a cell rewrites its torn cell.json from config.yaml, and resumes.
    (run / "cell.json").write_text('{"cell_id": "DiT')
    r = subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), env=one_thread_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_json(run / "cell.json")["cell_id"] == run.name
    assert read_status(run)["state"] == "finished" and "rebuilt" not in read_status(run)
    assert {"event": "resume", "step": 5} in read_jsonl(run / "metrics.jsonl")  # from 5: 10 is torn


def _file_size_limit(limit_bytes: int):
    """preexec_fn: writes beyond limit_bytes fail with EFBIG (as a full disk fails them with ENOSPC)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_failed_write_marks_the_cell_failed_with_file_step_and_error(tmp_path):
    out = tmp_path / "run"
    subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    run = only_run_dir(out)
    for p in (run / "checkpoints").glob("step_0000010.*"):  # back to step 5, as a kill before 10's write would
        p.unlink()
    good = checkpoint.ckpt_path(run / "checkpoints", 5)
    size = good.stat().st_size
    before = good.read_bytes()
    r = subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), env=one_thread_env(),
                       capture_output=True, text=True, preexec_fn=_file_size_limit(size // 2))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
    st = read_json(run / "status.json")
    assert st["state"] == "failed", st  # never left `running` by a process that exited with an error
    assert "step 10" in st["reason"] and "step_0000010.pt" in st["reason"] and "File too large" in st["reason"]
    assert "\n" not in st["reason"]
    assert good.read_bytes() == before and checkpoint.verify(good) is None  # the previous checkpoint stays valid
    assert checkpoint.list_steps(run / "checkpoints") == [5] and not list(run.rglob(".*.tmp"))
    # and once there is room again, it resumes from the checkpoint it kept
    subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    assert read_status(run)["state"] == "finished" and checkpoint.list_steps(run / "checkpoints") == [5, 10]


def test_deleted_checkpoints_are_not_silently_retrained(tmp_path):
    out = tmp_path / "run"
    extra = ["train.steps=10", "train.ckpt_every=5", "eval.at_steps=[10]", "eval.num_samples=20",
             "eval.sampling_steps=5", "eval.batch_size=20", "eval.shard_size=20", "eval.metrics=[fid]"]
    subprocess.run(train_cmd(out, *extra), check=True, env=one_thread_env(), capture_output=True)
    run = only_run_dir(out)
    r = run_module("harness.evaluate", f"run_dir={run}", "step=10", "eval=digits", "eval.num_samples=20",
                   "eval.sampling_steps=5", "eval.batch_size=20", "eval.shard_size=20", "eval.metrics=[fid]")
    assert r.returncode == 0, r.stderr[-2000:]
    for p in (run / "checkpoints").iterdir():  # a user cleaning up
        p.unlink()
    log_before = (run / "metrics.jsonl").read_bytes()
    refused = subprocess.run(train_cmd(out, *extra), env=one_thread_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "metrics.jsonl reaches step 10 but there is no usable checkpoint" in line and "train.restart=true" in line
    assert (run / "metrics.jsonl").read_bytes() == log_before and checkpoint.list_steps(run / "checkpoints") == []

    subprocess.run(train_cmd(out, *extra, "train.restart=true"), check=True, env=one_thread_env(), capture_output=True)
    events = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "restart"]
    assert len(events) == 1 and events[0]["from_step"] == 10 and events[0]["results_set_aside"]
    assert (run / events[0]["results_set_aside"] / "evals" / "step_10.json").exists()  # kept, set aside
    assert not (run / "evals").exists()  # the old run's record no longer counts for the new one
    table = load_results([out])
    assert table["step"].tolist() == [10] and not table["evaluated"].any()  # only the new segment is read
    new_lines = trained_lines(run)
    assert new_lines[-2:] == [5, 10]  # the new run logged its own steps after the restart mark


def test_a_kill_while_the_first_checkpoint_is_written_resumes_from_step_0(tmp_path):
    # The step-5 line is logged before the step-5 checkpoint is written: a kill in between leaves a log at
    # the first checkpoint step and no checkpoint. That is not a user's clean-up: training starts again.
    out = tmp_path / "run"
    subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    run = only_run_dir(out)
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    kept = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("step", 0) <= 5]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resumed = subprocess.run(train_cmd(out, "train.steps=10", "train.ckpt_every=5"), env=one_thread_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert checkpoint.list_steps(run / "checkpoints") == [5, 10] and read_status(run)["state"] == "finished"


def test_a_preemption_handed_to_submitit_leaves_the_cell_interrupted_not_failed(tmp_path):
    # Under submitit, USR2's previous handler requeues the job and calls sys.exit(-1); the trainer checkpoints,
    # says `interrupted`, hands the signal over, and the exit that follows is not a failure of the cell.
    out = tmp_path / "run"
    script = ("import runpy, signal, sys\n"
              "signal.signal(signal.SIGUSR2, lambda signum, frame: sys.exit(-1))  # as submitit's, after requeueing\n"
              f"sys.argv = ['harness.train', *{train_cmd(out, 'train.steps=100000', 'train.ckpt_every=5')[3:]!r}]\n"
              "runpy.run_module('harness.train', run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=one_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(out, "*/checkpoints/step_*.pt", proc)
        os.kill(proc.pid, signal.SIGUSR2)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 255, err[-2000:]  # sys.exit(-1)
    run = only_run_dir(out)
    st = read_status(run)
    assert st["state"] == "interrupted" and "preempted" in st["reason"], st
    assert st["step"] == max(checkpoint.list_steps(run / "checkpoints")) > 0  # checkpointed where it stopped


def test_a_cell_evaluated_before_its_training_ended_is_trained_by_the_next_sweep(tmp_path):
    out = tmp_path / "sweep"
    steps = ["train.steps=60", "train.ckpt_every=5"]
    proc = subprocess.Popen(train_cmd(out, *steps), env=one_thread_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_file(out, "*/checkpoints/step_*.json", proc)  # the sidecar, written last: a whole first checkpoint
    proc.kill()  # a crash part-way through training
    proc.wait()
    run = only_run_dir(out)
    first = min(checkpoint.list_steps(run / "checkpoints"))
    assert first < 60
    sweep = [sys.executable, "-m", "harness.sweep", "-m", *TINY, *steps, "report=false", f"out_dir={out}",
             "eval.num_samples=20", "eval.sampling_steps=5", "eval.batch_size=20", "eval.shard_size=20",
             "eval.metrics=[fid]", f"eval.at_steps=[{first}]"]
    ev = subprocess.run([*sweep, "stage=eval"], cwd=REPO, env=one_thread_env(), capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert (run / "evals" / f"step_{first}.json").exists()
    st = read_status(run)
    assert st["state"] == "interrupted" and "training not finished" in st["reason"], st  # not `finished`
    tr = subprocess.run([*sweep, "stage=train"], cwd=REPO, env=one_thread_env(), capture_output=True, text=True)
    assert tr.returncode == 0, tr.stderr[-2000:]
    assert "1 run now" in tr.stdout and read_status(run)["step"] == 60  # the next sweep trained it to the end


def test_status_shows_queued_cells_and_the_holder_of_a_folder(tmp_path, capsys):
    out = tmp_path / "sweep"
    subprocess.run(train_cmd(out, "train.steps=5", "train.ckpt_every=5"), check=True, env=one_thread_env(),
                   capture_output=True)
    run = only_run_dir(out)
    (out / "sweep.json").write_text(json.dumps({"name": "default", "grid": [run.name, "DiT-never-started_s0_1"]}))
    holder = lease.CellLease(run, "train", stale_after_s=3, heartbeat_s=1).acquire()
    try:
        rows = {r["cell_id"]: r for r in status.sweep_rows(out)}
        assert rows["DiT-never-started_s0_1"]["state"] == "queued"
        assert f"pid {os.getpid()}" in rows[run.name]["holder"] and rows[run.name]["holder_stale"] is False
        status.main([str(out)])
        table = capsys.readouterr().out
        assert "queued" in table and f"held: pid {os.getpid()} on" in table and "STALE" not in table
    finally:
        holder.release()
    # a lease whose heartbeat stopped (its holder died on another node) is flagged
    (run / lease.LEASE_FILE).write_text(json.dumps({"version": 1, "token": "t", "purpose": "train", "host": "elsewhere",
                                                    "pid": 1, "stale_after_s": 1.0, "heartbeat_s": 0.1}))
    old = time.time() - 60
    os.utime(run / lease.LEASE_FILE, (old, old))
    status.main([str(out)])
    assert "held: STALE" in capsys.readouterr().out


@pytest.mark.parametrize("torn", ["status.json", "cell.json", "sweep.json"])
def test_report_and_results_survive_a_torn_file(tmp_path, torn):
    sweep = make_demo_sweep(tmp_path / "demo")
    victim = sweep / torn if torn == "sweep.json" else next(p for p in sweep.iterdir() if p.is_dir()) / torn
    victim.write_text(victim.read_text()[: len(victim.read_text()) // 2])
    with pytest.warns(UserWarning, match="torn|not valid JSON") if torn != "status.json" else nullcontext():
        report = build_report([sweep], n_resamples=20)
    assert report.path.exists() and (report.path.parent / "results.csv").exists()
    assert len(load_results([sweep]).drop_duplicates("cell_id")) == 6 - (torn == "cell.json")
