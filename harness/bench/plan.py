"""The plan benchmark: wall time of the sweep's plan of a grid (the paper's 48 cells by default), as a user
runs it (`python -m harness.sweep -m ... plan=true`, a fresh process), beside what its parts cost: importing
harness.sweep, composing every cell's config, and counting each cell's cost (`harness.sweep.plan_row`).

The grid trains on precomputed ImageNet-256 latents (data=latents256); its data.path is a temporary folder
of random latent shards (`write_latent_shards`), of which the plan reads only the metadata.
"""

from __future__ import annotations

import itertools
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness.bench.common import IMAGENET_CLASSES, device_name
from harness.bench.loader import LATENT_SHAPE_256, write_latent_shards
from harness.core import throughput
from harness.core.config import REPO_ROOT, compose

PAPER_GRID = ("model=S,B,L,XL", "patch=2,4,8", "cond=in_context,cross_attn,adaln,adaln_zero")
PLAN_DATA = "latents256"
PLAN_SHARD_LATENTS = 16  # the plan reads the shards' metadata only: a few latents are enough
# The plan's last line: "48 cells, 48 to run; estimated GPU-hours: ..." (harness.sweep.format_plan).
PLAN_SUMMARY = re.compile(r"^(\d+) cells, (\d+) to run;", re.MULTILINE)
CELL_ROW_PREFIX = "DiT-"  # every cell id, so every row of the plan's table, starts with it


def grid_cells(grid) -> list[list[str]]:
    """Returns the overrides of every cell of a grid of `key=a,b,...` overrides, in the sweep's order (the
    product of the value lists, last key fastest); ValueError for an override without a value."""
    axes = []
    for override in grid:
        key, sep, values = override.partition("=")
        if not (key and sep and values) or "" in values.split(","):
            raise ValueError(f"grid override {override!r}: expected key=value[,value...]")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(cell) for cell in itertools.product(*axes)]


def listed_cells(plan_output: str) -> int:
    """Returns how many cells a sweep plan's output lists: its table rows, checked against the count of its
    summary line; ValueError when the summary is missing or disagrees with the rows."""
    rows = sum(1 for line in plan_output.splitlines() if line.startswith(CELL_ROW_PREFIX))
    summary = PLAN_SUMMARY.search(plan_output)
    if summary is None:
        raise ValueError("the plan's output has no summary line ('N cells, M to run; ...')")
    if int(summary.group(1)) != rows:
        raise ValueError(f"the plan's summary says {summary.group(1)} cells but its table lists {rows}")
    return rows


def _children_cpu_s() -> float:
    """Returns the user + system CPU seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed_run(cmd: list[str]) -> tuple[float, float, str]:
    """Returns (wall seconds, CPU seconds, stdout) of a command run from the repository root; RuntimeError
    with the end of its stderr when it fails."""
    cpu0, t0 = _children_cpu_s(), time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ))
    wall_s, cpu_s = time.perf_counter() - t0, _children_cpu_s() - cpu0
    if out.returncode:
        tail = "\n".join(out.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{tail}")
    return wall_s, cpu_s, out.stdout


def _row(name: str, what: str, runs: list[tuple[float, float]], **extra) -> dict:
    """Returns a setting row from (wall s, CPU s) runs: medians and the runs of each."""
    wall, cpu = [w for w, _ in runs], [c for _, c in runs]
    return {"name": name, "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "wall_s_runs": wall,
            "cpu_s_runs": cpu, **extra, "what": what}


def bench_plan(grid=PAPER_GRID, repeats: int = 3, import_time: bool = True, in_process: bool = True,
               root: str | None = None) -> dict:
    """Returns the plan record: wall and CPU seconds (medians of `repeats`; CPU time is what the machine's
    load does not inflate) of `python -m harness.sweep -m <grid> plan=true` in a fresh process, whose output
    must list every cell of the grid (RuntimeError otherwise); with `import_time`, of `import harness.sweep`
    in a fresh process; with `in_process`, of composing every cell's config (once) and of
    harness.sweep.plan_row over them. Temporary files go under `root`."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    cells = grid_cells(grid)
    loadavg_start = round(os.getloadavg()[0], 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_plan_", dir=root) as tmp:
        shards = write_latent_shards(Path(tmp) / "shards", PLAN_SHARD_LATENTS, latent_shape=LATENT_SHAPE_256,
                                     num_classes=IMAGENET_CLASSES)
        fixed = [f"data={PLAN_DATA}", f"data.path={shards}", "plan=true", f"out_dir={Path(tmp) / 'out'}"]
        cmd = [sys.executable, "-m", "harness.sweep", "-m", *grid, *fixed]
        runs = []
        for _ in range(repeats):
            wall_s, cpu_s, stdout = _timed_run(cmd)
            try:
                listed = listed_cells(stdout)
            except ValueError as e:
                raise RuntimeError(f"{' '.join(cmd)}: {e}") from e
            if listed != len(cells):
                raise RuntimeError(f"{' '.join(cmd)} planned {listed} cells; the grid has {len(cells)}")
            runs.append((wall_s, cpu_s))
        rows.append(_row("sweep_plan", "python -m harness.sweep ... plan=true, a fresh process", runs,
                         cells_listed=len(cells)))
        if import_time:
            runs = [_timed_run([sys.executable, "-c", "import harness.sweep"])[:2] for _ in range(repeats)]
            rows.append(_row("import_sweep", "python -c 'import harness.sweep', a fresh process", runs))
        if in_process:
            rows += _in_process_rows(cells, fixed, repeats)
    return {"kind": "plan", "device": {"name": device_name(torch.device("cpu"))}, "grid": list(grid),
            "cells": len(cells), "data": PLAN_DATA, "repeats": repeats,
            "command": "python -m harness.sweep -m " + " ".join([*grid, f"data={PLAN_DATA}",
                                                                  "data.path=<latent shards> plan=true out_dir=<tmp>"]),
            "loadavg_1m_start": loadavg_start, "settings": rows, "complete": True}


def _in_process_rows(cells: list[list[str]], fixed: list[str], repeats: int) -> list[dict]:
    """Returns the rows of composing every cell's config (once: Hydra's compose of a cell costs the same each
    time) and of harness.sweep.plan_row over the composed configs (median of `repeats`)."""
    # Imported here: harness.sweep brings the report, plots and scaling modules (seconds), which no other
    # benchmark needs at start-up.
    from harness import sweep

    t0, cpu0 = time.perf_counter(), time.process_time()
    cfgs = [compose(cell + fixed) for cell in cells]
    compose_run = (time.perf_counter() - t0, time.process_time() - cpu0)
    rate = throughput.gpu_image_gflops_per_s()
    runs = []
    for _ in range(repeats):
        t0, cpu0 = time.perf_counter(), time.process_time()
        for cfg in cfgs:
            sweep.plan_row(cfg, rate)
        runs.append((time.perf_counter() - t0, time.process_time() - cpu0))
    return [_row("compose", "harness.core.config.compose of every cell, in process", [compose_run]),
            _row("plan_row", "harness.sweep.plan_row of every composed cell, in process", runs)]
