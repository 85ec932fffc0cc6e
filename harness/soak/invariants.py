"""The invariants checked at the end of a soak: what each counts (INVARIANTS, written into the report), and one
function per invariant that counts it from the sweep folder, the watcher's record and, for the last relaunch, two
snapshots of the run folders taken around it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path

from harness.core import lease
from harness.core.runfolder import TEMP_SUFFIX, read_json, read_jsonl, read_status
from harness.soak.cluster import SweepRun, Watcher, _uint8, cell_dirs, submitted_jobs, weights_digest

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
