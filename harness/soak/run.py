"""The soak itself: its grid of tiny cells, its Options, and Soak, which starts the sweep and the undisturbed
reference run, fires the schedule while relaunching the sweep until it settles, lets its jobs drain, relaunches it
once more, leaves the cluster as it found it, counts the invariants and writes the report (report.json and the
Markdown of format_report).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.core import cli
from harness.core.runfolder import atomic_write_json, now_iso
from harness.core.throughput import THREAD_VARS
from harness.soak.cluster import Cluster, SweepRun, Sweeps, Watcher, submitted_jobs
from harness.soak.faults import KINDS, Chaos, make_schedule
from harness.soak.invariants import (
    INVARIANTS,
    eval_records,
    final_weights,
    leases,
    relaunch_diff,
    snapshot,
    temp_files,
    trained_twice,
    unfinished,
)

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

TICK_S = 0.5  # the fault loop's period: faults fire within this of their moment
MIN_RELAUNCH_S = 15.0  # between two launches of the main sweep: jobs still holding their cells need a moment
# After the last fault, this many launches in a row that end with failed cells mean the sweep cannot settle: a cell
# fails the same way every time (a bug the soak found), and relaunching it until --max-minutes proves nothing more.
STUCK_LAUNCHES = 3
DRAIN_S = 180.0  # after the sweep settles: how long its leftover jobs (a relaunch's duplicates) may take to end


class SoakError(RuntimeError):
    """The soak cannot go on (the cluster is gone, the sweep refuses its own grid): said in one line, exit 1."""


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
    # One thread everywhere (the jobs inherit the sweep's environment through sbatch): the final weights are compared
    # bit for bit with the undisturbed run's, and the thread count changes the order of float reductions.
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
