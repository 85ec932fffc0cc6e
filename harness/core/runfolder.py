"""The run folder: atomic writes, status.json, append-only metrics.jsonl (docs/run_folder.md).

Nothing is lost: every file a reader may trust is written to a temporary file in the same folder,
fsynced and renamed over the old one, so a kill leaves either the old or the new version, never half.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

STATES = ("pending", "running", "evaluating", "finished", "failed", "interrupted")
TEMP_SUFFIX = ".tmp"  # atomic writes go to `.<name>.<random>.tmp` beside their target first
SET_ASIDE_DIR = "superseded"  # results of a training run that was started over (train.restart)


def _file_mode() -> int:
    """The mode a plain open() would give a new file (0666 less the umask); mkstemp's 0600 would hide
    results from the other members of a group on a shared cluster."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` only when the block ends without error (temp file in the same
    folder, fsync, rename); on error the temp file is removed and `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)  # frees the space a full disk needs for the failure to be recorded
        raise _naming(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _naming(e: OSError, path: Path) -> OSError:
    """Returns `e` with the file it failed to write named (a failed write() does not say which file)."""
    if e.filename is not None and str(path) in str(e.filename):
        return e
    return OSError(e.errno, f"{e.strerror or e} (writing {path})")


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Write `data` to `path` atomically; return its sha256 hex digest."""
    with atomic_open(path) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(folder: Path) -> None:
    # important: the rename itself is only durable once the folder entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: str | Path, default: Any = None) -> Any:
    """Returns the JSON in `path`, `default` when there is no such file; ValueError naming the file when it
    is torn or not JSON."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not readable JSON ({e.msg} at line {e.lineno}): a torn write?") from e


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line; flushed and fsynced so a kill loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete lines of a JSON-lines file (a torn last line from a kill is skipped)."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def logged_step(metrics_path: str | Path) -> int:
    """Returns the highest step the training log records since its last restart (0 for none)."""
    step = 0
    for rec in read_jsonl(metrics_path):
        if rec.get("event") == "restart":
            step = 0
        elif isinstance(rec.get("step"), int) and "event" not in rec:
            step = max(step, rec["step"])
    return step


def read_status(run_dir: str | Path) -> dict:
    """Returns status.json ({} when there is none). A torn one is rebuilt, not written, from what the run
    folder shows: the newest checkpoint's step and the log (state `interrupted`: a relaunch resumes it)."""
    try:
        return read_json(Path(run_dir) / "status.json", default={}) or {}
    except ValueError as e:
        return rebuild_status(run_dir, str(e))


def rebuild_status(run_dir: str | Path, why: str) -> dict:
    """Returns a status rebuilt from the run folder's checkpoints and metrics.jsonl (see read_status)."""
    run_dir = Path(run_dir)
    ckpts = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt")) \
        if (run_dir / "checkpoints").is_dir() else []
    log = read_jsonl(run_dir / "metrics.jsonl")
    attempts = 1 + sum(1 for r in log if r.get("event") in ("resume", "restart"))
    return {"state": "interrupted", "step": ckpts[-1] if ckpts else 0, "attempts": attempts,
            "reason": f"status.json was rebuilt from the checkpoints and metrics.jsonl ({why})", "rebuilt": True,
            "logged_step": logged_step(run_dir / "metrics.jsonl")}


def update_status(run_dir: str | Path, **fields: Any) -> dict:
    """Merge `fields` into status.json (atomic) and stamp `updated`; returns the new status."""
    status = read_status(run_dir)
    status.pop("rebuilt", None)
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"state {fields['state']!r} is not one of {list(STATES)}")
    status.setdefault("created", now_iso())
    status.setdefault("attempts", 0)
    status.update(fields)
    status["updated"] = now_iso()
    atomic_write_json(Path(run_dir) / "status.json", status)
    return status


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Deletes the temporary files of interrupted atomic writes anywhere in a run folder; returns them.

    Only the holder of the folder's lease may call this: another writer's temp file is its write in flight.
    """
    removed = []
    for p in Path(run_dir).rglob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def set_aside_results(run_dir: str | Path) -> str | None:
    """Moves evals/ and samples/ into superseded/restart_<k>/ (results of a run started over); returns that
    folder relative to run_dir, or None when there was nothing to move."""
    run_dir = Path(run_dir)
    moving = [run_dir / name for name in ("evals", "samples") if (run_dir / name).exists()]
    if not moving:
        return None
    k = 1
    while (run_dir / SET_ASIDE_DIR / f"restart_{k}").exists():
        k += 1
    dest = run_dir / SET_ASIDE_DIR / f"restart_{k}"
    dest.mkdir(parents=True)
    for src in moving:
        os.replace(src, dest / src.name)
    _fsync_dir(run_dir)
    return str(dest.relative_to(run_dir))
