"""What every cell of a sweep is doing, read from the run folders alone (never from the scheduler).

    python -m harness.status outputs/demo            # a table
    python -m harness.status outputs/demo --json     # one record per cell, for machines
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harness.runfolder import read_json, read_jsonl


def cell_dirs(sweep_dir: str | Path) -> list[Path]:
    """Run folders of a sweep (sub-folders holding a cell.json), sorted by name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} does not exist")
    cells = sorted(p for p in sweep_dir.iterdir() if (p / "cell.json").exists())
    if not cells and not (sweep_dir / "sweep.json").exists():
        raise ValueError(f"{sweep_dir} is not a sweep folder (no sweep.json and no run folders with cell.json)")
    return cells


def cell_status(run_dir: Path, now: float | None = None) -> dict:
    """One cell's state, progress, last loss and FID, attempts, GPU-hours and ETA (seconds)."""
    facts = read_json(run_dir / "cell.json", {}) or {}
    status = read_json(run_dir / "status.json", {}) or {}
    lines = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    evals = sorted((read_json(p) for p in (run_dir / "evals").glob("step_*.json")), key=lambda r: r["step"]) \
        if (run_dir / "evals").is_dir() else []
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
        "updated": status.get("updated"),
    }


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
        if r["state"] == "failed" and r["reason"]:
            out.append(f"    reason: {r['reason']}")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    out.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cells")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="+")
    p.add_argument("--json", action="store_true", help="print a JSON list of cell records")
    a = p.parse_args(argv)
    try:
        rows = [cell_status(d) for s in a.sweep_dir for d in cell_dirs(s)]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(json.dumps(rows, indent=2) if a.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
