"""One writer per cell: the run-folder lease against real racing processes, kills, stalls and torn files.

The competing processes run this file as a script (`python tests/test_lease.py MODE JSON`), so nothing
under test is mocked; timings are scaled down through the lease's own parameters.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.core import lease as lease_mod
from harness.core.lease import (
    LEASE_FILE,
    REQUEUE_MARGIN_S,
    CellLease,
    LeaseHeld,
    LeaseLost,
    default_wait_s,
    read_lease,
)
from harness.core.runfolder import atomic_write_bytes, atomic_write_json

FAST = {"heartbeat_s": 0.05, "stale_after_s": 0.5, "poll_s": 0.005, "settle_s": 0.005}


# ---- the competing processes ----

def _emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _hold(run_dir: str, opts: dict) -> int:
    """Take the lease at opts["start_at"] (time.time()), hold it for hold_s calling check() like a
    trainer at step boundaries. Exit 0 after release, 3 refused (LeaseHeld), 4 lost (LeaseLost)."""
    time.sleep(max(0.0, opts.pop("start_at", 0.0) - time.time()))
    hold_s = opts.pop("hold_s")
    try:
        lease = CellLease(run_dir, "test", **opts).acquire()
    except LeaseHeld as e:
        _emit(event="held", message=str(e))
        return 3
    _emit(event="acquired", pid=os.getpid(), token=lease.token, t=time.monotonic())
    try:
        end = time.monotonic() + hold_s
        while time.monotonic() < end:
            lease.check()
            time.sleep(0.005)
    except LeaseLost as e:
        _emit(event="lost", message=str(e))
        lease.release()
        return 4
    t = time.monotonic()
    lease.release()
    _emit(event="released", t=t)
    return 0


def _count(run_dir: str, opts: dict) -> int:
    """Add 1 to <run_dir>/counter `iterations` times under the lease, with a pause between read and write
    that loses updates unless the lease excludes the others."""
    counter = Path(run_dir) / "counter"
    for _ in range(opts.pop("iterations")):
        with CellLease(run_dir, "test", wait_s=None, **opts):
            value = int(counter.read_text()) if counter.exists() else 0
            time.sleep(0.001)
            atomic_write_bytes(counter, f"{value + 1}\n".encode())
    return 0


def _intervals(run_dir: str, opts: dict) -> int:
    """Random start delays, waits and hold times; append "token start end" (CLOCK_MONOTONIC, shared by
    all processes of the machine) for every hold to opts["log"]; now and then exit while holding."""
    rng = random.Random(opts.pop("seed"))
    log_path, iterations, die_at = Path(opts.pop("log")), opts.pop("iterations"), opts.pop("die_at")
    holds = 0
    time.sleep(max(0.0, opts.pop("start_at") - time.time()))
    for _ in range(iterations):
        time.sleep(rng.uniform(0.0, 0.02))
        wait_s = rng.choice([0.0, 0.01, 0.05, None])
        try:
            lease = CellLease(run_dir, "test", wait_s=wait_s, **opts).acquire()
        except LeaseHeld:
            _emit(event="refused")
            continue
        start = time.monotonic()
        if read_lease(run_dir)["took_over"] is not None:
            _emit(event="took_over")
        time.sleep(rng.uniform(0.0, 0.01))
        lease.check()
        end = time.monotonic()
        with open(log_path, "a") as f:
            f.write(f"{lease.token} {start!r} {end!r}\n")
            f.flush()
        holds += 1
        if holds == die_at or rng.random() < 0.05:
            os._exit(0)  # die holding it: the next holder relies on the dead-pid rule
        lease.release()
    return 0


def _run_worker(argv: list[str]) -> int:
    mode, run_dir, opts = argv[0], argv[1], json.loads(argv[2])
    return {"hold": _hold, "count": _count, "intervals": _intervals}[mode](run_dir, opts)


# ---- helpers ----

def _spawn(mode: str, run_dir: Path, **opts) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, __file__, mode, str(run_dir), json.dumps(opts)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _events(proc: subprocess.Popen, timeout_s: float = 30.0) -> tuple[int, list[dict]]:
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _first_event(proc: subprocess.Popen, timeout_s: float = 10.0) -> dict:
    """The first JSON line the process prints (it keeps running)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert result and result[0], f"no event from pid {proc.pid}"
    return json.loads(result[0])


def _foreign_record(**fields) -> dict:
    rec = {"version": 1, "token": "f" * 32, "purpose": "train", "host": "node-elsewhere", "pid": 4242,
           "pid_start": None, "boot_id": None, "pid_ns": None, "slurm": None, "started": "then",
           "heartbeat_s": 30.0, "stale_after_s": 60.0}
    rec.update(fields)
    return rec


def _set_age(path: Path, age_s: float) -> None:
    t = time.time() - age_s
    os.utime(path, (t, t))


def _overlaps(intervals: list[tuple[str, float, float]]) -> list[tuple]:
    """Pairs of holds of different tokens that overlap in time (sorted by start)."""
    out = []
    ordered = sorted(intervals, key=lambda iv: iv[1])
    for a, b in zip(ordered, ordered[1:]):
        if b[1] < a[2] and a[0] != b[0]:
            out.append((a, b))
    return out


# ---- racing processes ----

@pytest.mark.process
@pytest.mark.parametrize("use_lock", [True, False])
def test_two_processes_race_and_exactly_one_wins(tmp_path, use_lock):
    start_at = time.time() + 0.5
    procs = [_spawn("hold", tmp_path, start_at=start_at, hold_s=1.0, wait_s=0, use_lock=use_lock, **FAST)
             for _ in range(2)]
    results = [_events(p) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 3], results
    winner = next(ev for rc, ev in results if rc == 0)[0]
    refusal = next(ev for rc, ev in results if rc == 3)[0]["message"]
    assert f"pid {winner['pid']} on {os.uname().nodename}" in refusal
    assert "delete" in refusal and LEASE_FILE in refusal and "\n" not in refusal
    assert read_lease(tmp_path) is None  # the winner released


@pytest.mark.process
def test_a_waiting_process_gets_the_lease_after_the_holder_releases(tmp_path):
    start_at = time.time() + 0.5
    procs = [_spawn("hold", tmp_path, start_at=start_at, hold_s=0.4, wait_s=10, **FAST) for _ in range(2)]
    results = [_events(p) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    (first_in, first_out), (second_in, _) = sorted(
        ((ev[0]["t"], ev[1]["t"]) for _, ev in results), key=lambda pair: pair[0])
    assert second_in >= first_out  # no overlap: the second entered after the first let go
    assert second_in - first_in >= 0.4


@pytest.mark.process
@pytest.mark.parametrize("use_lock", [True, False])
def test_counter_stress_loses_no_update(tmp_path, use_lock):
    procs, iterations = 4, 25
    opts = {**FAST, "settle_s": 0.002, "poll_s": 0.002, "use_lock": use_lock}
    workers = [_spawn("count", tmp_path, iterations=iterations, **opts) for _ in range(procs)]
    assert [_events(w, timeout_s=60)[0] for w in workers] == [0] * procs
    assert int((tmp_path / "counter").read_text()) == procs * iterations
    assert read_lease(tmp_path) is None


@pytest.mark.process
def test_random_interleavings_never_have_two_holders(tmp_path):
    """Property: over random start delays, waits, hold times and deaths while holding, across processes
    with and without the fcntl lock, no two holds of the lease overlap in time."""
    rounds, total_holds, total_refusals, total_takeovers = 8, 0, 0, 0
    for seed in range(rounds):
        rng = random.Random(seed)
        run_dir, log_path = tmp_path / f"round{seed}", tmp_path / f"round{seed}.log"
        n_procs, iterations = rng.randint(3, 5), rng.randint(8, 14)
        opts = {**FAST, "settle_s": rng.choice([0.0, 0.002, 0.01]), "use_lock": seed % 2 == 0}
        start_at = time.time() + 0.4
        # the first process surely dies holding, early on, so that every round has a takeover
        workers = [_spawn("intervals", run_dir, seed=seed * 100 + k, log=str(log_path), iterations=iterations,
                          die_at=3 if k == 0 else 0, start_at=start_at, **opts) for k in range(n_procs)]
        for w in workers:
            rc, events = _events(w, timeout_s=60)
            assert rc == 0, w.stderr
            total_refusals += sum(ev["event"] == "refused" for ev in events)
            total_takeovers += sum(ev["event"] == "took_over" for ev in events)
        intervals = [(tok, float(a), float(b)) for tok, a, b in
                     (line.split() for line in log_path.read_text().splitlines())]
        assert not _overlaps(intervals), f"seed {seed}: two holders at once: {_overlaps(intervals)[:3]}"
        assert len({tok for tok, _, _ in intervals}) == len(intervals)  # a fresh token per hold
        total_holds += len(intervals)
    print(f"{rounds} rounds: {total_holds} holds, {total_refusals} refusals, {total_takeovers} takeovers")
    # not vacuous: the processes really contended (some were refused), most got through, and holders that
    # died holding were taken over
    assert total_refusals > 0 and total_holds > rounds * 10 and total_takeovers > 0


def test_the_overlap_check_sees_an_overlap():
    assert _overlaps([("a", 0.0, 1.0), ("b", 0.5, 2.0)])
    assert not _overlaps([("a", 0.0, 1.0), ("b", 1.0, 2.0)])


# ---- dead, remote and stale holders ----

@pytest.mark.process
def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(tmp_path):
    proc = _spawn("hold", tmp_path, hold_s=60, wait_s=0, heartbeat_s=0.05, stale_after_s=60)
    acquired = _first_event(proc)
    assert acquired["event"] == "acquired"
    proc.kill()
    proc.wait()
    assert read_lease(tmp_path)["stale_reason"] == "its process is gone (same host)"
    t0 = time.monotonic()
    with CellLease(tmp_path, "train", wait_s=0, heartbeat_s=1, stale_after_s=60, settle_s=0.005) as lease:
        assert time.monotonic() - t0 < 2.0  # not the 60 s stale time
        rec = read_lease(tmp_path)
        assert rec["token"] == lease.token and rec["took_over"]["pid"] == acquired["pid"]


@pytest.mark.process
def test_a_killed_but_unreaped_holder_counts_as_gone(tmp_path):
    proc = _spawn("hold", tmp_path, hold_s=60, wait_s=0, heartbeat_s=0.05, stale_after_s=60)
    assert _first_event(proc)["event"] == "acquired"
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while lease_mod._proc_stat(proc.pid)[0] != "Z":  # a zombie: os.kill(pid, 0) still succeeds
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with CellLease(tmp_path, "train", wait_s=0, heartbeat_s=1, stale_after_s=60, settle_s=0.005):
        pass
    proc.wait()


def test_a_fresh_lease_from_another_host_blocks_and_an_old_one_is_taken_over(tmp_path):
    atomic_write_json(tmp_path / LEASE_FILE, _foreign_record())
    assert not read_lease(tmp_path)["held_here"]
    with pytest.raises(LeaseHeld) as refused:
        CellLease(tmp_path, "train", wait_s=0, settle_s=0.005).acquire()
    assert "node-elsewhere" in str(refused.value) and "pid 4242" in str(refused.value)
    assert refused.value.holder["token"] == "f" * 32
    _set_age(tmp_path / LEASE_FILE, 61)  # past the holder's own stale_after_s of 60
    with CellLease(tmp_path, "train", wait_s=0, settle_s=0.005):
        assert read_lease(tmp_path)["took_over"]["host"] == "node-elsewhere"


@pytest.mark.process
def test_a_dead_pid_counts_only_on_this_very_machine_and_namespace(tmp_path):
    """Same host name but another boot (another machine, or a container sharing the name): the pid says
    nothing, so the heartbeat decides."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = lease_mod._identity()
    atomic_write_json(tmp_path / LEASE_FILE, _foreign_record(host=here["host"], pid=dead.pid, boot_id="another"))
    rec = read_lease(tmp_path)
    assert not rec["stale"]
    atomic_write_json(tmp_path / LEASE_FILE, _foreign_record(host=here["host"], pid=dead.pid,
                                                             boot_id=here["boot_id"], pid_ns=here["pid_ns"]))
    assert read_lease(tmp_path)["stale"]


def test_the_heartbeat_advances_while_held(tmp_path):
    with CellLease(tmp_path, "train", **FAST) as lease:
        first = read_lease(tmp_path)["heartbeat_unix"]
        time.sleep(0.3)
        rec = read_lease(tmp_path)
        assert rec["heartbeat_unix"] > first and rec["age_s"] < 0.2 and not rec["stale"]
        assert rec["token"] == lease.token and not lease.lost and rec["held_here"]


@pytest.mark.process
def test_a_stalled_holder_is_taken_over_and_told_it_lost(tmp_path):
    proc = _spawn("hold", tmp_path, hold_s=30, wait_s=0, **FAST)
    assert _first_event(proc)["event"] == "acquired"
    os.kill(proc.pid, signal.SIGSTOP)  # its heartbeat stops, as in a long hang
    try:
        with pytest.raises(LeaseHeld):
            CellLease(tmp_path, "train", wait_s=0, **FAST).acquire()  # not yet stale
        time.sleep(0.7)
        with CellLease(tmp_path, "train", wait_s=0, **FAST) as lease:
            os.kill(proc.pid, signal.SIGCONT)
            rc, events = _events(proc)
            assert rc == 4 and events[-1]["event"] == "lost"
            assert f"pid {os.getpid()}" in events[-1]["message"]  # names who holds it now
            assert read_lease(tmp_path)["token"] == lease.token  # its release left our lease alone
            assert not lease.lost
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    assert read_lease(tmp_path) is None


def test_a_lease_replaced_under_us_is_reported_lost_and_never_deleted(tmp_path):
    lease = CellLease(tmp_path, "train", **FAST).acquire()
    foreign = _foreign_record(stale_after_s=600)
    atomic_write_json(tmp_path / LEASE_FILE, foreign)
    deadline = time.monotonic() + 5
    while not lease.lost:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(LeaseLost, match="node-elsewhere"):
        lease.check()
    lease.release()
    assert read_lease(tmp_path)["token"] == foreign["token"]


def test_release_checks_the_token_before_it_deletes(tmp_path):
    # a long heartbeat: the swap is not noticed before release, so release itself must check
    lease = CellLease(tmp_path, "train", heartbeat_s=10, stale_after_s=60, settle_s=0.005).acquire()
    atomic_write_json(tmp_path / LEASE_FILE, _foreign_record())
    before = (tmp_path / LEASE_FILE).read_bytes()
    lease.release()
    assert (tmp_path / LEASE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lease.lock", LEASE_FILE]  # nothing left aside


# ---- torn files, re-entrancy, release ----

@pytest.mark.parametrize("content", [b'{"token": "ab', b"[1, 2]", b'{"pid": 3}', b"\xff\xfe"])
def test_a_torn_lease_file_is_reported_and_blocks_until_it_ages(tmp_path, content):
    path = tmp_path / LEASE_FILE
    path.write_bytes(content)
    rec = read_lease(tmp_path, stale_after_s=60)
    assert rec["unreadable"] and rec["token"] is None and not rec["stale"] and rec["error"]
    with pytest.raises(LeaseHeld, match="unreadable"):
        CellLease(tmp_path, "train", wait_s=0, heartbeat_s=1, stale_after_s=60, settle_s=0.005).acquire()
    _set_age(path, 61)
    assert read_lease(tmp_path, stale_after_s=60)["stale"]
    with CellLease(tmp_path, "train", wait_s=0, heartbeat_s=1, stale_after_s=60, settle_s=0.005) as lease:
        assert read_lease(tmp_path)["token"] == lease.token


def test_read_lease_never_raises(tmp_path):
    assert read_lease(tmp_path) is None
    assert read_lease(tmp_path / "missing") is None
    (tmp_path / LEASE_FILE).mkdir()
    rec = read_lease(tmp_path)
    assert rec["unreadable"] and "IsADirectoryError" in rec["error"]


def test_reentrant_in_one_process_and_across_its_threads(tmp_path):
    with CellLease(tmp_path, "sweep", **FAST) as outer:
        with CellLease(tmp_path, "train", wait_s=0, **FAST) as inner:
            assert inner.reentered and inner.token == outer.token
        seen: list = []
        t = threading.Thread(target=lambda: seen.append(CellLease(tmp_path, "evaluate", wait_s=0).acquire()))
        t.start()
        t.join()
        assert seen[0].reentered
        seen[0].release()
        assert read_lease(tmp_path)["token"] == outer.token  # inner holds released, the lease stays
        assert read_lease(tmp_path)["purpose"] == "sweep"
    assert read_lease(tmp_path) is None


def test_release_twice_and_release_unheld_are_harmless(tmp_path):
    lease = CellLease(tmp_path, "train", **FAST)
    lease.release()
    lease.acquire()
    lease.release()
    lease.release()
    assert read_lease(tmp_path) is None and not lease.held
    with pytest.raises(RuntimeError, match="not held"):
        lease.check()


def test_released_on_exception(tmp_path):
    with pytest.raises(KeyError), CellLease(tmp_path, "train", **FAST):
        raise KeyError("boom")
    assert read_lease(tmp_path) is None


def test_a_forked_child_does_not_inherit_the_hold(tmp_path):
    with CellLease(tmp_path, "train", **FAST):
        pid = os.fork()
        if pid == 0:  # the child: the parent's hold must not be joined
            try:
                CellLease(tmp_path, "evaluate", wait_s=0, **FAST).acquire()
                code = 1
            except LeaseHeld as e:
                code = 0 if f"pid {os.getppid()}" in str(e) else 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert read_lease(tmp_path) is not None


def _no_link(src, dst):
    raise OSError(errno.EPERM, "Operation not permitted")


def _symlink_instead(src, dst):  # what BeeGFS does with sysCreateHardlinksAsSymlinks
    os.symlink(src, dst)


@pytest.mark.parametrize("fake_link", [_no_link, _symlink_instead])
def test_without_hard_links_the_lease_is_still_exclusive(tmp_path, monkeypatch, fake_link):
    monkeypatch.setattr(os, "link", fake_link)
    path = tmp_path / LEASE_FILE
    assert lease_mod._create(path, _foreign_record(token="a" * 32))
    assert not lease_mod._create(path, _foreign_record(token="b" * 32))
    assert read_lease(tmp_path)["token"] == "a" * 32 and not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE_FILE]
    with CellLease(tmp_path / "cell", "train", **FAST) as lease:  # and the whole cycle works
        assert read_lease(tmp_path / "cell")["token"] == lease.token
    assert read_lease(tmp_path / "cell") is None


def test_a_dangling_symlink_counts_as_an_unreadable_lease(tmp_path):
    (tmp_path / LEASE_FILE).symlink_to(tmp_path / "gone")
    rec = read_lease(tmp_path)
    assert rec["unreadable"] and "symbolic link" in rec["error"] and not rec["stale"]


@pytest.mark.process
def test_the_lease_is_infrastructure_and_imports_no_torch():
    code = "import sys, harness.core.lease; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_timings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="stale_after_s"):
        CellLease(tmp_path, "train", heartbeat_s=30, stale_after_s=60)


# ---- the SLURM policy ----

def test_default_wait_policy():
    requeued = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    holder = {"stale_after_s": 600.0, "slurm": {"job_id": "77", "restart_count": 0}}
    assert default_wait_s(holder, env={}) == 0.0  # started by hand
    assert default_wait_s(holder, env={"SLURM_JOB_ID": "77"}) == 0.0  # a first attempt
    assert default_wait_s(holder, env=requeued) == 600.0 + REQUEUE_MARGIN_S  # its own previous attempt
    assert default_wait_s(None, env=requeued, stale_after_s=100) == 100 + REQUEUE_MARGIN_S
    other = {"stale_after_s": 600.0, "slurm": {"job_id": "78", "restart_count": 0}}
    assert default_wait_s(other, env=requeued) == 0.0  # another job runs the cell
    same_attempt = {"stale_after_s": 600.0, "slurm": {"job_id": "77", "restart_count": 1}}
    assert default_wait_s(same_attempt, env=requeued) == 0.0
    array_env = {"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "80", "SLURM_ARRAY_TASK_ID": "3",
                 "SLURM_RESTART_COUNT": "2"}
    array_holder = {"stale_after_s": 5.0, "slurm": {"job_id": "90", "array_job_id": "80", "array_task_id": "3",
                                                    "restart_count": 1}}
    assert default_wait_s(array_holder, env=array_env) == 5.0 + REQUEUE_MARGIN_S
    sibling = {**array_holder, "slurm": {**array_holder["slurm"], "array_task_id": "4"}}
    assert default_wait_s(sibling, env=array_env) == 0.0


def test_a_requeue_waits_for_its_previous_attempt_and_refuses_another_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    atomic_write_json(tmp_path / LEASE_FILE, _foreign_record(stale_after_s=0.5, slurm={"job_id": "78"}))
    with pytest.raises(LeaseHeld):
        CellLease(tmp_path, "train", wait_s=default_wait_s, **FAST).acquire()
    atomic_write_json(tmp_path / LEASE_FILE, _foreign_record(stale_after_s=0.5,
                                                             slurm={"job_id": "77", "restart_count": 0}))
    t0 = time.monotonic()
    with CellLease(tmp_path, "train", wait_s=default_wait_s, **FAST):
        waited_s = time.monotonic() - t0
    assert 0.3 < waited_s < 5.0  # waited for its heartbeat to go stale, then took over


if __name__ == "__main__":
    sys.exit(_run_worker(sys.argv[1:]))


def test_the_lease_of_a_job_that_ended_does_not_keep_its_failure_unrecorded():
    # A job killed on another node leaves a lease that looks live for minutes; the sweep, told the job ended,
    # records the failure when the lease is that job's own, never when another live process holds the folder.
    from harness.sweep import held_by_ended_job_or_nobody

    plain = {"slurm": lease_mod.slurm_attempt({"SLURM_JOB_ID": "812"}), "stale": False}
    array = {"slurm": lease_mod.slurm_attempt({"SLURM_JOB_ID": "815", "SLURM_ARRAY_JOB_ID": "810",
                                           "SLURM_ARRAY_TASK_ID": "5"}), "stale": False}
    assert held_by_ended_job_or_nobody(None, "812") and held_by_ended_job_or_nobody({**plain, "stale": True}, "999")
    assert held_by_ended_job_or_nobody(plain, "812") and not held_by_ended_job_or_nobody(plain, "813")
    assert held_by_ended_job_or_nobody(array, "810_5") and not held_by_ended_job_or_nobody(array, "810_6")
    assert held_by_ended_job_or_nobody(array, "815")
    assert not held_by_ended_job_or_nobody({"slurm": None, "stale": False}, "812")  # a process outside SLURM


def _record_many(sweep_dir: str, worker: int, n: int) -> None:
    from omegaconf import OmegaConf

    from harness.sweep import _record_sweep

    for j in range(n):
        _record_sweep(Path(sweep_dir), OmegaConf.create({"sweep_name": "together"}), [f"cell-{worker}-{j}"])


def test_sweeps_launched_together_into_one_folder_each_keep_their_cells_in_sweep_json(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_record_many, args=(str(tmp_path), w, 25)) for w in range(6)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0] * 6
    grid = json.loads((tmp_path / "sweep.json").read_text())["grid"]
    assert sorted(grid) == sorted(f"cell-{w}-{j}" for w in range(6) for j in range(25))  # none lost
