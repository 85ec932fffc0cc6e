"""Atomic, checksummed training checkpoints and resume from the newest valid one.

A checkpoint is `checkpoints/step_0000100.pt` (state dicts and plain data only, never pickled code)
plus a sidecar `step_0000100.json` holding its sha256. The sidecar is written after the checkpoint
has been renamed into place, so a checkpoint without a sidecar, or whose sidecar names other bytes,
was cut short by a kill and is never trusted. A sidecar that is there but torn (a file system or a hand
that cut it after it was written) has lost the checksum, not the checkpoint: torch.save writes a zip
whose every record carries its CRC-32, so a checkpoint whose records all pass theirs is whole and is
trusted; one that fails is not. Without this, a torn sidecar of a kept checkpoint (an evaluation step's)
could never be evaluated again, and its cell never finish.
"""

from __future__ import annotations

import io
import logging
import random
import re
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.runfolder import atomic_write_bytes, atomic_write_json, file_sha256, read_json

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def ckpt_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def save(ckpt_dir: str | Path, step: int, state: dict) -> Path:
    """Serialise `state` and write it atomically with its checksum sidecar; returns the path."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path = ckpt_path(ckpt_dir, step)
    sha = atomic_write_bytes(path, buf.getvalue())
    atomic_write_json(path.with_suffix(".json"), {"step": step, "sha256": sha, "bytes": buf.tell()})
    return path


def checkpoint_source(ckpt_dir: str | Path, step: int) -> dict:
    """Returns the checkpoint's file name and sha256 (its sidecar's): what made a samples folder, kept valid
    when the run folder is moved or copied."""
    path = ckpt_path(ckpt_dir, step)
    try:
        sidecar = read_json(path.with_suffix(".json")) or {}
    except ValueError:
        sidecar = {}
    return {"checkpoint": path.name, "checkpoint_sha256": sidecar.get("sha256")}


def list_steps(ckpt_dir: str | Path) -> list[int]:
    """Steps of the checkpoint files present (valid or not), ascending."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def verify(path: str | Path) -> str | None:
    """None when the checkpoint matches its sidecar checksum, else the reason it cannot be trusted."""
    path = Path(path)
    try:
        meta = read_json(path.with_suffix(".json"))
    except ValueError:
        problem = zip_problem(path)
        if problem is None:
            log.warning("checkpoint %s: its checksum sidecar is torn; trusted, as every record of it passes its "
                        "CRC-32", path)
            return None
        return f"its checksum sidecar is torn and {problem}"
    if not isinstance(meta, dict):
        meta = None
    if meta is None:
        return "no checksum sidecar (the write was interrupted)"
    sha = file_sha256(path)
    if sha != meta.get("sha256"):
        return f"checksum mismatch (file {sha[:12]}, recorded {str(meta.get('sha256'))[:12]})"
    return None


def zip_problem(path: str | Path) -> str | None:
    """None when `path` is a whole zip archive (what torch.save writes) whose every record passes its CRC-32, else
    what is wrong with it, as a clause ("it is not a whole zip archive (...)", "its record X fails its CRC-32")."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"it is not a whole zip archive ({e})"
    return None if bad is None else f"its record {bad} fails its CRC-32"


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Returns the checkpoint's dict; weights_only: a checkpoint holds state dicts and plain data, no code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(ckpt_dir: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest checkpoint that verifies and loads; a corrupt newer one is reported and skipped."""
    for step in reversed(list_steps(ckpt_dir)):
        path = ckpt_path(ckpt_dir, step)
        problem = verify(path)
        if problem is None:
            try:
                return load(path, map_location)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
                problem = f"cannot be loaded: {e}"
        log.warning("checkpoint %s is not usable (%s); falling back to an older one", path, problem)
    return None


def prune(ckpt_dir: str | Path, keep_last: int, keep_steps: set[int]) -> list[int]:
    """Delete checkpoints except the newest `keep_last` and those at `keep_steps`; returns deleted steps."""
    steps = list_steps(ckpt_dir)
    keep = set(steps[-keep_last:]) | (set(steps) & keep_steps)
    deleted = []
    for s in steps:
        if s not in keep:
            p = ckpt_path(ckpt_dir, s)
            p.unlink(missing_ok=True)
            p.with_suffix(".json").unlink(missing_ok=True)
            deleted.append(s)
    return deleted


# ---- RNG states as plain tensors and lists, so checkpoints load with weights_only=True ----

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str | None:
    """The commit of the harness source tree, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def describe_state(state: dict[str, Any]) -> str:
    return f"step {state.get('step')} ({state.get('images_seen')} images seen)"
