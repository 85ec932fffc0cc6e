"""Helpers shared by test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.core import config

REPO = Path(__file__).resolve().parents[1]

# The tiny test cell, defined once: a 1-block, width-32 DiT on the embedded digits at their native 8x8, the CPU
# demo's recipe at batch 16. A shared 2-core CPU trains it at tens of steps a second, so the tests check the
# harness's bookkeeping, never the numbers. Tests add what they vary (patch, steps, intervals, evaluation).
TINY_CELL = [
    "model=demo-S", "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "data=digits", "data.image_size=8",
    "train=demo", "train.global_batch=16", "train.val_batch=32", "train.val_images=32", "device=cpu",
]
# A quick evaluation of the tiny cell: FID (digits extractor) from 20 samples, 5 sampler steps.
QUICK_EVAL = ["eval=digits", "eval.num_samples=20", "eval.sampling_steps=5", "eval.batch_size=20",
              "eval.shard_size=20", "eval.metrics=[fid]"]


def one_thread_env() -> dict:
    """The environment of a subprocess under test: one CPU thread (kernels then reduce in a fixed order,
    so separate processes compute bitwise alike), no progress bar, no wandb; the session's HARNESS_CACHE
    (tests/conftest.py) is inherited, so the digits extractor trains once."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HARNESS_NO_BAR="1", WANDB_MODE="disabled")
    return env


def wait_for_file(folder: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Polls until a file matching `pattern` exists under `folder`, `proc` has ended, or `timeout_s` passed
    (the caller's assertions then say what is missing)."""
    deadline = time.time() + timeout_s
    while not list(folder.glob(pattern)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)


def run_module(module: str, *args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Runs `python -m <module> args...` from the repository root, as a user does; returns the finished process
    (text output captured)."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=kw.pop("env", one_thread_env()),
                          capture_output=True, text=True, timeout=timeout, **kw)


# A later version of the schema, as an upgrade of the harness would bring: a new defaulted field in a section
# and a new section, both without a role (the common case). Existing cells must keep their ids under it.
@dataclass
class TrainPlus(config.TrainConfig):
    warmup_steps: int = 0


@dataclass
class ExtraSection:
    knob: str = "off"


@dataclass
class ConfigPlus(config.Config):
    train: TrainPlus = field(default_factory=TrainPlus)
    extra: ExtraSection = field(default_factory=ExtraSection)


def read_wandb_run(path: Path) -> dict:
    """Returns what an offline wandb run folder recorded: {"run": {id, group, project, tags, job_type},
    "history": [{key: value}], "files": [names under files/]}, read from its .wandb log (the leveldb-style record
    log wandb writes: 32 KiB blocks of [crc32, length, type] records, each a wandb_internal Record)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (log_file,) = Path(path).glob("run-*.wandb")
    data, pos, pending, records = log_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B", f"{log_file} is not a wandb log"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            records.append(pending)
    out = {"run": {}, "history": [], "files": sorted(p.name for p in (Path(path) / "files").rglob("*") if p.is_file())}
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"id": r.run.run_id, "group": r.run.run_group, "project": r.run.project,
                          "tags": list(r.run.tags), "job_type": r.run.job_type}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return out
