"""How the benchmark records read: a text table of one record, and the merged summary of a GPU check's
folder (gpu_check.json, gpu_check.md)."""

from __future__ import annotations

import json
from pathlib import Path

from harness.bench.common import environment
from harness.bench.sample import FID_HOURS_KEY, FID_LABEL
from harness.core.runfolder import atomic_write_bytes, atomic_write_json


def format_table(record: dict) -> str:
    """Returns the record's settings as an aligned text table under a header line (kind, device, cell)."""
    rows = record["settings"]
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if not c.endswith("_runs")]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    dev = record.get("device", {})
    head = f"{record['kind']} on {dev.get('name', '?')}"
    if "cell" in record:
        head += f", {record['cell']['label']} ({record['cell']['gflops']:.3f} Gflops), batch {record['batch']}"
    if record["kind"] == "data":
        head += (f", data={record['data']} at {record['image_size']}x{record['image_size']}, batch {record['batch']}, "
                 f"median of {record['repeats']} chunks of {record['steps']} batches")
    if record["kind"] == "plan":
        head += f", {record['cells']} cells ({' '.join(record['grid'])}), median of {record['repeats']}"
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    if "bf16_check" in record:
        c = record["bf16_check"]
        lines.append(f"bf16 vs fp32: loss rel err {c['loss_rel_err']:.2e} (tol {c['loss_rtol']}), output rel err "
                     f"{c['output_rel_err']:.2e} (tol {c['output_rtol']}): {'ok' if c['ok'] else 'FAIL'}")
    return "\n".join(lines)


def _num(v, f="{:.4g}") -> str:
    return "-" if v is None else f.format(v)


def _setting_note(row: dict) -> str:
    """Returns the note column of a setting's row: its error or skip reason, else what else it measured."""
    note = row.get("error") or row.get("skipped") or ""
    if FID_HOURS_KEY in row:
        note = f"{FID_LABEL} {row[FID_HOURS_KEY]:.2f} device-h"
    if row.get("wall_s") is not None:
        note = f"{row['wall_s']:.2f} s wall"
    return note


def summarize(out_dir: str | Path) -> dict:
    """Merges the records (*.json) and phase log (phases.tsv) of a GPU check folder into gpu_check.json and
    gpu_check.md (one table row per measured setting); returns the merged dict."""
    out_dir = Path(out_dir)
    records = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.name != "gpu_check.json":
            try:
                records[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                records[path.stem] = {"error": f"unreadable: {e}"}
    phases = []
    if (out_dir / "phases.tsv").exists():
        for line in (out_dir / "phases.tsv").read_text().splitlines():
            name, status, rc, wall_s = (line.split("\t") + ["", "", "", ""])[:4]
            phases.append({"phase": name, "status": status, "rc": rc, "wall_s": wall_s})
    merged = {"phases": phases, "records": records, "env": environment([])}
    atomic_write_json(out_dir / "gpu_check.json", merged)
    lines = ["# GPU check", "", f"Date {merged['env']['date']}, torch {merged['env']['torch']}, "
             f"CUDA {merged['env']['cuda']}.", "", "| phase | status | rc | wall s |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['status']} | {p['rc']} | {p['wall_s']} |" for p in phases]
    lines += ["", "| record | device | cell | batch | setting | images/s | TFLOP/s | MFU | peak GiB | "
              "x baseline | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stem, r in records.items():
        dev = r.get("device", {}).get("name", "-")
        cell = r.get("cell", {}).get("label", "-")
        for row in r.get("settings", []):
            lines.append(f"| {stem} | {dev} | {cell} | {r.get('batch', '-')} | {row.get('name', row.get('threads'))} "
                         f"| {_num(row.get('images_per_s'), '{:.1f}')} | {_num(row.get('tflops'), '{:.1f}')} "
                         f"| {_num(row.get('mfu'), '{:.1%}')} | {_num(row.get('peak_mem_gib'), '{:.1f}')} "
                         f"| {_num(row.get('ratio_to_baseline'), '{:.2f}')} | {_setting_note(row)} |")
        if "bf16_check" in r:
            c = r["bf16_check"]
            lines.append(f"| {stem} | {dev} | {cell} | {c['batch']} | bf16 vs fp32 | | | | | | loss rel err "
                         f"{c['loss_rel_err']:.1e}, output rel err {c['output_rel_err']:.1e}: "
                         f"{'ok' if c['ok'] else 'FAIL'} |")
        if r.get("host_syncs_per_step") is not None:
            lines.append(f"| {stem} | {dev} | {cell} | {r['batch']} | host syncs per bf16 step | "
                         f"{r['host_syncs_per_step']} | | | | | |")
    atomic_write_bytes(out_dir / "gpu_check.md", ("\n".join(lines) + "\n").encode())
    return merged
