"""What every cell of a sweep is doing, read from the run folders alone (never from the scheduler).

    python -m harness.status outputs/demo            # a table
    python -m harness.status outputs/demo --json     # one record per cell, for machines

A cell of the grid (sweep.json) that has no run folder yet is `queued`; a cell whose files cannot be read
is `unreadable` with the reason, and the rest of the table is still shown. The `holder` column names the
process that holds a cell's run folder (harness.core.lease), flagged `STALE` when its heartbeat stopped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from harness.core import cli, lease
from harness.core.runfolder import read_json, read_jsonl, read_status

SWEEP_FILE = "sweep.json"
CELL_FILE = "cell.json"


def cell_dirs(sweep_dir: str | Path) -> list[Path]:
    """Run folders of a sweep (sub-folders holding a cell.json), sorted by name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} does not exist")
    cells = sorted(p for p in sweep_dir.iterdir() if (p / CELL_FILE).exists())
    if not cells and not (sweep_dir / SWEEP_FILE).exists():
        raise ValueError(f"{sweep_dir} is not a sweep folder (no {SWEEP_FILE} and no run folders with {CELL_FILE})")
    return cells


def grid_ids(sweep_dir: str | Path) -> list[str]:
    """Returns the cell ids sweep.json lists (every cell ever launched into the folder); [] when unreadable."""
    try:
        meta = read_json(Path(sweep_dir) / SWEEP_FILE) or {}
    except ValueError:
        return []
    return list(meta.get("grid", []))


def _holder(run_dir: Path) -> dict:
    info = lease.read_lease(run_dir)
    if info is None:
        return {"holder": None, "holder_stale": None}
    return {"holder": lease.describe_lease(info), "holder_stale": bool(info.get("stale"))}


def _evals(run_dir: Path) -> list[dict]:
    out = []
    for p in sorted((run_dir / "evals").glob("step_*.json")) if (run_dir / "evals").is_dir() else []:
        try:
            rec = read_json(p)
        except ValueError:
            continue  # a torn record is redone by the next evaluation
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return sorted(out, key=lambda r: r["step"])


def cell_status(run_dir: Path, now: float | None = None) -> dict:
    """One cell's state, progress, last loss and FID, attempts, GPU-hours, ETA (seconds) and lease holder."""
    try:
        facts = read_json(run_dir / CELL_FILE, {}) or {}
    except ValueError as e:
        return unreadable_row(run_dir, f"cell.json: {e}")
    status = read_status(run_dir)
    lines = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    evals = _evals(run_dir)
    total = status.get("total_steps") or facts.get("steps")
    step = status.get("step", 0) or 0
    last = lines[-1] if lines else {}
    eta_s = None
    if status.get("state") == "running" and last.get("images_per_s") and total:
        eta_s = (total - step) * facts.get("global_batch", 1) / last["images_per_s"]
    fid = next((e for e in reversed(evals) if isinstance(e.get("metrics"), dict) and "fid" in e["metrics"]), None)
    return {
        "cell_id": run_dir.name, "state": status.get("state", "pending"), "reason": status.get("reason"),
        "step": step, "total_steps": total, "loss": last.get("loss"),
        "fid": fid["metrics"]["fid"] if fid else None, "fid_step": fid["step"] if fid else None,
        "fid_label": (fid.get("metric_label") or "FID") if fid else None,
        "evals": len(evals), "attempts": status.get("attempts", 0),
        "gpu_hours": status.get("gpu_hours", 0.0), "wall_s": status.get("wall_s"), "eta_s": eta_s,
        "updated": status.get("updated"), **_holder(run_dir),
    }


def _empty_row(cell_id: str, state: str, reason: str | None) -> dict:
    return {"cell_id": cell_id, "state": state, "reason": reason, "step": 0, "total_steps": None, "loss": None,
            "fid": None, "fid_step": None, "fid_label": None, "evals": 0, "attempts": 0, "gpu_hours": 0.0,
            "wall_s": None, "eta_s": None, "updated": None, "holder": None, "holder_stale": None}


def unreadable_row(run_dir: Path, reason: str) -> dict:
    """The row of a cell whose files cannot be read (the reason says which file and why)."""
    return {**_empty_row(run_dir.name, "unreadable", reason), **_holder(run_dir)}


def queued_row(cell_id: str) -> dict:
    """The row of a grid cell that has no run folder yet."""
    return _empty_row(cell_id, "queued", None)


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    """Returns a row per cell of a sweep: its run folders, and the grid's cells that have none (queued)."""
    rows = []
    for d in cell_dirs(sweep_dir):
        try:
            rows.append(cell_status(d))
        except Exception as e:  # noqa: BLE001 - one unreadable cell must not hide the others
            rows.append(unreadable_row(d, f"{type(e).__name__}: {cli.one_line(e)}"))
    have = {r["cell_id"] for r in rows}
    rows += [queued_row(cid) for cid in grid_ids(sweep_dir) if cid not in have]
    return rows


def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(s)) if s < 86400 else f"{s / 86400:.1f}d"


def format_table(rows: list[dict]) -> str:
    head = (f"{'cell':<52} {'state':<11} {'step':>15} {'loss':>8} {'FID':>9} {'evals':>5} {'tries':>5}"
            f" {'GPU-h':>7} {'ETA':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        fid = f"{r['fid']:.2f}" if r["fid"] is not None else "-"
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        out.append(
            f"{r['cell_id']:<52} {r['state']:<11} {r['step']:>7}/{r['total_steps'] or '?':<7} {loss:>8} {fid:>9}"
            f" {r['evals']:>5} {r['attempts']:>5} {r['gpu_hours'] or 0:>7.2f} {_fmt_eta(r['eta_s']):>9}"
        )
        if r["state"] in ("failed", "unreadable") and r["reason"]:
            out.append(f"    reason: {r['reason']}")
        if r.get("holder"):
            flag = "STALE (the holder's heartbeat stopped: it is taken over by the next attempt) " \
                if r["holder_stale"] else ""
            out.append(f"    held: {flag}{r['holder']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    out.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cells")
    return "\n".join(out)


@cli.guard
def main(argv: list[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m harness.status", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", nargs="+")
    p.add_argument("--json", action="store_true", help="print a JSON list of cell records")
    a = p.parse_args(argv)
    rows = [r for s in a.sweep_dir for r in sweep_rows(s)]
    print(json.dumps(rows, indent=2) if a.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
