"""The faults: their kinds and weights, the seeded schedule (Fault, make_schedule: when each fault comes, its kind
and the two draws that pick its target and its size, a function of the seed alone), and Chaos, which applies a
fault to whatever the cluster, the sweep and its folder hold at that moment and records what it did.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.core import cli, lease
from harness.core.runfolder import read_status
from harness.soak.cluster import Cluster, Sweeps, cell_dirs, submitted_jobs

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

    def _job_client(self, fault: Fault, args: tuple[str, ...], done: str):
        """Runs a SLURM client (`args` then the job id) on the running job the fault's pick lands on."""
        job = self._running_job(fault)
        if job is None:
            return "no target", None, "no running job"
        self.cluster.client(*args, job)
        return "applied", job, done

    def _scancel(self, fault: Fault):
        return self._job_client(fault, ("scancel",), "cancelled")

    def _requeue(self, fault: Fault):
        return self._job_client(fault, ("scontrol", "requeue"), "requeued")

    def _preempt(self, fault: Fault):
        return self._job_client(fault, ("scancel", "--signal=USR2"), "USR2 sent")

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
