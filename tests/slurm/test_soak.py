"""The chaos soak (python -m harness.soak, docs/soak.md), short: 4 cells on the real cluster, a few overlapping
faults of every kind, and every invariant's count 0 at the end: no step trained twice, one evaluation record per
(cell, step, settings), final weights bit for bit those of an undisturbed run, no temp file or lease left, every
cell finished, and a last relaunch that does nothing.

The long version (100+ faults over 20+ minutes, 8 cells) is the command itself; docs/soak.md has its numbers.
"""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from harness import soak

REPO = Path(__file__).resolve().parents[2]
SEED = 7  # a schedule whose 8 faults span jobs, daemons, the sweep and files (see test_the_short_schedule_...)
SHORT = ["--cells", "4", "--faults", "8", "--minutes", "1.5", "--steps", "600", "--ckpt-every", "30",
         "--max-minutes", "12"]
SOAK_TIMEOUT_S = 15 * 60  # --max-minutes bounds the soak; this bounds the test if the soak itself hangs


def run_soak(out, cluster_dir, *args):
    cmd = [sys.executable, "-m", "harness.soak", "--out", str(out), "--cluster-dir", str(cluster_dir), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S)


def test_the_schedule_is_a_function_of_the_seed():
    a = soak.make_schedule(SEED, 40, 5.0)
    assert a == soak.make_schedule(SEED, 40, 5.0)
    assert a != soak.make_schedule(SEED + 1, 40, 5.0)
    assert [f.at_s for f in a] == sorted(f.at_s for f in a)
    assert all(5.0 * 60 * soak.WARMUP_FRACTION <= f.at_s <= 5.0 * 60 for f in a)
    assert all(0 <= f.pick < 1 and 0 <= f.param < 1 for f in a)
    only = soak.make_schedule(SEED, 40, 5.0, {"scancel": 1.0, "tear_status": 1.0})
    assert {f.kind for f in only} == {"scancel", "tear_status"}


def test_the_short_schedule_covers_jobs_daemons_the_sweep_and_files():
    kinds = {f.kind for f in soak.make_schedule(SEED, 8, 1.5)}
    families = [set(soak.JOB_KINDS) | {"sigkill"}, {"restart_ctld", "stop_slurmd"}, {"relaunch", "kill_sweep"},
                set(soak.TEAR_FILES)]
    assert all(kinds & family for family in families), kinds


@pytest.mark.parametrize("args,named", [
    (["--cells", "0"], "--cells=0"),
    (["--steps", "2"], "--steps=2"),
    (["--kinds", "scancel,meteor"], "meteor"),
    (["--ckpt-every", "900", "--steps", "600"], "--ckpt-every=900"),
    (["--max-minutes", "1", "--minutes", "2"], "--max-minutes=1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, slurm_cluster, args, named):
    r = run_soak(tmp_path / "out", slurm_cluster.dir, *args)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and named in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_short_soak_breaks_no_invariant(tmp_path, slurm_cluster):
    out = tmp_path / "soak"
    r = run_soak(out, slurm_cluster.dir, "--seed", str(SEED), *SHORT)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    assert report is not None, r.stdout[-3000:] + r.stderr[-3000:]
    detail = json.dumps({k: v for k, v in report["invariants"].items() if v.get("count")}, indent=1)[:6000]
    assert report["settled"], (report["notes"], r.stderr[-3000:])
    assert report["invariant_counts"] == {name: 0 for name in soak.INVARIANTS}, detail
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "report.md").read_text().startswith(f"# Chaos soak, seed {SEED}")
    assert report["invariants"]["final_weights_differ"]["cells_compared"] == 4
    assert len(report["faults"]) == 8
    # Most faults found something to hit (the others are recorded with why not).
    assert report["faults_applied"] >= 4, report["faults_by_kind"]
    assert json.loads((out / "schedule.json").read_text())["faults"] == [
        json.loads(json.dumps(asdict(f))) for f in soak.make_schedule(SEED, 8, 1.5)]
