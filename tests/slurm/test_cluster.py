"""The local SLURM cluster works the way the harness uses it: submitit through the real sbatch, sacct,
GPU requests, preemption (USR2) with requeue, and `scontrol requeue`."""

import subprocess
import sys
import time

import cloudpickle
import pytest
import submitit
from submitit.core.utils import FailedJobError

from . import jobs
from .conftest import CLUSTER_SH, run_client

# The job unpickles these functions, but `tests` is not importable there: ship the module by value.
cloudpickle.register_pickle_by_value(jobs)

# Over 10 min: submitit then counts a USR2 as a preemption, not a timeout (submitit's has_timed_out).
JOB_TIME_MIN = 30
WAIT_FOR_STOP_S = 120  # how long a first start waits to be interrupted; reaching it fails the test
WAIT_S = 60  # how long the test waits for a job to start or for sacct to settle
POLL_S = 0.5
SACCT_UNSETTLED = {"", "UNKNOWN", "PENDING", "RUNNING", "REQUEUED", "COMPLETING", "RESIZING", "SUSPENDED"}


def wait_until(what, predicate, timeout_s=WAIT_S):
    """Polls predicate() until it is true; fails the test naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s} s")
        time.sleep(POLL_S)


def sacct_state(job_id):
    """Returns the job's state as sacct reports it ('' while sacct does not know the job yet)."""
    out = run_client("sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State")
    # A cancelled job reads "CANCELLED by 0": keep the state word.
    return out.strip().split("\n")[-1].split(" ")[0] if out.strip() else ""


def settled_sacct_state(job_id, timeout_s=WAIT_S):
    """Returns the job's final sacct state; sacct may lag the job by a moment, so poll."""
    deadline = time.monotonic() + timeout_s
    while (state := sacct_state(job_id)) in SACCT_UNSETTLED:
        if time.monotonic() > deadline:
            pytest.fail(f"sacct still says {state!r} for job {job_id} after {timeout_s} s")
        time.sleep(POLL_S)
    return state


def slurm_executor(folder, partition, **parameters):
    """Returns a SlurmExecutor for the test partition, one CPU, JOB_TIME_MIN, plus `parameters`."""
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(partition=partition, time=JOB_TIME_MIN, cpus_per_task=1, **parameters)
    return executor


def cluster_sh(*args):
    """Runs tests/slurm/cluster.sh with `args`; returns the CompletedProcess (text output)."""
    return subprocess.run(["bash", str(CLUSTER_SH), *args], capture_output=True, text=True, timeout=WAIT_S)


def test_cluster_sh_up_again_is_a_no_op(slurm_cluster):
    result = cluster_sh("up", str(slurm_cluster.dir))
    assert result.returncode == 0, result.stderr
    assert "already up" in result.stdout


def test_cluster_sh_up_resumes_a_node_left_drained(slurm_cluster):
    # slurmctld keeps a drained node drained across restarts; every job would then pend without an end.
    def node_state():
        return run_client("scontrol", "show", "node", slurm_cluster.node).split("State=", 1)[1].split()[0]

    run_client("scontrol", "update", f"nodename={slurm_cluster.node}", "state=drain", "reason=left drained by a test")
    wait_until("the node drained", lambda: "DRAIN" in node_state())
    result = cluster_sh("up", str(slurm_cluster.dir))
    assert result.returncode == 0, result.stderr
    assert "left drained by a test" in result.stdout and "resumed" in result.stdout, result.stdout
    wait_until("the node resumed", lambda: "DRAIN" not in node_state())
    again = cluster_sh("up", str(slurm_cluster.dir))  # a usable node is left as it is
    assert again.returncode == 0 and "resumed" not in again.stdout, again.stdout


def test_cluster_sh_refuses_a_second_cluster_on_the_same_ports(slurm_cluster, tmp_path):
    other = tmp_path / "other-cluster"
    result = cluster_sh("up", str(other))
    assert result.returncode == 1
    assert "refusing to start" in result.stderr and "port 68" in result.stderr
    assert not other.exists(), "a refused up must create nothing"


def test_submitit_job_runs_and_sacct_reports_completed(slurm_cluster, submitit_folder):
    executor = submitit.AutoExecutor(folder=submitit_folder, cluster="slurm")
    assert executor.cluster == "slurm"
    executor.update_parameters(
        slurm_partition=slurm_cluster.partition, timeout_min=JOB_TIME_MIN, cpus_per_task=1
    )
    job = executor.submit(jobs.add, 2, 3)
    # submitit runs the job with the submitting interpreter: the project's venv.
    assert job.result() == {"sum": 5, "job_id": job.job_id, "python": sys.executable}
    assert settled_sacct_state(job.job_id) == "COMPLETED"


def test_gpu_request_sets_cuda_visible_devices(slurm_cluster, submitit_folder):
    assert slurm_cluster.gpus_per_node >= 2, "cluster.sh starts a node with fake GPUs"
    requests = [1, slurm_cluster.gpus_per_node]
    submitted = [
        slurm_executor(submitit_folder, slurm_cluster.partition, gpus_per_node=n).submit(jobs.visible_gpus)
        for n in requests
    ]
    for n, job in zip(requests, submitted):
        visible = job.result()
        assert visible is not None, f"a job asking for {n} GPU(s) got no CUDA_VISIBLE_DEVICES"
        indices = [int(i) for i in visible.split(",")]
        assert len(set(indices)) == n
        assert set(indices) <= set(range(slurm_cluster.gpus_per_node))


def test_more_gpus_than_the_node_has_is_refused_at_submission(slurm_cluster, submitit_folder):
    too_many = slurm_cluster.gpus_per_node + 1
    executor = slurm_executor(submitit_folder, slurm_cluster.partition, gpus_per_node=too_many)
    queued_before = set(run_client("squeue", "-h", "-o", "%i").split())  # an earlier test's job may linger
    # submitit raises sbatch's own error message.
    with pytest.raises(FailedJobError, match="Requested node configuration is not available"):
        executor.submit(jobs.visible_gpus)
    assert set(run_client("squeue", "-h", "-o", "%i").split()) <= queued_before, "a refused job must not be queued"


def _started(starts_path, n):
    return lambda: len(jobs.read_starts(starts_path)) >= n


def test_interrupted_checkpointable_job_requeues_and_finishes(tmp_path, slurm_cluster, submitit_folder):
    starts_path = tmp_path / "starts.jsonl"
    executor = slurm_executor(submitit_folder, slurm_cluster.partition)
    job = executor.submit(jobs.CheckpointableCountStarts(), str(starts_path), WAIT_FOR_STOP_S)
    wait_until(f"job {job.job_id} starts", _started(starts_path, 1))
    job._interrupt()  # what preemption does: SIGTERM (ignored by submitit), then USR2 -> checkpoint, requeue
    assert job.result() == 2
    starts = jobs.read_starts(starts_path)
    # Same SLURM job, started again by a requeue (SLURM_RESTART_COUNT), not a new submission.
    assert [s["job_id"] for s in starts] == [job.job_id] * 2
    assert [s["restart_count"] for s in starts] == [0, 1]
    assert settled_sacct_state(job.job_id) == "COMPLETED"


def test_scontrol_requeue_runs_the_job_again(tmp_path, slurm_cluster, submitit_folder):
    starts_path = tmp_path / "starts.jsonl"
    executor = slurm_executor(submitit_folder, slurm_cluster.partition)
    job = executor.submit(jobs.count_starts, str(starts_path), WAIT_FOR_STOP_S)
    wait_until(f"job {job.job_id} starts", _started(starts_path, 1))
    # SIGTERM, which submitit ignores, then SIGKILL after KillWait; the job restarts from its submission.
    run_client("scontrol", "requeue", job.job_id)
    assert job.result() == 2
    starts = jobs.read_starts(starts_path)
    assert [s["job_id"] for s in starts] == [job.job_id] * 2
    assert [s["restart_count"] for s in starts] == [0, 1]
