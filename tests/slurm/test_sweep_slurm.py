"""The sweep on the real SLURM cluster: `python -m harness.sweep -m ... hydra/launcher=slurm cluster=localtest`
submits one job per cell through sbatch; every cell leaves its records; a preempted cell (USR2, then a bare
`scontrol requeue`) resumes from its checkpoint; a relaunch submits nothing and an extension only the new cell.

Everything is checked from the run folders and from sacct, never from the launcher's word. The sweep and its
jobs (sbatch exports the environment) see the cluster's variables (fixture slurm_cluster) and the session's
harness cache (tests/conftest.py), so the digits extractor trains once.
"""

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core import checkpoint
from harness.core.runfolder import read_json, read_jsonl

from .conftest import run_client

REPO = Path(__file__).resolve().parents[2]
SLURM = ["hydra/launcher=slurm", "cluster=localtest"]  # partition debug, one CPU, one (fake) GPU per cell
STEPS = 10
CKPT_EVERY = 5
GLOBAL_BATCH = 16
# The preempted cell must still be training when each signal lands: the test signals within a few polls of
# seeing a step, and this machine trains the cell at 4 (busy) to 125 (idle) steps/s.
PREEMPTED_STEPS = 150
VICTIM_STEPS = 1_000_000  # never reached: the cell is killed after its first checkpoint
# A cell a shared 2-core CPU trains in seconds: a 1-block DiT on 8x8 digits, FID (digits extractor) from 20
# samples, on the CPU even though the job holds a GPU.
TINY_CELL = [
    "model=demo-S", "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.image_size=8", "patch=4",
    "train=demo", f"train.global_batch={GLOBAL_BATCH}", f"train.ckpt_every={CKPT_EVERY}", "train.log_every=5",
    "train.val_every=10", "eval=digits", "eval.num_samples=20", "eval.sampling_steps=5", f"eval.at_steps=[{STEPS}]",
    "eval.batch_size=20", "eval.shard_size=20", "device=cpu", "report=false",
]
SWEEP_TIMEOUT_S = 240  # a hung sweep fails the test instead of the CI job
WAIT_S = 120  # how long to wait for a cell to reach a state before failing
POLL_S = 0.05  # at 125 steps/s a cell trains 6 steps between two polls


def sweep_cmd(out_dir, *overrides):
    return [sys.executable, "-m", "harness.sweep", "-m", *TINY_CELL, *SLURM, *overrides, f"out_dir={out_dir}"]


def run_sweep(out_dir, *overrides):
    """Runs the sweep until every job is done (the launcher waits on their results); returns the process."""
    return subprocess.run(sweep_cmd(out_dir, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=SWEEP_TIMEOUT_S)


def wait_for(what, probe, timeout_s=WAIT_S, proc=None):
    """Polls probe() until it returns something truthy, and returns it; fails naming `what` after timeout_s
    or when `proc` (the sweep) exits first."""
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: the sweep exited ({proc.returncode}) first")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s} s")
        time.sleep(POLL_S)
    return value


def sacct_jobs():
    """{job id: (state, allocated TRES)} of every job the cluster's accounting knows (array tasks as N_i)."""
    out = run_client("sacct", "-X", "-n", "-P", "-a", "-S", "2020-01-01", "-o", "JobID,State,AllocTRES")
    jobs = {}
    for line in out.splitlines():
        job_id, state, tres = line.split("|")
        jobs[job_id] = (state.split(" ")[0], tres)
    return jobs


def settled_new_jobs(before, count, timeout_s=30):
    """The `count` jobs sacct knows beyond `before`, once all of them are COMPLETED (sacct lags a moment)."""
    def probe():
        new = {j: v for j, v in sacct_jobs().items() if j not in before}
        return new if len(new) >= count and all(s == "COMPLETED" for s, _ in new.values()) else None

    new = wait_for(f"{count} new COMPLETED jobs in sacct", probe, timeout_s=timeout_s)
    assert len(new) == count, new
    return new


def run_dirs(out_dir):
    """{cell id: run folder} of a sweep folder."""
    return {p.name: p for p in Path(out_dir).iterdir() if (p / "cell.json").exists()} if out_dir.exists() else {}


def attempts(out_dir):
    return {cid: read_json(d / "status.json")["attempts"] for cid, d in run_dirs(out_dir).items()}


def assert_finished(run_dir, steps, attempts):
    st = read_json(run_dir / "status.json")
    assert (st["state"], st["step"], st["attempts"]) == ("finished", steps, attempts), st
    assert steps in checkpoint.list_steps(run_dir / "checkpoints")
    for step in sorted({STEPS, steps}):
        record = read_json(run_dir / "evals" / f"step_{step}.json")
        assert record is not None, f"no evals/step_{step}.json in {run_dir}"
        assert record["step"] == step and math.isfinite(record["metrics"]["fid"])


def test_every_cell_runs_as_a_job_and_a_relaunch_submits_only_new_cells(tmp_path):
    out = tmp_path / "sweep"
    seeds = "seed=0,1,2,3"
    jobs_before = sacct_jobs()

    first = run_sweep(out, f"train.steps={STEPS}", seeds)
    assert first.returncode == 0, first.stderr[-3000:]
    cells = run_dirs(out)
    assert len(cells) == 4
    for run_dir in cells.values():
        assert_finished(run_dir, STEPS, attempts=1)
    jobs = settled_new_jobs(jobs_before, 4)
    for _, tres in jobs.values():
        assert "gres/gpu=1" in tres, f"a cell asked for one GPU, sacct says {tres}"

    jobs_before = sacct_jobs()
    again = run_sweep(out, f"train.steps={STEPS}", seeds)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already done, 0 run now" in again.stdout
    assert attempts(out) == {cid: 1 for cid in cells}
    assert run_client("squeue", "-h") == ""
    assert sacct_jobs() == jobs_before, "a relaunch of a finished sweep submitted jobs"

    extended = run_sweep(out, f"train.steps={STEPS}", "seed=0,1,2,3,4")
    assert extended.returncode == 0, extended.stderr[-3000:]
    new = set(run_dirs(out)) - set(cells)
    assert len(new) == 1
    assert_finished(out / new.pop(), STEPS, attempts=1)
    assert {cid: n for cid, n in attempts(out).items() if cid in cells} == {cid: 1 for cid in cells}
    assert len(settled_new_jobs(jobs_before, 1)) == 1


def trained_steps(run_dir):
    """Steps of the training log lines (resume events and validation lines left out)."""
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def resume_steps(run_dir):
    return [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "resume"]


def cell_job_id(out_dir):
    """The SLURM id of the sweep's one job (N, or N_0 for an array), from its submitit folder; None until
    it is submitted."""
    names = [p.name for p in (out_dir / ".submitit").glob("*") if re.fullmatch(r"\d+(_\d+)?", p.name)]
    tasks = [n for n in names if "_" in n] or names
    return tasks[0] if len(tasks) == 1 else None


def job_pids(job_id):
    """Pids of the job's processes (batch script, srun, the cell) on this machine, its only node."""
    raw_id = run_client("squeue", "-h", "-j", job_id, "-o", "%A").strip()
    return [int(line.split()[0]) for line in run_client("scontrol", "listpids", raw_id).splitlines()[1:]]


def job_environment(job_id, name):
    """The values of variable `name` in the environments of the job's processes."""
    values = set()
    for pid in job_pids(job_id):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        values |= {v.split(b"=", 1)[1].decode() for v in env if v.startswith(name.encode() + b"=")}
    return values


def test_preempted_cell_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    steps = PREEMPTED_STEPS
    jobs_before = sacct_jobs()
    with open(log, "w") as f:
        proc = subprocess.Popen(sweep_cmd(out, f"train.steps={steps}", "resources.gpus_per_node=1"),
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
    try:
        job_id = wait_for("the cell's job", lambda: cell_job_id(out), proc=proc)
        run_dir = wait_for("the cell's run folder", lambda: next(iter(run_dirs(out).values()), None), proc=proc)
        wait_for("a first checkpoint", lambda: checkpoint.list_steps(run_dir / "checkpoints"), proc=proc)

        # The GPU request path: the job's processes see the one (fake) GPU SLURM gave them.
        visible = job_environment(job_id, "CUDA_VISIBLE_DEVICES")
        assert len(visible) == 1 and visible <= {"0", "1"}, visible

        # Preemption or time limit: USR2 makes the cell checkpoint at the next step, requeue and resume.
        step_at_usr2 = max(trained_steps(run_dir) + checkpoint.list_steps(run_dir / "checkpoints"))
        run_client("scancel", "--signal=USR2", job_id)
        after_usr2 = wait_for("a resume after USR2", lambda: resume_steps(run_dir)[:1], proc=proc)[0]
        assert step_at_usr2 <= after_usr2 < steps, "USR2 must lose no step"

        # A bare requeue: SIGTERM (ignored by submitit), SIGKILL KillWait later, a fresh start from the
        # submission that must resume from the last checkpoint on disk. The test sends the SIGKILL at once
        # (scancel --signal=KILL would cancel the requeued job instead).
        wait_for("training after the resume", lambda: max(trained_steps(run_dir)) > after_usr2, proc=proc)
        pids = job_pids(job_id)
        step_at_requeue = max(trained_steps(run_dir))
        run_client("scontrol", "requeue", job_id)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Not tied to the sweep: had the cell finished within KillWait, SLURM still runs it again.
        after_requeue = wait_for("a resume after scontrol requeue", lambda: resume_steps(run_dir)[1:2])[0]
        assert after_requeue >= step_at_requeue - CKPT_EVERY, "a requeue may lose at most one checkpoint interval"
        assert after_requeue < steps, "the requeue came after training had ended: train longer"

        proc.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    # Every attempt ran as the same SLURM job, requeued, not resubmitted.
    jobs = settled_new_jobs(jobs_before, 1, timeout_s=WAIT_S)
    assert list(jobs) == [job_id]
    assert "gres/gpu=1" in jobs[job_id][1]
    assert resume_steps(run_dir) == [after_usr2, after_requeue]
    assert_finished(run_dir, steps, attempts=3)
    assert read_json(run_dir / "status.json")["gpu_hours"] == 0.0, "device=cpu: the GPU is held, not used"


def test_a_killed_cell_is_named_and_the_others_finish(tmp_path):
    out = tmp_path / "sweep"
    log = tmp_path / "sweep.log"
    with open(log, "w") as f:
        # The victim is given far more steps than it can train before it is killed, so the kill can
        # never arrive after it has finished: no race with the machine's speed.
        proc = subprocess.Popen(sweep_cmd(out, f"train.steps={PREEMPTED_STEPS},{VICTIM_STEPS}"),
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
    array_id = None
    try:
        # submitit keeps an array's submission script in .submitit/N/
        array_id = wait_for("the sweep's job array", lambda: next(
            (p.name for p in (out / ".submitit").glob("*") if p.name.isdigit()), None), proc=proc)
        # Task 1 is the second cell of the grid (the long one); kill it as the OOM killer would.
        victim = wait_for("the long cell's run folder", lambda: next(
            (d for d in run_dirs(out).values() if read_json(d / "cell.json")["steps"] == VICTIM_STEPS), None),
            proc=proc)
        wait_for("a first checkpoint", lambda: checkpoint.list_steps(victim / "checkpoints"), proc=proc)
        assert read_json(victim / "status.json")["state"] == "running"
        run_client("scancel", "--signal=KILL", f"{array_id}_1")
        proc.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if array_id is not None:
            run_client("scancel", array_id)  # what the broken sweep left running
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    others = [d for d in run_dirs(out).values() if d != victim]
    assert len(others) == 1
    assert_finished(others[0], PREEMPTED_STEPS, attempts=1)
    assert victim.name in text[text.index("cell(s) failed"):], text[-3000:]
    st = read_json(victim / "status.json")
    assert st["state"] == "failed" and st["reason"], st


def test_a_two_gpu_cell_trains_as_ddp_across_its_tasks(tmp_path, slurm_cluster):
    """A cell the resource rule gives two GPUs runs as one SLURM job of two tasks that join one process
    group (gloo here, from submitit's job environment) and reach the parameters a single process reaches
    at the same global batch: the global batch, not the GPU count, is the experimental variable."""
    two = tmp_path / "two"
    # An hour budget of ~0 per job makes the rule double the GPUs up to max_gpus=2 (one node of two).
    r = run_sweep(two, f"train.steps={STEPS}", "resources.gpus_per_node=2", "resources.max_gpus=2",
                  "resources.gpu_hours_per_gpu_job_max=1e-12")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = run_dirs(two).values()
    assert_finished(run_dir, STEPS, attempts=1)
    job = wait_for("the cell's sacct record", lambda: [
        tres for job_id, (state, tres) in sacct_jobs().items()
        if state == "COMPLETED" and job_id.split("_")[0] in {p.name for p in (two / ".submitit").iterdir()}])
    assert "gres/gpu=2" in job[0], job

    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "harness.train", *TINY_CELL, f"train.steps={STEPS}", f"out_dir={one}"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=SWEEP_TIMEOUT_S)
    (single,) = [p for p in one.iterdir() if (p / "cell.json").exists()]
    a = checkpoint.load(checkpoint.ckpt_path(single / "checkpoints", STEPS))["model"]
    b = checkpoint.load(checkpoint.ckpt_path(run_dir / "checkpoints", STEPS))["model"]
    for k in a:
        rel = float((a[k] - b[k]).norm() / max(float(a[k].norm()), 1e-12))
        assert rel < 1e-5, f"{k}: relative error {rel:.2e} between 2 SLURM tasks and 1 process"
