"""Fixtures for tests that run on the real local SLURM cluster started by tests/slurm/cluster.sh.

Every test in this folder is marked `slurm` and needs the cluster: it skips when the cluster is not up,
or fails when HARNESS_REQUIRE_SLURM=1 (set by .ci/run, which starts the cluster first).
"""

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER_SH = HERE / "cluster.sh"
DEFAULT_DIR = "/tmp/harness-slurm"  # the state folder cluster.sh uses when given none
NOT_UP = "SLURM cluster not up: run bash tests/slurm/cluster.sh up"
CLIENT_TIMEOUT_S = 30  # a SLURM client that has not answered by then never will


@dataclass(frozen=True)
class SlurmCluster:
    """The running cluster, as its env file and `scontrol` describe it."""

    dir: Path
    env: dict  # what DIR/env.sh exports; already in os.environ while the session runs
    partition: str
    node: str
    gpus_per_node: int  # fake GPUs on the node (Gres=gpu:N)
    cpus_per_node: int


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Marks every test in this folder `slurm` (a conftest hook sees the whole session's items), and puts them in one
    xdist group: run in parallel workers (make test), they go to one worker, one after another, as they share the
    one cluster (its queue, its accounting) and some count what it ran."""
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.xdist_group("slurm"))


def read_env_file(path):
    """Returns the variables `export KEY=VALUE` lines of a shell file set, as a dict."""
    env = {}
    for line in Path(path).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def run_client(*args):
    """Runs a SLURM client command; returns its stdout. Raises CalledProcessError or TimeoutExpired."""
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S).stdout


def _not_up(reason):
    message = f"{NOT_UP} ({reason})"
    if os.environ.get("HARNESS_REQUIRE_SLURM") == "1":
        pytest.fail(f"{message}; HARNESS_REQUIRE_SLURM=1 requires it", pytrace=False)
    pytest.skip(message)


def _node_count(node_text, pattern):
    """Returns the integer `pattern` captures from `scontrol show node`, or 0 when it does not appear."""
    m = re.search(pattern, node_text)
    return int(m.group(1)) if m else 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """Exports the cluster's env file into os.environ for the session; yields a SlurmCluster."""
    cluster_dir = Path(os.environ.get("HARNESS_SLURM_DIR", DEFAULT_DIR))
    env_file = cluster_dir / "env.sh"
    if not env_file.is_file():
        _not_up(f"no {env_file}")
    if shutil.which("sinfo") is None:
        _not_up("no sinfo on PATH")
    env = read_env_file(env_file)
    missing = {"SLURM_CONF", "HARNESS_SLURM_PARTITION", "HARNESS_SLURM_NODE"} - env.keys()
    if missing:
        _not_up(f"{env_file} exports no {', '.join(sorted(missing))}: run cluster.sh up again")
    # cluster.sh knows its daemons' pid files: asking it is instant, while sinfo retries for about 10 s.
    status = subprocess.run(
        ["bash", str(CLUSTER_SH), "status", str(cluster_dir)],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    if status.returncode != 0:
        stopped = [line for line in status.stdout.splitlines() if line.endswith("stopped")]
        _not_up(", ".join(stopped) or status.stdout.strip() or status.stderr.strip())
    with pytest.MonkeyPatch.context() as mp:
        # Jobs inherit this environment (sbatch --export=ALL), so they reach the same cluster.
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            run_client("sinfo", "-h")
            node_text = run_client("scontrol", "show", "node", env["HARNESS_SLURM_NODE"])
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            _not_up(f"sinfo/scontrol did not answer: {getattr(e, 'stderr', '') or e}")
        yield SlurmCluster(
            dir=cluster_dir,
            env=env,
            partition=env["HARNESS_SLURM_PARTITION"],
            node=env["HARNESS_SLURM_NODE"],
            gpus_per_node=_node_count(node_text, r"Gres=gpu:(\d+)"),
            cpus_per_node=_node_count(node_text, r"CPUTot=(\d+)"),
        )


@pytest.fixture(autouse=True)
def _needs_slurm(slurm_cluster):
    """Skips (or fails, under HARNESS_REQUIRE_SLURM=1) every test here when the cluster is not up."""


@pytest.fixture
def submitit_folder(tmp_path, slurm_cluster):
    """Returns a fresh submitit folder for this test: job ids restart at 1 on a fresh cluster, so a shared
    folder could hand back an older job's result."""
    return tmp_path / "submitit" / "%j"
