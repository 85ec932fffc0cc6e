"""conf/throughput.yaml: measured training throughput per device, for the sweep's GPU-hour plan.

Written by `python -m harness.bench train --record` (on a GPU), read by `harness.sweep` when it estimates
each cell's GPU-hours. Until a GPU has been recorded, the plan uses the fast-DiT A100 figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from harness.core.config import CONF_DIR
from harness.core.runfolder import atomic_write_bytes

THROUGHPUT_FILE = CONF_DIR / "throughput.yaml"
# The variables that cap a process's math-library threads (read when torch loads): processes that share a CPU each
# get their own share of it (two processes of two threads on two cores run several times slower than one), and a
# fixed count keeps the order of float reductions fixed.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# Training images/s of one GPU times the model's Gflops (paper convention), i.e. images/s x gflops. The
# fast-DiT A100 figure (107.5 images/s for XL/2 at 118.64 Gflops): the plan's estimate until a GPU is recorded.
FAST_DIT_A100_IMAGE_GFLOPS_PER_S = 107.5 * 118.64
HEADER = ("# Measured training throughput per device: written by `python -m harness.bench train --record`,\n"
          "# read by harness.sweep for its GPU-hour estimates (plan_device's train_image_gflops_per_s).\n")


def read_throughput(path: str | Path = THROUGHPUT_FILE) -> dict:
    """Returns the throughput file as a dict ({"plan_device": str|None, "devices": {}} when absent)."""
    path = Path(path)
    if not path.exists():
        return {"plan_device": None, "devices": {}}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.setdefault("plan_device", None)
    data.setdefault("devices", {})
    return data


def recorded_image_gflops_per_s(path: str | Path = THROUGHPUT_FILE) -> float | None:
    """Returns the plan device's training image-Gflops/s per GPU from the throughput file, or None."""
    data = read_throughput(path)
    entry = data["devices"].get(data["plan_device"]) if data["plan_device"] else None
    return float(entry["train_image_gflops_per_s"]) if entry else None


def gpu_image_gflops_per_s(path: str | Path = THROUGHPUT_FILE) -> float:
    """Returns the per-GPU training rate (image-Gflops/s) the plan uses: the recorded GPU, else fast-DiT's."""
    return recorded_image_gflops_per_s(path) or FAST_DIT_A100_IMAGE_GFLOPS_PER_S


# A CPU's training rate when none is recorded: the 2-core Xeon's DiT-S/8 figure in conf/throughput.yaml.
DEFAULT_CPU_IMAGE_GFLOPS_PER_S = 22.0


def cpu_image_gflops_per_s(gflops: float | None = None, path: str | Path = THROUGHPUT_FILE) -> float:
    """Returns the training rate (image-Gflops/s) of this machine's CPU for a local plan: this processor's recorded
    figures (by its name in the throughput file), else those of the fastest CPU recorded, else
    DEFAULT_CPU_IMAGE_GFLOPS_PER_S. A planning number: a CPU's speed varies by more than its name says.

    Without `gflops`, the rate of the processor's largest recorded cell. With it, the rate of a model of that many
    forward Gflops per image: linear in log-log between the processor's recorded cells, held at the ends. A CPU
    runs tiny models far below its large-model rate (the 2-core Xeon: 2.7 image-Gflops/s at 0.0014 Gflops, 22 at
    0.36), so one rate for all would put a grid of tiny models at a fraction of its time.
    """
    devices = {n: d for n, d in read_throughput(path)["devices"].items()
               if d.get("type") == "cpu" and d.get("train_image_gflops_per_s")}
    if not devices:
        return DEFAULT_CPU_IMAGE_GFLOPS_PER_S
    here = devices.get(cpu_name()) or max(devices.values(), key=lambda d: float(d["train_image_gflops_per_s"]))
    cells = sorted((float(c["gflops"]), float(c["image_gflops_per_s"])) for c in (here.get("cells") or {}).values()
                   if c.get("gflops") and c.get("image_gflops_per_s"))
    if gflops is None or not cells:
        return float(here["train_image_gflops_per_s"])
    log_g, log_rate = np.log([g for g, _ in cells]), np.log([r for _, r in cells])
    return float(np.exp(np.interp(math.log(gflops), log_g, log_rate)))


def cpu_name() -> str:
    """Returns this machine's processor name as /proc/cpuinfo says it (the platform's machine type elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # here: only where /proc/cpuinfo is missing

    return platform.processor() or "cpu"


def _sig(x: float, digits: int = 6) -> float:
    """Returns x rounded to `digits` significant digits (a readable YAML file, no false precision)."""
    return float(f"{x:.{digits}g}")


def record_throughput(record: dict, setting: str, torch_version: str, path: str | Path = THROUGHPUT_FILE) -> dict:
    """Adds a train benchmark record's `setting` row to the throughput file (atomic write); returns the file.

    Per device, each cell's images/s x Gflops is kept; the device's `train_image_gflops_per_s` is that of
    its largest recorded cell (the cells that dominate a grid's cost). A CUDA device becomes plan_device.
    """
    rows = {r["name"]: r for r in record["settings"] if r.get("images_per_s")}
    row, cell = rows[setting], record["cell"]
    data = read_throughput(path)
    dev = data["devices"].setdefault(record["device"]["name"], {"cells": {}})
    dev["type"] = record["device"]["type"]
    dev["cells"][cell["label"]] = {
        "gflops": cell["gflops"], "batch": record["batch"], "setting": setting,
        "images_per_s": _sig(row["images_per_s"]), "image_gflops_per_s": _sig(row["images_per_s"] * cell["gflops"]),
        "mfu": _sig(row["mfu"]), "date": record["env"]["date"] if "env" in record else None, "torch": torch_version,
    }
    biggest = max(dev["cells"].values(), key=lambda c: c["gflops"])
    dev["train_image_gflops_per_s"] = biggest["image_gflops_per_s"]
    if dev["type"] == "cuda":
        data["plan_device"] = record["device"]["name"]
    atomic_write_bytes(path, (HEADER + yaml.safe_dump(data, sort_keys=False)).encode())
    return data
