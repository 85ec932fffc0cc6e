"""What the soak drives and watches: the test cluster (its clients' environment, the SLURM clients, cluster.sh's
verbs that stop and start its daemons, the jobs a sweep submitted), the sweep's launches (SweepRun, Sweeps: every
process the soak starts, how it ended), and the Watcher that reads the sweep folder as the soak runs (every
checkpoint's weights digest, every evaluation record's identity, who holds each cell).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from harness.core import lease
from harness.core.config import REPO_ROOT
from harness.core.runfolder import read_json

CLUSTER_SH = REPO_ROOT / "tests" / "slurm" / "cluster.sh"
DEFAULT_CLUSTER_DIR = "/tmp/harness-slurm"  # cluster.sh's own default state folder

CLIENT_TIMEOUT_S = 30  # a SLURM client that has not answered by then never will (slurmctld may be down)
SWEEP_EXIT_S = 30.0  # how long a sweep that was told to stop may take

SUMMARY = re.compile(r"^sweep \S+: (\d+) cells, (\d+) already done, (\d+) run now")
JOB_NAME = re.compile(r"^\d+(_\d+)?$")


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
