"""--help of the commands answers from conf/ and sweeps/ without loading torch, and Hydra's search path holds the
harness's configs only (the repository root, .venv/ and outputs/ included, once made --help take minutes)."""

import os
import subprocess
import sys

import pytest
from helpers import REPO

from harness.core import help as harness_help
from harness.core.config import CONF_DIR, REPO_ROOT, compose, named_sweeps, sweep_description

pytestmark = pytest.mark.process


def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env or dict(os.environ))


@pytest.mark.parametrize("command", ["sweep", "train", "evaluate"])
def test_help_names_every_group_option_grid_and_example(command):
    r = _run("-m", f"harness.{command}", "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    text = r.stdout
    assert text.startswith(f"python -m harness.{command}: ") and "usage: python -m harness." in text
    for group in harness_help.COMMANDS[command]["groups"]:
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert f"  {group}" in text and " ".join(options) in text, group
    grids = named_sweeps()
    if command == "sweep":
        assert len(grids) >= 5 and all(f"{p.stem}  " in text and sweep_description(p) in text for p in grids)
        assert "patch      2 4 8" in text and "adaln_zero" in text
    else:
        assert "Named grids" not in text
    assert text.count("python -m harness.") >= 4  # the usage and three examples


def test_help_loads_no_torch():
    code = ("import sys; sys.argv = ['x', '--help']; import runpy\n"
            "try:\n    runpy.run_module('harness.sweep', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'torch_fidelity', 'pandas') if m in sys.modules))")
    r = _run("-c", code)
    assert r.stdout.strip().endswith("LOADED []"), r.stdout[-500:] + r.stderr[-2000:]


def test_hydras_search_path_holds_the_harness_configs_only(tmp_path):
    """conf/ and Hydra's own: never the repository root (under which .venv/ and outputs/ live)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="t"):
        cfg = hydra_compose(config_name="config", overrides=["sweeps=demo"], return_hydra_config=True)
    paths = [s.path for s in cfg.hydra.runtime.config_sources]
    assert f"file://{REPO_ROOT}" not in paths and str(REPO_ROOT) not in paths
    assert all("file://" not in p or p.rstrip("/").endswith("conf") for p in paths), paths
    assert compose(["sweeps=demo"]).sweep_name == "demo"  # the named grids still compose, from the ConfigStore


def test_shell_completion_lists_the_harness_groups():
    env = dict(os.environ, COMP_LINE="python -m harness.sweep ")
    r = _run("-m", "harness.sweep", "-sc", "query=bash", env=env)
    words = set(r.stdout.split())
    groups = {w[:-1] for w in words if w.endswith("=") and "." not in w}
    assert {"model", "data", "train", "eval", "objective", "cluster", "sweeps", "patch", "cond"} <= groups
    assert not any(w.startswith(("hydra_plugins", "analysis", "outputs", "tests", "venv")) for w in words)
    env["COMP_LINE"] = "python -m harness.sweep sweeps="
    r = _run("-m", "harness.sweep", "-sc", "query=bash", env=env)
    assert set(r.stdout.split()) == {f"sweeps={p.stem}" for p in named_sweeps()}
