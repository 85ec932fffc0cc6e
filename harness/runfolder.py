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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


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


def read_status(run_dir: str | Path) -> dict:
    return read_json(Path(run_dir) / "status.json", default={}) or {}


def update_status(run_dir: str | Path, **fields: Any) -> dict:
    """Merge `fields` into status.json (atomic) and stamp `updated`; returns the new status."""
    status = read_status(run_dir)
    if "state" in fields and fields["state"] not in STATES:
        raise ValueError(f"state {fields['state']!r} is not one of {list(STATES)}")
    status.setdefault("created", now_iso())
    status.setdefault("attempts", 0)
    status.update(fields)
    status["updated"] = now_iso()
    atomic_write_json(Path(run_dir) / "status.json", status)
    return status
