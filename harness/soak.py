"""A seeded chaos soak of the sweep on the local SLURM test cluster: the faults a cluster really has, overlapping,
and at the end the invariants that say nothing was lost and nothing was done twice (docs/soak.md).

    python -m harness.soak --seed 1                          # the long version: 8 cells, 100 faults over 20 minutes
    python -m harness.soak --seed 1 --cells 4 --faults 6 --minutes 1 --steps 600   # a short one (tests/slurm)
    python -m harness.soak --seed 1 --plan                   # print the fault schedule and run nothing

The cluster is the one `bash tests/slurm/cluster.sh up DIR` starts (`--cluster-dir`, default $HARNESS_SLURM_DIR or
/tmp/harness-slurm); the soak reads its clients' environment from DIR/env.sh and restarts its daemons through
cluster.sh's fault verbs. It runs a sweep of tiny cells (a 1-block DiT on 8x8 digits, several checkpoints and
evaluations each) through the SLURM launcher, and a fault loop that fires the seeded schedule: cancelled,
requeued and preempted jobs, SIGKILLed training and evaluation processes, slurmctld restarts, slurmd stopped for a
while, the sweep relaunched while its jobs run or killed, torn files of a cell. The sweep is relaunched until one
launched after the last fault reports every cell done; then a last relaunch must do nothing. Meanwhile the same
cells are trained once without faults (locally, one thread, as the jobs), and the end state is checked against
them. The schedule (moments, kinds, the draws that pick targets) is a function of the seed alone; which job or
file a draw lands on depends on what the cluster is doing at that moment, which is not.

Writes to --out: schedule.json, report.json and report.md (seed, every fault with its moment, target and outcome,
every invariant's count with its definition), sweep/ (the soak's sweep folder), reference/ (the undisturbed
cells), logs/ (each sweep's output). Exit 0 when every invariant holds, 1 when one breaks or the soak could not
settle within its bounds, 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.core import cli, lease
from harness.core.runfolder import TEMP_SUFFIX, atomic_write_json, now_iso, read_json, read_jsonl, read_status

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
DEFAULT_CLUSTER_DIR = "/tmp/harness-slurm"  # cluster.sh's own default state folder

# The fault kinds and their weights in the schedule's draw (how often each comes, relative to the others).
KINDS: dict[str, float] = {
    "scancel": 1.0,        # scancel a running job: it ends without a result, the sweep records the cell failed
    "requeue": 1.0,        # scontrol requeue a running job: SIGTERM, SIGKILL KillWait later, a fresh start
    "preempt": 1.0,        # scancel --signal=USR2: the cell checkpoints and submitit requeues the job
    "sigkill": 2.0,        # SIGKILL the process that trains or evaluates a cell (found by the cell's lease)
    "restart_ctld": 0.7,   # stop slurmctld, start it again a few seconds later
    "stop_slurmd": 0.5,    # stop slurmd for a while (running jobs go on under slurmstepd), then start it
    "relaunch": 0.7,       # launch the sweep again while the running one and its jobs go on
    "kill_sweep": 0.5,     # SIGKILL the sweep process itself (its jobs go on); the soak relaunches it
    "tear_sidecar": 1.0,   # truncate a checkpoint's checksum sidecar in place
    "tear_status": 1.0,    # truncate a cell's status.json in place
    "tear_cell": 0.5,      # truncate a cell's cell.json in place
    "tear_sweep": 0.5,     # truncate the sweep folder's sweep.json in place
}
JOB_KINDS = ("scancel", "requeue", "preempt")
TEAR_FILES = {"tear_sidecar": "a checkpoint sidecar", "tear_status": "status.json", "tear_cell": "cell.json",
              "tear_sweep": "sweep.json"}
CTLD_DOWN_MAX_S = 8.0  # restart_ctld keeps slurmctld down for param x this many seconds
SLURMD_DOWN_S = (5.0, 45.0)  # stop_slurmd keeps slurmd down for this range (well under SlurmdTimeout, 300 s)
EVALUATING_FIRST = 0.5  # sigkill aims at an evaluating cell when there is one and its param is below this
MAX_EXTRA_SWEEPS = 2  # relaunches running beside the main sweep at most (each waits on its jobs)
WARMUP_FRACTION = 0.05  # no fault in the first part of the span: the jobs have not started yet

# The tiny cell (as tests/slurm/test_sweep_slurm.py's): a 1-block DiT on 8x8 digits, FID (digits extractor) from a
# few samples, on the CPU even though each job holds a (fake) GPU.
GLOBAL_BATCH = 16
TINY_CELL = [
    "model=demo-S", "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data.image_size=8", "patch=4",
    "train=demo", f"train.global_batch={GLOBAL_BATCH}", "train.keep_last=2",
    "eval=digits", "eval.num_samples=20", "eval.sampling_steps=5", "eval.batch_size=10", "eval.shard_size=10",
    "device=cpu", "report=false", "sweep_name=soak",
]
SLURM = ["hydra/launcher=slurm", "cluster=localtest"]
# One thread everywhere (the jobs inherit the sweep's environment through sbatch): the final weights are compared
# bit for bit with the undisturbed run's, and the thread count changes the order of float reductions.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

TICK_S = 0.5  # the fault loop's period: faults fire within this of their moment
CLIENT_TIMEOUT_S = 30  # a SLURM client that has not answered by then never will (slurmctld may be down)
MIN_RELAUNCH_S = 15.0  # between two launches of the main sweep: jobs still holding their cells need a moment
# After the last fault, this many launches in a row that end with failed cells mean the sweep cannot settle: a cell
# fails the same way every time (a bug the soak found), and relaunching it until --max-minutes proves nothing more.
STUCK_LAUNCHES = 3
DRAIN_S = 180.0  # after the sweep settles: how long its leftover jobs (a relaunch's duplicates) may take to end
SWEEP_EXIT_S = 30.0  # how long a sweep that was told to stop may take

SUMMARY = re.compile(r"^sweep \S+: (\d+) cells, (\d+) already done, (\d+) run now")
JOB_NAME = re.compile(r"^\d+(_\d+)?$")

# What each invariant counts (written into the report, and in docs/soak.md).
INVARIANTS = {
    "trained_twice": (
        "Steps whose training was committed twice. A step is committed when a checkpoint of it is written (the "
        "weights as of that step, behind a checksum sidecar) or when an attempt logs it in metrics.jsonl. Counted: "
        "(a) each (cell, step) of which two checkpoints with different model or EMA weights were seen (the soak "
        "reads every checkpoint that appears while it runs, and those left at the end); (b) each training line of "
        "metrics.jsonl whose step is not above the previous training line of the same attempt (attempts are "
        "delimited by the resume and restart events each start writes), which only two attempts writing one log "
        "at once produce. An attempt that resumes from its last checkpoint after a kill re-trains the steps after "
        "that checkpoint: those were never committed as weights, their log lines are superseded (readers take the "
        "last line per step), and a checkpoint it writes again of a step is the same weights, so none of that "
        "counts."),
    "eval_records_not_one": (
        "Evaluation records other than one per (cell, step, settings): each configured evaluation step of each "
        "cell with no record or with more than one record of the soak's settings (evals/step_N*.json whose "
        "settings_hash is the cell's), plus every record with other settings or at a step not configured, plus "
        "every record rewritten after it first appeared (the soak watches each record's inode, size and mtime), "
        "plus unreadable records."),
    "final_weights_differ": (
        "Cells whose final checkpoint's model or EMA state dict differs, tensor by tensor and bit for bit (same "
        "names, dtypes, shapes and bytes), from the same cell trained once without faults (locally, one thread, "
        "as the jobs are); a cell missing either checkpoint counts."),
    "temp_files_left": (
        "Temporary files of interrupted atomic writes (`.*.tmp`) left anywhere in the sweep folder (submitit's "
        "own folder `.submitit/` aside)."),
    "leases_held": "Run folders that still hold a lease.json once the sweep has settled and its jobs have ended.",
    "cells_not_finished": "Cells whose status.json does not say `finished` at the end (an unreadable one counts).",
    "done_by_last_relaunch": (
        "What one more relaunch of the settled sweep did: the cells it trained (an attempt counted, a training "
        "line, a checkpoint written), the cells it evaluated (a record, a validation line, a samples folder "
        "written), and the jobs it submitted; one more if it did not report every cell done. All must be 0."),
}


class SoakError(RuntimeError):
    """The soak cannot go on (the cluster is gone, the sweep refuses its own grid): said in one line, exit 1."""


#################################################################################
#                               The fault schedule                              #
#################################################################################


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: what happens when. Every field is drawn from the seed before the soak starts."""

    index: int
    at_s: float  # seconds after the soak's start
    kind: str
    pick: float  # in [0, 1): which of the candidates present at that moment (jobs, cells, files) is hit
    param: float  # in [0, 1): the kind's own draw (how long a daemon stays down, where a file is cut)


def make_schedule(seed: int, faults: int, minutes: float, kinds: dict[str, float] | None = None) -> list[Fault]:
    """Returns `faults` faults at uniformly drawn moments over `minutes` (the first WARMUP_FRACTION of it left
    quiet), sorted by moment, each with a kind drawn by weight and its two draws. A function of its arguments
    alone: the same seed gives the same schedule on any machine."""
    kinds = KINDS if kinds is None else kinds
    rng = random.Random(seed)
    span_s = minutes * 60.0
    start_s = span_s * WARMUP_FRACTION
    names = sorted(kinds)
    weights = [kinds[k] for k in names]
    moments = sorted(start_s + rng.random() * (span_s - start_s) for _ in range(faults))
    return [Fault(i, round(at, 3), rng.choices(names, weights)[0], rng.random(), rng.random())
            for i, at in enumerate(moments)]


def format_schedule(schedule: list[Fault]) -> str:
    """Returns the schedule as a table: moment (s), kind and the two draws of each fault."""
    lines = [f"{'#':>4} {'at (s)':>9}  {'kind':<13} {'pick':>6} {'param':>6}"]
    lines += [f"{f.index:>4} {f.at_s:>9.1f}  {f.kind:<13} {f.pick:>6.3f} {f.param:>6.3f}" for f in schedule]
    counts = Counter(f.kind for f in schedule)
    lines.append(f"{len(schedule)} faults: " + ", ".join(f"{k} {counts[k]}" for k in sorted(counts)))
    return "\n".join(lines)


def choose(candidates: list, pick: float):
    """Returns the candidate a draw in [0, 1) lands on (candidates in a fixed order), None when there are none."""
    return candidates[min(int(pick * len(candidates)), len(candidates) - 1)] if candidates else None


#################################################################################
#                                 The grid                                      #
#################################################################################


def eval_steps_for(steps: int, ckpt_every: int) -> list[int]:
    """Returns the soak's evaluation steps: a third and two thirds of the way (rounded down to a checkpoint step,
    at least the first one) and the last step."""
    at = {max(ckpt_every, (steps * k // 3) // ckpt_every * ckpt_every) for k in (1, 2)} | {steps}
    return sorted(s for s in at if s <= steps)


def cell_overrides(cells: int, steps: int, ckpt_every: int) -> list[str]:
    """Returns the Hydra overrides of the soak's grid: `cells` tiny cells (seeds 0..cells-1), `steps` steps each, a
    checkpoint every `ckpt_every` steps, the evaluation steps of eval_steps_for."""
    log_every = max(1, min(ckpt_every, 25))
    evals = ",".join(str(s) for s in eval_steps_for(steps, ckpt_every))
    return [*TINY_CELL, f"train.steps={steps}", f"train.ckpt_every={ckpt_every}", f"train.log_every={log_every}",
            f"train.val_every={max(ckpt_every, steps // 4)}", f"eval.at_steps=[{evals}]",
            "seed=" + ",".join(str(s) for s in range(cells))]


#################################################################################
#                                 The cluster                                   #
#################################################################################


def read_env_file(path: Path) -> dict[str, str]:
    """Returns the variables the `export KEY=VALUE` lines of a shell file set."""
    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


@dataclass
class Cluster:
    """The test cluster: its state folder, its clients' environment, the script that starts and stops its daemons."""

    dir: Path
    env: dict[str, str]
    script: Path

    def client(self, *args: str, timeout_s: float = CLIENT_TIMEOUT_S) -> str:
        """Runs a SLURM client; returns its stdout. Raises CalledProcessError or TimeoutExpired (slurmctld down)."""
        return subprocess.run(args, check=True, capture_output=True, text=True, timeout=timeout_s,
                              env=self.env).stdout

    def script_run(self, verb: str, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Runs `cluster.sh VERB DIR ARGS`; returns the finished process (text output)."""
        return subprocess.run(["bash", str(self.script), verb, str(self.dir), *args], capture_output=True, text=True,
                              timeout=timeout_s, env=self.env)

    def up(self) -> bool:
        return self.script_run("status", timeout_s=CLIENT_TIMEOUT_S).returncode == 0

    def jobs(self, bases: set[str], state: str | None = None) -> list[str]:
        """Returns the ids (N or N_i) of the queue's jobs of the given array/job ids, in job order; `state`
        (RUNNING, PENDING) narrows them. Raises when squeue does not answer."""
        args = ["squeue", "-h", "-o", "%i"] + (["-t", state] if state else [])
        ids = [j for j in self.client(*args).split() if j.split("_")[0] in bases]
        return sorted(ids, key=_job_key)


def _job_key(job_id: str) -> tuple:
    base, _, task = job_id.partition("_")
    return (int(base), int(task) if task.isdigit() else -1, task)


def submitted_jobs(sweep_dir: Path) -> set[str]:
    """Returns the job and array ids the sweep's submitit folder holds (each submission leaves a folder)."""
    folder = sweep_dir / ".submitit"
    if not folder.is_dir():
        return set()
    return {p.name.split("_")[0] for p in folder.iterdir() if JOB_NAME.match(p.name)}


#################################################################################
#                                 Sweep processes                               #
#################################################################################


@dataclass
class SweepRun:
    """One launch of the sweep: its process, its log, how it ended."""

    role: str  # "main" (relaunched until done), "extra" (a relaunch beside it), "final" (the last relaunch)
    index: int
    proc: subprocess.Popen
    log: Path
    started_s: float  # seconds after the soak's start
    ended_s: float | None = None
    rc: int | None = None
    summary: str | None = None  # the sweep's last line ("sweep DIR: N cells, D already done, R run now ...")
    error: str | None = None  # its first `error:` line
    killed: bool = False
    counted: bool = False  # the soak has judged how it ended (_loop)

    def poll(self, now_s: float) -> bool:
        """True once the process has exited (its outcome then read from its log)."""
        if self.rc is not None:
            return True
        rc = self.proc.poll()
        if rc is None:
            return False
        self.rc, self.ended_s = rc, now_s
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = text.splitlines()
        self.summary = next((ln for ln in reversed(lines) if SUMMARY.match(ln)), None)
        self.error = next((ln for ln in lines if ln.startswith("error:")), None)
        return True

    def all_done(self) -> bool:
        """True when the sweep reported every cell done: exit 0, its summary line, no cell left to other holders."""
        return self.rc == 0 and self.summary is not None and "held by other processes" not in self.summary

    def record(self) -> dict:
        ended = None if self.ended_s is None else round(self.ended_s, 1)
        return {"role": self.role, "index": self.index, "pid": self.proc.pid, "log": str(self.log),
                "started_s": round(self.started_s, 1), "ended_s": ended, "rc": self.rc, "killed": self.killed,
                "summary": self.summary, "error": self.error}


class Sweeps:
    """Launches the sweep (thread-safe: faults launch and kill it too) and keeps every launch."""

    def __init__(self, cmd: list[str], env: dict, cwd: Path, logs: Path, clock):
        self.cmd, self.env, self.cwd, self.logs, self.clock = cmd, env, cwd, logs, clock
        self.runs: list[SweepRun] = []
        self.lock = threading.Lock()

    def launch(self, role: str) -> SweepRun:
        with self.lock:
            index = len(self.runs)
            log = self.logs / f"sweep_{index:03d}_{role}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            run = SweepRun(role, index, proc, log, self.clock())
            self.runs.append(run)
            return run

    def running(self, role: str | None = None) -> list[SweepRun]:
        with self.lock:
            return [r for r in self.runs if r.rc is None and r.proc.poll() is None and role in (None, r.role)]

    def poll(self) -> list[SweepRun]:
        """Returns the launches that ended since the last call."""
        ended = []
        with self.lock:
            for r in self.runs:
                if r.rc is None and r.poll(self.clock()):
                    ended.append(r)
        return ended

    def kill(self, run: SweepRun) -> None:
        with contextlib.suppress(ProcessLookupError):
            run.proc.kill()
        run.killed = True

    def stop_all(self) -> None:
        """Kills every launch still running (its jobs go on) and waits for it."""
        for r in self.running():
            self.kill(r)
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(SWEEP_EXIT_S)
        self.poll()


#################################################################################
#                            Watching the run folders                           #
#################################################################################


def cell_dirs(sweep_dir: Path) -> list[Path]:
    """Run folders of a sweep folder (those holding a config.yaml: a torn cell.json still names its cell), sorted."""
    if not sweep_dir.is_dir():
        return []
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "config.yaml").exists())


def weights_digest(state: dict) -> str:
    """Returns a sha256 (hex) of a checkpoint's model and EMA state dicts: names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for part in ("model", "ema"):
        for name in sorted(state[part]):
            t = state[part][name].detach().cpu().contiguous()
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(_uint8()).numpy().tobytes())
    return h.hexdigest()


def _uint8():
    import torch  # here: the schedule and --help need no torch

    return torch.uint8


class Watcher:
    """Reads the sweep folder as the soak runs: every checkpoint that appears (its weights' digest, so a step
    committed twice with other weights is seen even after pruning), every evaluation record (rewritten?), and
    who holds each cell (for the report)."""

    def __init__(self, sweep_dir: Path, clock):
        self.sweep_dir, self.clock = sweep_dir, clock
        self.sidecars: dict[tuple[str, int], set[str]] = {}  # (cell, step) -> sidecar sha256 seen
        self.digests: dict[tuple[str, int], dict[str, float]] = {}  # (cell, step) -> {weights digest: first seen s}
        self.records: dict[tuple[str, str], tuple] = {}  # (cell, record file) -> (inode, size, mtime_ns)
        self.rewritten: list[dict] = []
        self.holders: dict[str, list[dict]] = {}  # cell -> [{token, pid, purpose, job, seen_s}]

    def poll(self) -> None:
        for run_dir in cell_dirs(self.sweep_dir):
            with contextlib.suppress(OSError):
                self._checkpoints(run_dir)
                self._records(run_dir)
                self._holder(run_dir)

    def _checkpoints(self, run_dir: Path) -> None:
        from harness.core import checkpoint  # here: torch

        for sidecar in sorted((run_dir / "checkpoints").glob("step_*.json")):
            try:
                meta = read_json(sidecar)
                step = int(meta["step"])
                sha = str(meta["sha256"])
            except (ValueError, TypeError, KeyError, OSError):
                continue  # torn (by the soak) or being replaced: read again at the next tick
            key = (run_dir.name, step)
            if sha in self.sidecars.get(key, set()):
                continue
            path = sidecar.with_suffix(".pt")
            try:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != sha:
                    continue  # the file and its sidecar are of two writes: a replacement under way
                import io

                state = checkpoint.load(io.BytesIO(data))
            except (OSError, RuntimeError, ValueError, EOFError):
                continue
            self.sidecars.setdefault(key, set()).add(sha)
            self.digests.setdefault(key, {}).setdefault(weights_digest(state), round(self.clock(), 1))

    def _records(self, run_dir: Path) -> None:
        for path in sorted((run_dir / "evals").glob("step_*.json")):
            st = path.stat()
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
            key = (run_dir.name, path.name)
            if key in self.records and self.records[key] != sig:
                self.rewritten.append({"cell": run_dir.name, "record": path.name, "seen_s": round(self.clock(), 1)})
            self.records[key] = sig

    def _holder(self, run_dir: Path) -> None:
        rec = lease.read_lease(run_dir)
        if rec is None or rec.get("unreadable"):
            return
        seen = self.holders.setdefault(run_dir.name, [])
        if seen and seen[-1]["token"] == rec.get("token"):
            return
        slurm = rec.get("slurm") or {}
        job = (f"{slurm.get('array_job_id')}_{slurm.get('array_task_id')}" if slurm.get("array_job_id")
               else slurm.get("job_id"))
        seen.append({"token": rec.get("token"), "pid": rec.get("pid"), "purpose": rec.get("purpose"), "job": job,
                     "restart": slurm.get("restart_count"), "seen_s": round(self.clock(), 1)})


#################################################################################
#                                 The faults                                    #
#################################################################################


def _process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Chaos:
    """Applies scheduled faults to the cluster, the sweep and its folder; every fault leaves one record."""

    def __init__(self, cluster: Cluster, sweep_dir: Path, sweeps: Sweeps, clock):
        self.cluster, self.sweep_dir, self.sweeps, self.clock = cluster, sweep_dir, sweeps, clock
        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.ctld_restarting = False
        self.slurmd_back_at: float | None = None  # when the soak starts slurmd again (None: it runs)
        self.slurmd_starting = False
        self.restores: list[dict] = []  # the daemons the soak started again, when, and what cluster.sh said
        self.host = socket.gethostname()

    def apply(self, fault: Fault) -> dict:
        """Applies one fault; returns (and keeps) its record: kind, moment, target, outcome
        (applied, no target, skipped, failed) and what happened."""
        rec = {**asdict(fault), "applied_s": round(self.clock(), 2), "target": None}
        try:
            outcome, target, detail = getattr(self, f"_{fault.kind}")(fault)
        except subprocess.CalledProcessError as e:
            outcome, target, detail = "failed", rec["target"], cli.one_line(e.stderr or e, limit=300)
        except (subprocess.TimeoutExpired, OSError) as e:
            outcome, target, detail = "failed", rec["target"], cli.one_line(e, limit=300)
        rec.update(outcome=outcome, target=target, detail=detail, done_s=round(self.clock(), 2))
        with self.lock:
            self.records.append(rec)
        return rec

    # ---- jobs ----

    def _running_job(self, fault: Fault) -> str | None:
        return choose(self.cluster.jobs(submitted_jobs(self.sweep_dir), "RUNNING"), fault.pick)

    def _scancel(self, fault: Fault):
        job = self._running_job(fault)
        if job is None:
            return "no target", None, "no running job"
        self.cluster.client("scancel", job)
        return "applied", job, "cancelled"

    def _requeue(self, fault: Fault):
        job = self._running_job(fault)
        if job is None:
            return "no target", None, "no running job"
        self.cluster.client("scontrol", "requeue", job)
        return "applied", job, "requeued"

    def _preempt(self, fault: Fault):
        job = self._running_job(fault)
        if job is None:
            return "no target", None, "no running job"
        self.cluster.client("scancel", "--signal=USR2", job)
        return "applied", job, "USR2 sent"

    def _sigkill(self, fault: Fault):
        """SIGKILLs the process holding a cell's lease: the job's task that trains or evaluates it."""
        working = []
        for run_dir in cell_dirs(self.sweep_dir):
            rec = lease.read_lease(run_dir)
            if rec is None or rec.get("stale") or rec.get("host") != self.host or not isinstance(rec.get("pid"), int):
                continue
            if "submitit" not in _process_cmdline(rec["pid"]):
                continue  # not a job's process (the soak only kills what runs inside a job)
            stage = read_status(run_dir).get("state")
            if stage in ("running", "evaluating"):
                working.append((run_dir.name, rec["pid"], stage))
        evaluating = [w for w in working if w[2] == "evaluating"]
        pool = evaluating if evaluating and fault.param < EVALUATING_FIRST else working
        hit = choose(pool, fault.pick)
        if hit is None:
            return "no target", None, "no job process training or evaluating a cell"
        cell, pid, stage = hit
        os.kill(pid, signal.SIGKILL)
        return "applied", cell, f"pid {pid} ({'training' if stage == 'running' else 'evaluating'})"

    # ---- daemons ----

    def _restart_ctld(self, fault: Fault):
        with self.lock:
            if self.ctld_restarting:
                return "skipped", "slurmctld", "a restart is under way"
            self.ctld_restarting = True
        down_s = round(fault.param * CTLD_DOWN_MAX_S, 1)
        try:
            r = self.cluster.script_run("restart-ctld", str(down_s))
        finally:
            with self.lock:
                self.ctld_restarting = False
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, "cluster.sh restart-ctld", r.stdout, r.stderr)
        return "applied", "slurmctld", f"down {down_s} s"

    def _stop_slurmd(self, fault: Fault):
        lo, hi = SLURMD_DOWN_S
        down_s = round(lo + fault.param * (hi - lo), 1)
        with self.lock:
            if self.slurmd_back_at is not None:
                return "skipped", "slurmd", "already stopped"
            self.slurmd_back_at = self.clock() + down_s
        r = self.cluster.script_run("stop-slurmd")
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, "cluster.sh stop-slurmd", r.stdout, r.stderr)
        return "applied", "slurmd", f"down {down_s} s"

    def claim_slurmd_start(self) -> bool:
        """True once when slurmd is down and its time down is over: the caller then runs start_slurmd."""
        with self.lock:
            due = self.slurmd_back_at is not None and not self.slurmd_starting and self.clock() >= self.slurmd_back_at
            self.slurmd_starting = self.slurmd_starting or due
            return due

    def start_slurmd(self) -> None:
        """Starts slurmd again (the end of a stop_slurmd fault) and records it."""
        at = self.clock()
        r = self.cluster.script_run("start-slurmd")
        with self.lock:
            self.slurmd_back_at, self.slurmd_starting = None, False
            self.restores.append({"daemon": "slurmd", "at_s": round(at, 1), "rc": r.returncode,
                                  "said": cli.one_line((r.stdout + r.stderr).strip() or "-", limit=200)})

    def daemons_settled(self) -> bool:
        """True when no daemon is down or being restarted by a fault."""
        with self.lock:
            return self.slurmd_back_at is None and not self.ctld_restarting

    # ---- the sweep ----

    def _relaunch(self, fault: Fault):
        if len(self.sweeps.running("extra")) >= MAX_EXTRA_SWEEPS:
            return "skipped", None, f"{MAX_EXTRA_SWEEPS} relaunches already running"
        run = self.sweeps.launch("extra")
        return "applied", f"sweep #{run.index}", f"pid {run.proc.pid}"

    def _kill_sweep(self, fault: Fault):
        running = self.sweeps.running()
        run = choose([r for r in running if r.role == "main"] or running, fault.pick)
        if run is None:
            return "no target", None, "no sweep running"
        self.sweeps.kill(run)
        return "applied", f"sweep #{run.index}", f"pid {run.proc.pid} ({run.role})"

    # ---- files ----

    def _tear(self, path: Path | None, param: float, what: str):
        """Truncates `path` in place to a drawn length that leaves its JSON unreadable (the closing brace gone)."""
        if path is None:
            return "no target", None, f"no {what}"
        try:
            size = path.stat().st_size
            cut = int(param * max(size - 1, 0))
            os.truncate(path, cut)
        except FileNotFoundError:
            return "no target", str(path.relative_to(self.sweep_dir)), "gone before it could be torn"
        return "applied", str(path.relative_to(self.sweep_dir)), f"{size} -> {cut} bytes"

    def _tear_sidecar(self, fault: Fault):
        sidecars = sorted(p for d in cell_dirs(self.sweep_dir) for p in (d / "checkpoints").glob("step_*.json"))
        return self._tear(choose(sidecars, fault.pick), fault.param, TEAR_FILES[fault.kind])

    def _tear_status(self, fault: Fault):
        files = [d / "status.json" for d in cell_dirs(self.sweep_dir) if (d / "status.json").exists()]
        return self._tear(choose(files, fault.pick), fault.param, TEAR_FILES[fault.kind])

    def _tear_cell(self, fault: Fault):
        files = [d / "cell.json" for d in cell_dirs(self.sweep_dir) if (d / "cell.json").exists()]
        return self._tear(choose(files, fault.pick), fault.param, TEAR_FILES[fault.kind])

    def _tear_sweep(self, fault: Fault):
        path = self.sweep_dir / "sweep.json"
        return self._tear(path if path.exists() else None, fault.param, TEAR_FILES[fault.kind])


#################################################################################
#                                 The invariants                                #
#################################################################################


def training_lines_out_of_order(metrics: Path) -> list[dict]:
    """Returns the training lines of a metrics.jsonl whose step is not above the previous training line of the same
    attempt (an attempt runs from one resume or restart event to the next): the trace of two concurrent writers."""
    bad, last = [], None
    for i, rec in enumerate(read_jsonl(metrics)):
        if rec.get("event") in ("resume", "restart"):
            last = None
        elif "loss" in rec and isinstance(rec.get("step"), int):
            if last is not None and rec["step"] <= last:
                bad.append({"line": i + 1, "step": rec["step"], "after": last})
            last = rec["step"]
    return bad


def final_checkpoint_digests(run_dir: Path) -> dict[int, str]:
    """Returns {step: weights digest} of the checkpoints a run folder holds now (whatever their sidecars say)."""
    from harness.core import checkpoint

    out = {}
    for step in checkpoint.list_steps(run_dir / "checkpoints"):
        with contextlib.suppress(Exception):
            out[step] = weights_digest(checkpoint.load(checkpoint.ckpt_path(run_dir / "checkpoints", step)))
    return out


def trained_twice(sweep_dir: Path, watcher: Watcher) -> dict:
    """The trained_twice invariant (INVARIANTS): its count and what was found."""
    digests = {k: dict(v) for k, v in watcher.digests.items()}
    for run_dir in cell_dirs(sweep_dir):
        for step, digest in final_checkpoint_digests(run_dir).items():
            digests.setdefault((run_dir.name, step), {}).setdefault(digest, None)
    twice = [{"cell": c, "step": s, "digests": sorted(d)} for (c, s), d in sorted(digests.items()) if len(d) > 1]
    interleaved = []
    for run_dir in cell_dirs(sweep_dir):
        interleaved += [{"cell": run_dir.name, **b} for b in training_lines_out_of_order(run_dir / "metrics.jsonl")]
    return {"count": len(twice) + len(interleaved), "checkpoint_steps_with_two_weights": twice,
            "training_lines_out_of_order": interleaved, "checkpoint_steps_seen": len(digests)}


def eval_records(sweep_dir: Path, watcher: Watcher, at_steps: list[int]) -> dict:
    """The eval_records_not_one invariant (INVARIANTS): its count and what was found."""
    from harness.cell import load_run_config
    from harness.evaluate import eval_hash

    wrong, other, unreadable = [], [], []
    for run_dir in cell_dirs(sweep_dir):
        want = eval_hash(load_run_config(run_dir, []))
        per_step = Counter()
        for path in sorted((run_dir / "evals").glob("step_*.json")):
            try:
                rec = read_json(path)
            except ValueError as e:
                unreadable.append({"cell": run_dir.name, "record": path.name, "error": str(e)})
                continue
            if not isinstance(rec, dict):
                unreadable.append({"cell": run_dir.name, "record": path.name, "error": "not a record"})
                continue
            if rec.get("settings_hash") == want and rec.get("step") in at_steps:
                per_step[rec["step"]] += 1
            else:
                other.append({"cell": run_dir.name, "record": path.name, "step": rec.get("step"),
                              "settings_hash": rec.get("settings_hash")})
        wrong += [{"cell": run_dir.name, "step": s, "records": per_step[s]} for s in at_steps if per_step[s] != 1]
    count = len(wrong) + len(other) + len(unreadable) + len(watcher.rewritten)
    return {"count": count, "steps_without_exactly_one": wrong, "other_records": other, "unreadable": unreadable,
            "rewritten": watcher.rewritten}


def final_weights(sweep_dir: Path, reference_dir: Path, steps: int) -> dict:
    """The final_weights_differ invariant (INVARIANTS): its count and, per differing cell, why."""
    from harness.core import checkpoint

    differ, compared = [], 0
    for run_dir in cell_dirs(sweep_dir):
        mine = checkpoint.ckpt_path(run_dir / "checkpoints", steps)
        ref = checkpoint.ckpt_path(reference_dir / run_dir.name / "checkpoints", steps)
        if not mine.exists() or not ref.exists():
            where = "in the soak" if not mine.exists() else "in the reference"
            differ.append({"cell": run_dir.name, "why": f"no final checkpoint {where}"})
            continue
        a, b = checkpoint.load(mine), checkpoint.load(ref)
        tensors = [f"{part}.{name}" for part in ("model", "ema") for name in sorted(set(a[part]) | set(b[part]))
                   if not _same_tensor(a[part].get(name), b[part].get(name))]
        compared += 1
        if tensors:
            differ.append({"cell": run_dir.name, "why": "tensors differ", "tensors": tensors})
    return {"count": len(differ), "cells_compared": compared, "differ": differ}


def _same_tensor(a, b) -> bool:
    """True when two tensors have the same dtype, shape and bytes (bit for bit: NaN equals NaN, -0 differs from 0)."""
    if a is None or b is None or a.dtype != b.dtype or a.shape != b.shape:
        return False
    u8 = _uint8()
    return bool((a.contiguous().reshape(-1).view(u8) == b.contiguous().reshape(-1).view(u8)).all())


def temp_files(sweep_dir: Path) -> dict:
    """The temp_files_left invariant (INVARIANTS)."""
    left = sorted(str(p.relative_to(sweep_dir)) for p in sweep_dir.rglob(f".*{TEMP_SUFFIX}")
                  if ".submitit" not in p.relative_to(sweep_dir).parts)
    return {"count": len(left), "files": left}


def leases(sweep_dir: Path) -> dict:
    """The leases_held invariant (INVARIANTS)."""
    held = []
    for run_dir in cell_dirs(sweep_dir):
        rec = lease.read_lease(run_dir)
        if rec is not None:
            held.append({"cell": run_dir.name, "holder": lease.describe_lease(rec), "stale": rec.get("stale")})
    return {"count": len(held), "held": held}


def unfinished(sweep_dir: Path, cells: int) -> dict:
    """The cells_not_finished invariant (INVARIANTS): a cell with no run folder counts too."""
    states = {d.name: read_status(d) for d in cell_dirs(sweep_dir)}
    bad = [{"cell": c, "state": s.get("state"), "reason": s.get("reason")} for c, s in sorted(states.items())
           if s.get("state") != "finished" or s.get("rebuilt")]
    missing = max(0, cells - len(states))
    return {"count": len(bad) + missing, "not_finished": bad, "missing_run_folders": missing,
            "attempts": {c: s.get("attempts") for c, s in sorted(states.items())}}


def snapshot(sweep_dir: Path) -> dict:
    """Returns what a relaunch could change in each run folder, and the jobs submitted so far."""
    def files(folder: Path, pattern: str) -> list[tuple]:
        return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob(pattern))

    cells = {}
    for d in cell_dirs(sweep_dir):
        log = read_jsonl(d / "metrics.jsonl")
        cells[d.name] = {
            "attempts": read_status(d).get("attempts"),
            "train_lines": sum(1 for r in log if "loss" in r or r.get("event")),
            "val_lines": sum(1 for r in log if "validation" in r),
            "checkpoints": files(d / "checkpoints", "step_*.pt"),
            "records": files(d / "evals", "*.json"),
            "samples": sorted(p.name for p in (d / "samples").glob("*")) if (d / "samples").is_dir() else [],
        }
    return {"cells": cells, "jobs": sorted(submitted_jobs(sweep_dir))}


def relaunch_diff(before: dict, after: dict, run: SweepRun | None) -> dict:
    """The done_by_last_relaunch invariant (INVARIANTS) from two snapshots around the last relaunch."""
    trained, evaluated = [], []
    for cell, a in after["cells"].items():
        b = before["cells"].get(cell)
        if b is None or any(a[k] != b[k] for k in ("attempts", "train_lines", "checkpoints")):
            trained.append(cell)
        if b is None or any(a[k] != b[k] for k in ("records", "val_lines", "samples")):
            evaluated.append(cell)
    jobs = sorted(set(after["jobs"]) - set(before["jobs"]))
    return {"count": len(trained) + len(evaluated) + len(jobs), "cells_trained": trained, "cells_evaluated": evaluated,
            "jobs_submitted": jobs, "sweep": run.record() if run else None,
            "reported_all_done": bool(run and run.all_done())}


#################################################################################
#                                 The soak                                      #
#################################################################################


@dataclass
class Options:
    seed: int
    cells: int
    faults: int
    minutes: float
    steps: int
    ckpt_every: int
    out: Path
    cluster_dir: Path
    cluster_sh: Path
    max_relaunches: int
    max_minutes: float
    kinds: dict[str, float] = field(default_factory=lambda: dict(KINDS))


class Soak:
    """One soak: the sweep, the fault loop, the undisturbed reference, the invariants, the report."""

    def __init__(self, opts: Options, cluster: Cluster):
        self.o, self.cluster = opts, cluster
        self.sweep_dir, self.reference_dir = opts.out / "sweep", opts.out / "reference"
        self.logs = opts.out / "logs"
        self.t0 = time.monotonic()
        self.schedule = make_schedule(opts.seed, opts.faults, opts.minutes, opts.kinds)
        self.overrides = cell_overrides(opts.cells, opts.steps, opts.ckpt_every)
        self.env = soak_env(cluster.env)
        sweep_cmd = [sys.executable, "-m", "harness.sweep", "-m", *self.overrides, *SLURM, f"out_dir={self.sweep_dir}"]
        self.sweeps = Sweeps(sweep_cmd, self.env, opts.out, self.logs, self.clock)
        self.watcher = Watcher(self.sweep_dir, self.clock)
        self.chaos = Chaos(cluster, self.sweep_dir, self.sweeps, self.clock)
        self.notes: list[str] = []

    def clock(self) -> float:
        """Seconds since the soak started."""
        return time.monotonic() - self.t0

    def run(self) -> dict:
        o = self.o
        for d in (self.sweep_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(o.out / "schedule.json", {"seed": o.seed, "faults": [asdict(f) for f in self.schedule]})
        reference = self._start_reference()
        settled = last = None
        try:
            settled = self._loop()
            if settled is not None:
                self._drain()
                self.watcher.poll()
                before = snapshot(self.sweep_dir)
                last = self._final_relaunch()
                after = snapshot(self.sweep_dir)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(reference.pid, signal.SIGKILL)
            raise
        finally:
            self._restore()
        ref_rc = self._wait_reference(reference)
        end_s = self.clock()
        invariants = {
            "trained_twice": trained_twice(self.sweep_dir, self.watcher),
            "eval_records_not_one": eval_records(self.sweep_dir, self.watcher, eval_steps_for(o.steps, o.ckpt_every)),
            "final_weights_differ": final_weights(self.sweep_dir, self.reference_dir, o.steps),
            "temp_files_left": temp_files(self.sweep_dir),
            "leases_held": leases(self.sweep_dir),
            "cells_not_finished": unfinished(self.sweep_dir, o.cells),
            "done_by_last_relaunch": (relaunch_diff(before, after, last) if last is not None else
                                      {"count": None, "why": "the sweep never settled: no last relaunch"}),
        }
        if last is not None and not last.all_done():
            invariants["done_by_last_relaunch"]["count"] += 1  # it must report every cell done as well
        return self._report(invariants, settled, ref_rc, end_s)

    # ---- phases ----

    def _start_reference(self) -> subprocess.Popen:
        """Starts the undisturbed run of the same cells: the local launcher, training only, at a low priority."""
        cmd = [sys.executable, "-m", "harness.sweep", "-m", *self.overrides, "stage=train",
               f"out_dir={self.reference_dir}"]
        log = open(self.logs / "reference.log", "w")  # noqa: SIM115 - closed with the process (_wait_reference)
        proc = subprocess.Popen(cmd, cwd=self.o.out, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10), start_new_session=True)
        proc.log_file = log
        return proc

    def _wait_reference(self, proc: subprocess.Popen) -> int | None:
        deadline = self.o.max_minutes * 60.0 - self.clock()
        try:
            rc = proc.wait(max(deadline, 60.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
            self.notes.append("the undisturbed reference run did not end in time: killed")
        proc.log_file.close()
        if rc:
            self.notes.append(f"the undisturbed reference run exited {rc}: see logs/reference.log")
        return rc

    def _loop(self) -> SweepRun | None:
        """Fires the schedule while relaunching the sweep until a launch that started after the last fault reports
        every cell done; returns that launch (None when the bounds ran out first)."""
        o = self.o
        pending = list(self.schedule)
        futures: list[Future] = []
        pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="fault")
        main = self.sweeps.launch("main")
        launches, last_launch = 1, self.clock()
        chaos_over_s = None
        failed_in_a_row = 0  # launches after the chaos that ended with failed cells
        try:
            while True:
                now = self.clock()
                while pending and pending[0].at_s <= now:
                    futures.append(pool.submit(self.chaos.apply, pending.pop(0)))
                if self.chaos.claim_slurmd_start():
                    futures.append(pool.submit(self.chaos.start_slurmd))
                self.watcher.poll()
                self.sweeps.poll()
                if chaos_over_s is None and not pending and all(f.done() for f in futures) \
                        and self.chaos.daemons_settled():
                    chaos_over_s = self.clock()
                if main.rc is not None:
                    if main.rc == cli.BAD_INPUT_EXIT and main.index == 0:
                        raise SoakError(f"the sweep refused its grid: {main.error or main.log}")
                    if main.all_done() and chaos_over_s is not None and main.started_s >= chaos_over_s:
                        return main
                    if chaos_over_s is not None and main.started_s >= chaos_over_s and not main.counted:
                        main.counted = True
                        failed_in_a_row = failed_in_a_row + 1 if main.rc == cli.FAILED_EXIT else 0
                        if failed_in_a_row >= STUCK_LAUNCHES:
                            self.notes.append(f"{STUCK_LAUNCHES} launches after the last fault ended with failed "
                                              f"cells ({main.error}): the sweep does not settle; see {main.log}")
                            return None
                    if launches > o.max_relaunches:
                        self.notes.append(f"gave up after {launches} launches of the sweep (--max-relaunches)")
                        return None
                    if now - last_launch >= MIN_RELAUNCH_S and (chaos_over_s is not None or not main.all_done()):
                        main = self.sweeps.launch("main")
                        launches, last_launch = launches + 1, self.clock()
                if now > o.max_minutes * 60.0:
                    self.notes.append(f"stopped at {now:.0f} s: over --max-minutes {o.max_minutes:g}")
                    return None
                time.sleep(TICK_S)
        finally:
            pool.shutdown(wait=True)

    def _drain(self) -> None:
        """Waits for the relaunches beside the main sweep and the jobs still queued (duplicates that find their cell
        done) to end, up to DRAIN_S."""
        deadline = self.clock() + DRAIN_S
        bases = lambda: submitted_jobs(self.sweep_dir)  # noqa: E731
        while self.clock() < deadline:
            self.sweeps.poll()
            try:
                queued = self.cluster.jobs(bases())
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                queued = ["?"]
            if not queued and not self.sweeps.running():
                return
            self.watcher.poll()
            time.sleep(1.0)
        self.notes.append(f"after {DRAIN_S:.0f} s, jobs or relaunches were still running: {self.sweeps.running()}")

    def _final_relaunch(self) -> SweepRun:
        """Relaunches the settled sweep once more and waits for it (it must do nothing)."""
        run = self.sweeps.launch("final")
        try:
            run.proc.wait(max(60.0, self.o.max_minutes * 60.0 - self.clock()))
        except subprocess.TimeoutExpired:
            self.sweeps.kill(run)
            run.proc.wait()
        self.sweeps.poll()
        self._drain()
        return run

    def _restore(self) -> None:
        """Leaves the cluster as it found it: slurmd and slurmctld running, no sweep of the soak's left."""
        self.sweeps.stop_all()
        if self.chaos.slurmd_back_at is not None:
            self.chaos.start_slurmd()
        if not self.cluster.up():
            self.notes.append("a daemon was down at the end; cluster.sh restart-ctld/start-slurmd run")
            self.cluster.script_run("start-slurmd")
            self.cluster.script_run("restart-ctld", "0")
        try:
            left = self.cluster.jobs(submitted_jobs(self.sweep_dir))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            left = []
        if left:
            self.notes.append(f"cancelled the soak's jobs still queued at the end: {left}")
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.cluster.client("scancel", *left)

    # ---- the report ----

    def _report(self, invariants: dict, settled: SweepRun | None, ref_rc: int | None, end_s: float) -> dict:
        o = self.o
        faults = sorted(self.chaos.records, key=lambda r: r["index"])
        by_kind: dict[str, Counter] = {}
        for r in faults:
            by_kind.setdefault(r["kind"], Counter())[r["outcome"]] += 1
        counts = {k: v["count"] for k, v in invariants.items()}
        report = {
            "seed": o.seed, "created": now_iso(), "settled": settled is not None,
            "holds": settled is not None and all(c == 0 for c in counts.values()),
            "wall_s": round(end_s, 1),
            "settings": {"cells": o.cells, "steps": o.steps, "ckpt_every": o.ckpt_every, "faults": o.faults,
                         "minutes": o.minutes, "eval_steps": eval_steps_for(o.steps, o.ckpt_every),
                         "kinds": o.kinds, "cluster_dir": str(o.cluster_dir), "overrides": self.overrides},
            "determinism": "the schedule (moments, kinds, draws) is a function of the seed; what each draw hits "
                           "depends on what the cluster is doing at that moment, which is not",
            "faults_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "faults_applied": sum(1 for r in faults if r["outcome"] == "applied"),
            "invariant_counts": counts,
            "invariants": invariants,
            "definitions": INVARIANTS,
            "sweeps": [r.record() for r in self.sweeps.runs],
            "reference_rc": ref_rc,
            "restores": self.chaos.restores,
            "holders": self.watcher.holders,
            "notes": self.notes,
            "faults": faults,
        }
        atomic_write_json(o.out / "report.json", report)
        (o.out / "report.md").write_text(format_report(report))
        return report


def soak_env(cluster_env: dict[str, str]) -> dict[str, str]:
    """Returns the environment of every process the soak starts: the cluster's clients, one thread, no tracking, no
    progress bars; the harness cache of the caller when set (the digits statistics are computed once)."""
    env = {**os.environ, **cluster_env, "WANDB_MODE": "disabled", "HARNESS_NO_BAR": "1", "HF_HUB_OFFLINE": "1"}
    env.update({k: "1" for k in THREAD_VARS})
    env.pop("HARNESS_DEBUG", None)
    return env


def format_report(report: dict) -> str:
    """Returns the report as Markdown: settings, faults by kind, every invariant's count, the sweeps, each fault."""
    s = report["settings"]
    lines = [
        f"# Chaos soak, seed {report['seed']}",
        "",
        f"{s['cells']} cells x {s['steps']} steps (checkpoint every {s['ckpt_every']}, evaluations at "
        f"{s['eval_steps']}), {s['faults']} faults scheduled over {s['minutes']:g} minutes; wall time "
        f"{report['wall_s'] / 60:.1f} minutes; settled: {report['settled']}; every invariant holds: {report['holds']}.",
        f"Determinism: {report['determinism']}.",
        "",
        "## Faults by kind",
        "",
        "| kind | applied | no target | skipped | failed |",
        "|---|---|---|---|---|",
    ]
    for kind, c in report["faults_by_kind"].items():
        lines.append(f"| {kind} | {c.get('applied', 0)} | {c.get('no target', 0)} | {c.get('skipped', 0)} | "
                     f"{c.get('failed', 0)} |")
    lines += ["", f"{report['faults_applied']} of {len(report['faults'])} faults applied.", "",
              "## Invariants", "", "| invariant | count | definition |", "|---|---|---|"]
    for name, count in report["invariant_counts"].items():
        lines.append(f"| {name} | {count} | {report['definitions'][name]} |")
    for name, inv in report["invariants"].items():
        if inv.get("count"):
            lines += ["", f"### {name}", "", "```json", json.dumps(inv, indent=1, default=str)[:6000], "```"]
    lines += ["", "## Sweeps", "", "| # | role | started (s) | ended (s) | rc | killed | summary |",
              "|---|---|---|---|---|---|---|"]
    for r in report["sweeps"]:
        lines.append(f"| {r['index']} | {r['role']} | {r['started_s']} | {r['ended_s']} | {r['rc']} | {r['killed']} | "
                     f"{r['summary'] or r['error'] or ''} |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", "## Every fault", "", "| # | at (s) | applied (s) | kind | target | outcome | detail |",
              "|---|---|---|---|---|---|---|"]
    for f in report["faults"]:
        lines.append(f"| {f['index']} | {f['at_s']:.1f} | {f['applied_s']:.1f} | {f['kind']} | {f['target'] or ''} | "
                     f"{f['outcome']} | {f['detail'] or ''} |")
    return "\n".join(lines) + "\n"


#################################################################################
#                                  The CLI                                      #
#################################################################################


def parse_kinds(text: str) -> dict[str, float]:
    """Returns the fault kinds of `--kinds` (comma-separated names, or `all`) with their weights."""
    if text == "all":
        return dict(KINDS)
    names = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise cli.BadInput(f"--kinds={text!r}: unknown kind(s) {unknown or '(none given)'}; allowed: all or "
                           f"a comma-separated list of {', '.join(KINDS)}")
    return {k: KINDS[k] for k in names}


def parse_options(argv: list[str] | None) -> tuple[Options, bool]:
    """Returns (the options, whether only the schedule is asked for); one-line errors (exit 2) for bad values."""
    p = cli.ArgumentParser(prog="python -m harness.soak", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="the fault schedule's seed (default 0)")
    p.add_argument("--cells", type=int, default=8, help="cells of the grid, seeds 0..N-1 (default 8)")
    p.add_argument("--faults", type=int, default=100, help="faults in the schedule (default 100)")
    p.add_argument("--minutes", type=float, default=20.0, help="the span the faults are drawn over (default 20)")
    p.add_argument("--steps", type=int, default=4000, help="training steps per cell (default 4000)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints (default steps/40)")
    p.add_argument("--kinds", default="all", help=f"fault kinds, comma-separated (default all: {', '.join(KINDS)})")
    p.add_argument("--out", type=Path, default=None, help="output folder, new or empty (default outputs/soak/seed<N>)")
    p.add_argument("--cluster-dir", type=Path, default=None,
                   help=f"the cluster's state folder (default $HARNESS_SLURM_DIR or {DEFAULT_CLUSTER_DIR})")
    p.add_argument("--cluster-sh", type=Path, default=CLUSTER_SH, help="the cluster script (tests/slurm/cluster.sh)")
    p.add_argument("--max-relaunches", type=int, default=100, help="launches of the main sweep at most (default 100)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="the whole soak's bound (default 3 x --minutes + 30)")
    p.add_argument("--plan", action="store_true", help="print the fault schedule and exit")
    a = p.parse_args(argv)
    checks = [
        (a.seed >= 0, f"--seed={a.seed}: must be 0 or more"),
        (1 <= a.cells <= 64, f"--cells={a.cells}: allowed 1..64 (each cell is a job on the one test node)"),
        (a.faults >= 0, f"--faults={a.faults}: must be 0 or more"),
        (0 < a.minutes <= 24 * 60, f"--minutes={a.minutes:g}: allowed above 0, at most 1440"),
        (a.steps >= 3, f"--steps={a.steps}: must be at least 3 (evaluations at a third, two thirds and the end)"),
        (a.ckpt_every is None or 1 <= a.ckpt_every <= a.steps,
         f"--ckpt-every={a.ckpt_every}: allowed 1..--steps ({a.steps})"),
        (a.max_relaunches >= 1, f"--max-relaunches={a.max_relaunches}: must be at least 1"),
        (a.max_minutes is None or a.max_minutes > a.minutes,
         f"--max-minutes={a.max_minutes}: must be above --minutes ({a.minutes:g})"),
    ]
    for ok, message in checks:
        if not ok:
            raise cli.BadInput(message)
    kinds = parse_kinds(a.kinds)
    cluster_dir = a.cluster_dir or Path(os.environ.get("HARNESS_SLURM_DIR", DEFAULT_CLUSTER_DIR))
    opts = Options(seed=a.seed, cells=a.cells, faults=a.faults, minutes=a.minutes, steps=a.steps,
                   ckpt_every=a.ckpt_every or max(1, a.steps // 40),
                   out=(a.out or Path("outputs") / "soak" / f"seed{a.seed}").resolve(),
                   cluster_dir=cluster_dir.resolve(), cluster_sh=a.cluster_sh,
                   max_relaunches=a.max_relaunches,
                   max_minutes=a.max_minutes if a.max_minutes is not None else 3 * a.minutes + 30,
                   kinds=kinds)
    return opts, a.plan


def open_cluster(opts: Options) -> Cluster:
    """Returns the cluster of --cluster-dir; cli.BadInput (one line) when it is not there or not up."""
    env_file = opts.cluster_dir / "env.sh"
    if not opts.cluster_sh.is_file():
        raise cli.BadInput(f"--cluster-sh={opts.cluster_sh}: no such file (the repository's tests/slurm/cluster.sh)")
    if not env_file.is_file():
        raise cli.BadInput(f"--cluster-dir={opts.cluster_dir}: no env.sh there; start the cluster with "
                           f"bash tests/slurm/cluster.sh up {opts.cluster_dir}")
    cluster = Cluster(opts.cluster_dir, {**os.environ, **read_env_file(env_file)}, opts.cluster_sh)
    if not cluster.up():
        raise cli.BadInput(f"--cluster-dir={opts.cluster_dir}: the cluster is not up (a daemon is stopped); run "
                           f"bash tests/slurm/cluster.sh up {opts.cluster_dir}")
    return cluster


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.soak [--seed N] [--cells N] [--faults N] [--minutes M] ...`: runs the soak, prints where
    its report is and every invariant's count; returns the exit code (0: every invariant holds)."""
    try:
        opts, plan_only = parse_options(argv)
        if plan_only:
            print(format_schedule(make_schedule(opts.seed, opts.faults, opts.minutes, opts.kinds)))
            return 0
        if opts.out.exists() and any(opts.out.iterdir()):
            raise cli.BadInput(f"--out={opts.out}: exists and is not empty; give a new folder (a soak starts from "
                               "nothing)")
        cluster = open_cluster(opts)
    except cli.BadInput as e:  # only the input is checked here: an error of the soak itself shows its traceback
        if cli.debug():
            raise
        cli.fail(e)
    opts.out.mkdir(parents=True, exist_ok=True)
    # TERM (and INT, which a shell ignores in the background jobs it starts) end the soak through its cleanup:
    # the sweeps it started are stopped, its jobs cancelled, a daemon it stopped started again.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    print(f"soak seed {opts.seed}: {opts.cells} cells x {opts.steps} steps, {opts.faults} faults over "
          f"{opts.minutes:g} min on {opts.cluster_dir}; report in {opts.out}", flush=True)
    try:
        report = Soak(opts, cluster).run()
    except SoakError as e:
        cli.fail(e, code=cli.FAILED_EXIT)
    counts = report["invariant_counts"]
    print(f"faults applied {report['faults_applied']} of {len(report['faults'])} "
          f"({', '.join(f'{k} {sum(v.values())}' for k, v in report['faults_by_kind'].items())}); "
          f"wall {report['wall_s'] / 60:.1f} min; settled {report['settled']}", flush=True)
    print("invariants: " + ", ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    print(f"report: {opts.out / 'report.md'}", flush=True)
    return 0 if report["holds"] else cli.FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
