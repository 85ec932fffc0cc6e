"""One writer per cell: a lease on a run folder, taken by training and by evaluation (docs/lease.md).

    with CellLease(run_dir, "train", wait_s=default_wait_s) as lease:
        ...                      # lease.check() at step boundaries raises LeaseLost if it was taken over

The lease is `<run_dir>/lease.json`: who holds it (host, pid, SLURM job, purpose, start time, a random
token) and the holder's own staleness contract (`heartbeat_s`, `stale_after_s`). The heartbeat is the
file's modification time, touched by a background thread every `heartbeat_s`; the content is written
once, when the lease is taken, and never rewritten. A lease is stale, and may be broken, when its
heartbeat is older than the holder's `stale_after_s`, or at once when its holder ran on this machine
(same host name, boot and pid namespace) and its process is gone: a SIGKILLed attempt must not block
the next one for ten minutes.

How acquisition stays safe against racing processes on file systems whose locks may lie:
- A lease file only ever comes into existence by an exclusive create: the record is written to a
  private temporary file and hard-linked to `lease.json`, and link(2) fails if the name exists, decided
  by the file server in one operation (NFSv3/v4, Lustre, GPFS, BeeGFS alike); where a file system has no
  hard links, an O_EXCL create. Two acquirers of a free cell cannot both succeed, with or without locks.
- A stale lease is broken by renaming it to a private name (of several breakers only one can move a
  given file) and judging the moved file again: still stale, it is deleted; fresh (its holder came back,
  or someone took the cell meanwhile), it is linked back.
- The heartbeat only touches the mtime, so a holder that stalls between its check and its touch can
  never overwrite a successor's lease. Release renames the lease aside, deletes it only if the token is
  ours and otherwise links it back: someone else's lease is never deleted.
- Where POSIX locks work across nodes (NFS with lockd or v4, Lustre `-o flock`, GPFS, BeeGFS with
  tuneUseGlobalFileLocks), an fcntl lock on `<run_dir>/.lease.lock` serialises every read-check-write.
  Where they fail (Lustre `-o noflock` returns ENOSYS) the lease goes on without them; where they are
  silently node-local (Lustre `-o localflock`, BeeGFS by default, NFS `-o nolock`) they serialise one node.
- After taking the lease the acquirer waits `settle_s` and reads its token back.

Remaining risks. Without cross-node locks: when a stale lease is broken by two processes while a third
finds the name free in the instant between a breaker's rename and its link back, two holders can
overlap until the older one's next heartbeat (at most `heartbeat_s`), which finds the foreign token
and reports the lease lost. Always: no lease fences a write already under way. A holder frozen for
longer than `stale_after_s` (SIGSTOP, a hung mount) and taken over finishes the write it was frozen in;
the trainer checks at step boundaries, so at most one step's writes land. Staleness compares clocks of
two nodes, so they must agree to well within `stale_after_s` (NTP keeps them within a second).

Standard library only (plus harness.core.runfolder): the lease is infrastructure and must not import torch,
which is also why it reads the SLURM variables itself rather than through harness.core.distributed.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import math
import os
import pwd
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.core.cli import Refused  # a refusal is said in one line by every command
from harness.core.runfolder import now_iso

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"
LOCK_FILE = ".lease.lock"  # empty; only ever fcntl-locked, never deleted (deleting a lock file races)
RECORD_VERSION = 1

# A heartbeat every 30 s costs two metadata operations per cell, negligible for a metadata server even
# with thousands of cells, and bounds how long a taken-over holder keeps going before it notices.
HEARTBEAT_S = 30.0
# Important: breaking a live lease costs a corrupted cell, waiting too long costs idle minutes once per
# crash, so err long: 20 missed heartbeats outlast a Lustre client recovery (minutes), an NFS hard-mount
# retry cycle (timeo=60 s x retrans) and a multi-GB checkpoint write to a busy file system.
STALE_AFTER_S = 600.0
# How often a waiting acquirer looks again; a lease changes hands once per attempt, minutes apart.
POLL_S = 5.0
# Read-back delay after taking the lease: many metadata round trips on a cluster network, so a racer
# that read the old state just before us has landed its link or rename; a slower one is caught by the
# heartbeat's token check.
SETTLE_S = 0.2
# A requeued SLURM job waits for its previous attempt up to the stale time plus this: a few polls and
# any clock skew between the nodes.
REQUEUE_MARGIN_S = 60.0
# The fcntl lock is held for a read, a link and settle_s; busy for longer than this means a hung or
# crashed client holds it, and the acquirer goes on without it.
MUTEX_WAIT_S = 30.0
# Immediate retries when the lease file vanished or changed hands during one attempt (a breaker or a
# releaser moving it away and linking it back) before counting the attempt as blocked.
_CHANGED_HANDS_RETRIES = 5
# errno values saying the file system has no hard links: take the lease with O_EXCL instead.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}

# Jitter for polling from a private generator: drawing from the module-level `random` would perturb a
# caller's seeded stream.
_JITTER = random.Random()


class LeaseHeld(Refused):
    """Another live process holds the cell's lease. `holder` is its read_lease() record (None if the lease
    kept changing hands), `path` the lease file, `waited_s` how long this process waited."""

    def __init__(self, message: str, holder: dict | None, path: Path, waited_s: float):
        super().__init__(message)
        self.holder, self.path, self.waited_s = holder, path, waited_s


class LeaseLost(RuntimeError):
    """Our lease was taken over (our heartbeat stalled past the stale time) or removed by hand: stop
    without writing. `holder` is the record found in its place (None if the file is gone)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


# ---- who we are ----

def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of a process from /proc, None if unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _boot_id() -> str | None:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def slurm_attempt(env: Mapping[str, str] | None = None) -> dict | None:
    """This process's SLURM job as {"job_id", "array_job_id", "array_task_id", "restart_count"} (ids are
    strings or None, restart_count an int: 0 on the first attempt), or None outside SLURM."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    try:
        restarts = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = 0
    return {"job_id": env["SLURM_JOB_ID"], "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
            "array_task_id": env.get("SLURM_ARRAY_TASK_ID"), "restart_count": restarts}


def _identity() -> dict:
    """The fields of a lease record that say which process on which machine holds it."""
    stat = _proc_stat(os.getpid())
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": stat[1] if stat else None,
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "user": _user(), "slurm": slurm_attempt()}


def _user() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry, as in some containers
        return os.environ.get("USER")


def _holder_is_gone(rec: dict) -> bool:
    """True only when the holder provably ran on this machine, in this pid namespace, since this boot, and
    its process no longer exists (or the pid now belongs to a later process, or is a zombie). Anything
    unsure (another host, a container sharing our host name, no /proc) is False: the heartbeat decides."""
    if rec.get("host") != socket.gethostname():
        return False
    if rec.get("boot_id") != _boot_id() or rec.get("pid_ns") != _pid_namespace():
        return False
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, another user's
    except (OSError, OverflowError):
        return False  # a pid this system cannot even hold: say nothing, let the heartbeat decide
    stat = _proc_stat(pid)
    if stat is None:
        return False
    state, start = stat
    if state in ("Z", "X"):  # exited, not yet reaped by its parent
        return True
    return rec.get("pid_start") is not None and start != rec.get("pid_start")


# ---- reading a lease ----

def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def _read_record(path: Path, stale_after_s: float, now_s: float | None = None) -> dict | None:
    """The lease file at `path` with the computed fields of read_lease(), or None if there is none.
    Never raises: whatever is there and cannot be read gives an unreadable record."""
    try:
        return _parse_record(path, stale_after_s, now_s)
    except Exception as e:  # status and the heartbeat must survive whatever lies in the folder
        return _unreadable(path, f"{type(e).__name__}: {e}", time.time(), stale_after_s, now_s)


def _parse_record(path: Path, stale_after_s: float, now_s: float | None) -> dict | None:
    try:
        with open(path, "rb") as f:
            # fstat after open: on NFS the open revalidates attributes (close-to-open), a bare stat may
            # answer from a cache up to a minute old
            raw = f.read()
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        if not os.path.lexists(path):
            return None
        # a dangling symbolic link: it occupies the name, so it must count (and age) like a lease
        return _unreadable(path, "a dangling symbolic link", os.lstat(path).st_mtime, stale_after_s, now_s)
    except OSError as e:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            mtime = time.time()
        return _unreadable(path, f"{type(e).__name__}: {e}", mtime, stale_after_s, now_s)
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict) or not isinstance(rec.get("token"), str):
            raise ValueError("not a lease record")
    except (ValueError, UnicodeDecodeError) as e:
        return _unreadable(path, f"{type(e).__name__}: {e}", mtime, stale_after_s, now_s)
    now_s = time.time() if now_s is None else now_s
    recorded = rec.get("stale_after_s")
    # The holder's own contract wins: it knows how often it beats, and every reader then agrees.
    valid = isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and 0 < recorded < math.inf
    stale_s = float(recorded) if valid else float(stale_after_s)
    age_s = max(0.0, now_s - mtime)
    gone = _holder_is_gone(rec)
    if gone:
        reason = "its process is gone (same host)"
    elif age_s > stale_s:
        reason = f"no heartbeat for {age_s:.0f} s (stale after {stale_s:g} s)"
    else:
        reason = None
    held_here = any(h.token == rec["token"] and h.pid == os.getpid() for h in list(_REGISTRY.values()))
    rec.update(path=str(path), unreadable=False, error=None, heartbeat=_iso(mtime), heartbeat_unix=mtime,
               age_s=age_s, stale_after_s=stale_s, stale=reason is not None, stale_reason=reason,
               stale_at=_iso(now_s if gone else mtime + stale_s), held_here=held_here)
    return rec


def _unreadable(path: Path, error: str, mtime: float, stale_after_s: float, now_s: float | None) -> dict:
    # Important: our writers never leave a torn lease (the record is complete before it is linked into
    # place), so an unreadable one is a hand edit, a foreign tool or a glitch of the file system's
    # caches. Breaking it at once could steal a live cell; it is stale once unmodified for the stale time.
    # A live holder of a garbled file finds its token gone and stops touching it, so it ages out.
    now_s = time.time() if now_s is None else now_s
    age_s = max(0.0, now_s - mtime)
    stale = age_s > stale_after_s
    return {"path": str(path), "unreadable": True, "error": error, "token": None, "heartbeat": _iso(mtime),
            "heartbeat_unix": mtime, "age_s": age_s, "stale_after_s": float(stale_after_s), "stale": stale,
            "stale_reason": f"unreadable and unmodified for {age_s:.0f} s" if stale else None,
            "stale_at": _iso(mtime + stale_after_s), "held_here": False}


def read_lease(run_dir: str | Path, *, stale_after_s: float = STALE_AFTER_S, now_s: float | None = None) -> dict | None:
    """The lease on `run_dir`, or None if nobody holds it. Never raises.

    The record holds the file's fields (token, purpose, host, pid, slurm, started, heartbeat_s,
    stale_after_s, ...) plus: path; heartbeat (ISO UTC) and heartbeat_unix (s) from the file's mtime;
    age_s, seconds since that heartbeat; stale (bool), stale_reason (str or None) and stale_at (ISO UTC,
    when it counts as stale if no heartbeat comes); held_here (bool: this very process holds it);
    unreadable (bool) and error (str or None). An unreadable file gives a record with unreadable=True and
    token None. `stale_after_s` applies only to files that do not state their own."""
    return _read_record(Path(run_dir) / LEASE_FILE, stale_after_s, now_s)


def describe_lease(rec: dict) -> str:
    """One line naming a lease's holder: pid, host, purpose, SLURM job, start, heartbeat age."""
    if rec.get("unreadable"):
        return f"an unreadable lease file ({rec.get('error')}), last modified {rec['age_s']:.0f} s ago"
    slurm = rec.get("slurm") if isinstance(rec.get("slurm"), dict) else {}
    job = ""
    if slurm.get("job_id"):
        array = slurm.get("array_job_id")
        job_id = f"{array}_{slurm.get('array_task_id')}" if array else slurm["job_id"]
        job = f", SLURM job {job_id} restart {slurm.get('restart_count', 0)}"
    return (f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} ({rec.get('purpose', '?')}{job}), "
            f"started {rec.get('started', '?')}, heartbeat {rec['age_s']:.0f} s ago")


# ---- the SLURM policy ----

def _same_job(a: Mapping, b: Mapping) -> bool:
    if a.get("array_job_id") and b.get("array_job_id"):
        return (a["array_job_id"], a.get("array_task_id")) == (b["array_job_id"], b.get("array_task_id"))
    return bool(a.get("job_id")) and a.get("job_id") == b.get("job_id")


def default_wait_s(holder: dict | None = None, *, env: Mapping[str, str] | None = None,
                   stale_after_s: float = STALE_AFTER_S) -> float:
    """Seconds to wait for `holder` (a read_lease() record; None: whoever it may be) before giving up.

    0 for a command started by hand and for a first SLURM attempt: a live holder means someone else is
    running the cell, and waiting would only idle a GPU. A requeued SLURM job (SLURM_RESTART_COUNT > 0)
    waits for an earlier attempt of its own job, which may still be draining on another node, until it
    releases or its heartbeat is stale: the holder's stale time plus REQUEUE_MARGIN_S. A requeue facing
    another job's live lease refuses at once too. Pass the function itself as CellLease(wait_s=...) to
    apply it to whichever holder is found."""
    me = slurm_attempt(env)
    if me is None or me["restart_count"] == 0:
        return 0.0
    if holder is None or holder.get("unreadable"):
        return float((holder or {}).get("stale_after_s") or stale_after_s) + REQUEUE_MARGIN_S
    theirs = holder.get("slurm") if isinstance(holder.get("slurm"), dict) else {}
    restarts = theirs.get("restart_count")
    earlier = isinstance(restarts, int) and restarts < me["restart_count"]
    if _same_job(theirs, me) and earlier:
        return float(holder.get("stale_after_s") or stale_after_s) + REQUEUE_MARGIN_S
    return 0.0


# ---- the per-process registry: re-entrancy ----

class _Holding:
    """This process's hold on one run folder: token, refcount, heartbeat thread, lost flag."""

    def __init__(self, key: str, run_dir: Path, token: str, heartbeat_s: float, stale_after_s: float,
                 settle_s: float, use_lock: bool):
        self.key, self.run_dir, self.path, self.token = key, run_dir, run_dir / LEASE_FILE, token
        self.heartbeat_s, self.stale_after_s, self.settle_s, self.use_lock = \
            heartbeat_s, stale_after_s, settle_s, use_lock
        self.refcount = 1
        self.pid = os.getpid()
        self.confirmed_at = time.monotonic()
        self.lost = threading.Event()
        self.lost_holder: dict | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat_forever, name=f"lease-heartbeat-{run_dir.name}",
                                       daemon=True)

    def _beat_forever(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            try:
                if not self.confirm():
                    return
            except OSError as e:
                # a file-system hiccup: keep trying; the stale time is long enough to ride it out
                log.warning("lease heartbeat on %s failed (%s); trying again", self.path, e)

    def confirm(self) -> bool:
        """Touch the heartbeat if the lease is still ours; True if it is (or we are stopping). Otherwise
        marks it lost and returns False. A missing or foreign file is looked at twice, `settle_s` apart,
        since a breaker that moved it to judge it links a fresh one back."""
        for look in range(2):
            rec = _read_record(self.path, self.stale_after_s)
            if rec is not None and rec.get("token") == self.token:
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    rec = None
                else:
                    self.confirmed_at = time.monotonic()
                    return True
            if look == 0 and self.stop.wait(self.settle_s):
                return True
        if self.stop.is_set():
            return True
        self.lost_holder = rec
        self.lost.set()
        log.error("%s", self.lost_message())
        return False

    def lost_message(self) -> str:
        now = f"held by {describe_lease(self.lost_holder)}" if self.lost_holder else "gone"
        return (f"lease on {self.run_dir} was lost (our heartbeat stalled past the stale time, or the file was "
                f"deleted): it is now {now}; stopping without writing")


_REGISTRY: dict[str, _Holding] = {}
_REGISTRY_LOCK = threading.Lock()
_KEY_LOCKS: dict[str, threading.Lock] = {}
_WARNED: set[str] = set()


def _key_lock(key: str) -> threading.Lock:
    with _REGISTRY_LOCK:
        return _KEY_LOCKS.setdefault(key, threading.Lock())


def _reset_after_fork() -> None:
    # A forked child holds nothing: its parent's leases, threads and locks are the parent's.
    global _REGISTRY, _REGISTRY_LOCK, _KEY_LOCKS
    _REGISTRY, _REGISTRY_LOCK, _KEY_LOCKS = {}, threading.Lock(), {}


os.register_at_fork(after_in_child=_reset_after_fork)


# ---- file operations ----

def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


@contextmanager
def _mutex(run_dir: Path, use_lock: bool, wait_s: float) -> Iterator[bool]:
    """An fcntl lock on the folder's lock file for one read-check-write; yields True if held, False if
    locks are off, not supported here, or busy for longer than `wait_s` (a lock held that long belongs
    to a hung client, and the lease is safe without it)."""
    if not use_lock:
        yield False
        return
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        _warn_once(str(run_dir), "cannot open %s (%s): taking the lease without a lock", run_dir / LOCK_FILE, e)
        yield False
        return
    try:
        locked, deadline, pause_s = False, time.monotonic() + wait_s, 0.002
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError as e:
                # EACCES/EAGAIN: held by another; anything else (ENOLCK, ENOSYS, EOPNOTSUPP, ...): no locks here
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    _warn_once(str(run_dir), "POSIX locks are not supported on %s (%s): the lease relies on "
                               "atomic link/rename and a read-back", run_dir, e)
                    break
            if time.monotonic() >= deadline:
                log.warning("the lock on %s was busy for %.0f s: going on without it", run_dir / LOCK_FILE, wait_s)
                break
            time.sleep(pause_s)
            pause_s = min(0.05, pause_s * 2)
        yield locked
    finally:
        os.close(fd)  # closing the descriptor releases the POSIX lock


@contextmanager
def folder_lock(folder: Path, wait_s: float = 30.0) -> Iterator[bool]:
    """Serialises a read-modify-write of a small file in `folder` between processes (sweeps launched together
    into one folder), with the fcntl lock the lease uses; yields whether the lock is held (False where the file
    system has no locks: the write is then as before, atomic but unserialised)."""
    with _mutex(Path(folder), True, wait_s) as locked:
        yield locked


def _link_exclusive(src: Path, dst: Path) -> bool | None:
    """Hard-link `src` to `dst` unless `dst` exists: True if linked, False if `dst` exists, None if this
    file system makes no hard links."""
    try:
        os.link(src, dst)
    except FileExistsError:
        # NFSv3 may retransmit a LINK whose reply was lost and report EEXIST for our own success;
        # the link count tells (the recipe of the Linux open(2) manual page)
        return os.stat(src).st_nlink == 2
    except OSError as e:
        if e.errno in _NO_LINKS:
            return None
        raise
    if os.stat(src).st_nlink == 2:
        return True
    # BeeGFS with sysCreateHardlinksAsSymlinks makes a symbolic link, which dangles once `src` goes:
    # take it away again
    os.unlink(dst)
    return None


def _copy_exclusive(src: Path, dst: Path) -> bool:
    """Create `dst` with O_EXCL holding `src`'s bytes and mtime (the heartbeat); False if `dst` exists.
    A reader may see `dst` before its content is complete: it then counts as unreadable, which blocks
    rather than breaks."""
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    st = os.stat(src)
    os.utime(dst, (st.st_atime, st.st_mtime))
    return True


def _create(path: Path, record: dict) -> bool:
    """Create the lease file with `record` if none exists; True if we created it."""
    # Important: not a `.tmp` name, and not harness.core.runfolder's atomic write (whose temporary file is
    # one): the holder of a folder sweeps `.*.tmp` files away, and this file belongs to a competitor.
    # Written whole before it is linked, so no atomic rename is needed.
    new = path.with_name(f".{path.name}.{record['token']}.new")
    try:
        with open(new, "wb") as f:
            f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        linked = _link_exclusive(new, path)
        return _copy_exclusive(new, path) if linked is None else linked
    except FileNotFoundError:
        return False  # our file was swept away (by hand?): try again
    finally:
        new.unlink(missing_ok=True)


def _take_aside(path: Path, private: Path) -> bool:
    """Rename `path` to our `private` name; True if we moved it (only one of several racers can)."""
    try:
        os.rename(path, private)
        return True
    except FileNotFoundError:
        # gone, or an NFS retransmit of our own successful rename
        return private.exists()


def _put_back(private: Path, path: Path) -> None:
    """Put a lease we moved aside back in place (unless a newer one is there), then drop our name."""
    try:
        linked = _link_exclusive(private, path)
        if (_copy_exclusive(private, path) if linked is None else linked) is False:
            log.warning("could not put back the lease moved aside to %s: a newer lease is in place", private)
    finally:
        private.unlink(missing_ok=True)


def _break(path: Path, rec: dict, token: str, stale_after_s: float) -> bool:
    """Remove the stale lease `rec`; True if it is gone, False if it turned out fresh (put back)."""
    private = path.with_name(f".{path.name}.{token}.breaking")
    if not _take_aside(path, private):
        return True  # someone else removed it
    moved = _read_record(private, stale_after_s)
    if moved is not None and not moved["stale"]:
        _put_back(private, path)
        return False
    log.warning("breaking the stale lease on %s: %s; %s", path.parent,
                describe_lease(rec), rec.get("stale_reason"))
    private.unlink(missing_ok=True)
    return True


def _release_file(path: Path, token: str, stale_after_s: float) -> None:
    """Delete the lease file if its token is `token`; any other lease is put back untouched."""
    private = path.with_name(f".{path.name}.{token}.releasing")
    if not _take_aside(path, private):
        return
    moved = _read_record(private, stale_after_s)
    if moved is not None and moved.get("token") == token:
        private.unlink(missing_ok=True)
    else:
        _put_back(private, path)


# ---- the lease ----

WaitPolicy = Callable[[dict | None], float | None]


class CellLease:
    """The lease on one run folder: a context manager (or acquire()/release()).

    run_dir: the cell's run folder (created if missing). purpose: what the holder does ("train",
    "evaluate", "sweep"), shown to whoever is refused. wait_s: seconds to wait for a live holder (0:
    refuse at once; None: forever), or a function of the holder record returning that, such as
    default_wait_s. stale_after_s: how long our heartbeat may be silent before others may break our lease
    (recorded in the file, so every reader applies the same); heartbeat_s: how often we touch it;
    poll_s: how often a waiting acquirer looks again; settle_s: the read-back delay; use_lock: False
    skips the fcntl lock (for a mount whose lock manager hangs).

    Re-entrant per process: a second CellLease on the same folder in the same process (another thread
    included) shares the first one's hold and only counts; the file goes when the last one releases.
    """

    def __init__(self, run_dir: str | Path, purpose: str, *, wait_s: float | None | WaitPolicy = 0.0,
                 stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 poll_s: float = POLL_S, settle_s: float = SETTLE_S, use_lock: bool = True):
        self.run_dir, self.purpose, self.wait_s = Path(run_dir), purpose, wait_s
        self.path = self.run_dir / LEASE_FILE
        self.stale_after_s, self.heartbeat_s, self.poll_s, self.settle_s = \
            float(stale_after_s), float(heartbeat_s), float(poll_s), float(settle_s)
        self.use_lock = use_lock
        self.reentered = False
        self._holding: _Holding | None = None
        # a stale time of a few heartbeats at least, or one slow beat would let others break a live lease
        if not heartbeat_s > 0 or not stale_after_s >= 3 * heartbeat_s:
            raise ValueError(f"need heartbeat_s > 0 and stale_after_s >= 3 * heartbeat_s, got heartbeat_s="
                             f"{heartbeat_s}, stale_after_s={stale_after_s}")
        if not poll_s > 0 or settle_s < 0:
            raise ValueError(f"need poll_s > 0 and settle_s >= 0, got poll_s={poll_s}, settle_s={settle_s}")

    def __repr__(self) -> str:
        return f"CellLease({str(self.run_dir)!r}, {self.purpose!r}, held={self.held})"

    @property
    def token(self) -> str | None:
        """The random token of our lease file while held, else None."""
        return self._holding.token if self._holding else None

    @property
    def held(self) -> bool:
        """True between acquire() and release() while the lease has not been lost."""
        h = self._holding
        return h is not None and h.pid == os.getpid() and not h.lost.is_set()

    @property
    def lost(self) -> bool:
        """True if the lease was taken over or removed while we held it."""
        return self._holding is not None and self._holding.lost.is_set()

    def check(self) -> None:
        """Raise LeaseLost if the lease is no longer ours. Cheap (a flag) while the heartbeat is recent;
        when our last confirmed heartbeat is older than the stale time (the heartbeat thread is stuck),
        reads the file to be sure. RuntimeError if the lease is not held at all."""
        h = self._holding
        if h is None or h.pid != os.getpid():
            raise RuntimeError(f"the lease on {self.run_dir} is not held by this process")
        if not h.lost.is_set() and time.monotonic() - h.confirmed_at > h.stale_after_s:
            h.confirm()
        if h.lost.is_set():
            raise LeaseLost(h.lost_message(), h.lost_holder)

    def __enter__(self) -> CellLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> CellLease:
        """Take the lease (or join this process's hold on it); returns self. Raises LeaseHeld when a live
        holder is still there after the allowed wait."""
        if self._holding is not None:
            raise RuntimeError(f"{self!r} is already acquired; nest a second CellLease instead")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        key = str(self.run_dir.resolve())
        token = secrets.token_hex(16)  # one token for all attempts: a lease put back by a racer stays ours
        t0 = time.monotonic()
        holder: dict | None = None
        changed_hands = 0
        announced = False
        while True:
            with _key_lock(key):
                joined = self._join(key)
                if joined:
                    return self
                outcome, holder = self._attempt(token)
                if outcome == "won":
                    h = _Holding(key, self.run_dir, token, self.heartbeat_s, self.stale_after_s, self.settle_s,
                                 self.use_lock)
                    _REGISTRY[key] = h
                    h.thread.start()
                    self._holding = h
                    return self
            if outcome == "changed" and changed_hands < _CHANGED_HANDS_RETRIES:
                changed_hands += 1
                continue
            changed_hands = 0
            waited_s = time.monotonic() - t0
            allowed_s = self.wait_s(holder) if callable(self.wait_s) else self.wait_s
            if allowed_s is not None and waited_s >= allowed_s:
                raise LeaseHeld(self._held_message(holder, waited_s), holder, self.path, waited_s)
            if not announced:
                announced = True
                log.info("%s: waiting for the lease held by %s", self.run_dir,
                         describe_lease(holder) if holder else "a process that keeps changing")
            pause_s = self.poll_s * _JITTER.uniform(0.5, 1.0)  # jitter: waiters do not poll in lockstep
            if allowed_s is not None:
                pause_s = min(pause_s, allowed_s - waited_s)
            time.sleep(max(pause_s, 0.0))

    def _join(self, key: str) -> bool:
        """Join this process's live hold on the folder, if there is one; True if joined."""
        h = _REGISTRY.get(key)
        if h is None:
            return False
        if h.pid != os.getpid() or h.lost.is_set():
            del _REGISTRY[key]  # a lost hold is no hold: try afresh and name the new holder
            return False
        h.refcount += 1
        self._holding, self.reentered = h, True
        return True

    def _attempt(self, token: str) -> tuple[str, dict | None]:
        """One try: ("won", None), ("held", holder record) or ("changed", last record seen or None)."""
        with _mutex(self.run_dir, self.use_lock, max(MUTEX_WAIT_S, 10 * self.settle_s)):
            rec = _read_record(self.path, self.stale_after_s)
            if rec is not None and rec.get("token") != token:
                if not rec["stale"]:
                    return "held", rec
                if not _break(self.path, rec, token, self.stale_after_s):
                    return "changed", None
                took_over = {k: rec.get(k) for k in ("host", "pid", "purpose", "slurm", "token", "stale_reason")}
                rec = None
            else:
                took_over = None
            if rec is None:
                record = {"version": RECORD_VERSION, "token": token, "purpose": self.purpose, **_identity(),
                          "started": now_iso(), "heartbeat_s": self.heartbeat_s,
                          "stale_after_s": self.stale_after_s, "took_over": took_over}
                if not _create(self.path, record):
                    return "changed", None
            # a lease already bearing our token is one a racer moved aside and put back: verify it too
            time.sleep(self.settle_s)
            back = _read_record(self.path, self.stale_after_s)
            if back is not None and back.get("token") == token:
                return "won", None
            return "changed", back

    def _held_message(self, holder: dict | None, waited_s: float) -> str:
        waited = f" (waited {waited_s:.0f} s)" if waited_s >= 1 else ""
        if holder is None:
            return f"the lease on {self.run_dir} kept changing hands while we tried to take it{waited}; try again"
        return (f"{self.run_dir} is busy: its lease is held by {describe_lease(holder)}{waited}; it counts as "
                f"stale at {holder['stale_at']} if its heartbeat stops. Wait for it, or if that process is gone, "
                f"delete {self.path}")

    def release(self) -> None:
        """Let go (the file is removed when this process's last hold goes, and only if the token is still
        ours). Releasing twice, or after the lease was lost, is harmless; never raises for file-system
        errors, which are logged (the lease is then left to go stale)."""
        h, self._holding = self._holding, None
        if h is None or h.pid != os.getpid():
            return  # a forked child's copy: the lease is its parent's to release
        # one block under the folder's key lock, so that no thread of this process sees our file after
        # the registry forgot it (it would report this very process as the holder)
        with _key_lock(h.key):
            h.refcount -= 1
            if h.refcount > 0:
                return
            if _REGISTRY.get(h.key) is h:
                del _REGISTRY[h.key]
            h.stop.set()
            if h.thread.is_alive():
                h.thread.join(timeout=h.settle_s + 5.0)  # a beat in progress; never hang a release on a mount
            if h.lost.is_set():
                return
            try:
                with _mutex(h.run_dir, h.use_lock, max(MUTEX_WAIT_S, 10 * h.settle_s)):
                    _release_file(h.path, h.token, h.stale_after_s)
            except OSError as e:
                log.warning("could not remove the lease %s (%s); it goes stale in %.0f s", h.path, e,
                            h.stale_after_s)
