"""Functions the SLURM tests submit. Pickled by value (cloudpickle), so the job needs no `tests` package."""

import json
import os
import sys
import time

import submitit

POLL_S = 0.2  # how often a waiting job wakes up; short so a signal's Python handler runs at once


def add(a, b):
    """Returns {"sum": a + b, "job_id": the SLURM job it ran in, "python": the interpreter that ran it}."""
    return {"sum": a + b, "job_id": os.environ["SLURM_JOB_ID"], "python": sys.executable}


def visible_gpus():
    """Returns the job's CUDA_VISIBLE_DEVICES (None when unset): SLURM sets it from the gres allocation."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def read_starts(path):
    """Returns the starts recorded in `path`: one dict (job_id, restart_count) per start, oldest first."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def _record_start(path):
    """Appends this start (job id, SLURM_RESTART_COUNT) to `path`; returns how many starts it now holds."""
    restart_count = int(os.environ.get("SLURM_RESTART_COUNT", 0))  # set by SLURM from the first requeue on
    start = {"job_id": os.environ["SLURM_JOB_ID"], "restart_count": restart_count}
    with open(path, "a") as f:
        f.write(json.dumps(start) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return len(read_starts(path))


def count_starts(path, wait_s):
    """Records a start in `path`; the first start then waits up to wait_s to be stopped from outside.

    Returns the number of starts recorded, so a job requeued once returns 2.
    """
    starts = _record_start(path)
    if starts == 1:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(POLL_S)
    return starts


class CheckpointableCountStarts(submitit.helpers.Checkpointable):
    """count_starts as a checkpointable job: on preemption (USR2) submitit pickles it and requeues it."""

    def __call__(self, path, wait_s):
        return count_starts(path, wait_s)
