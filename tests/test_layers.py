"""The layers of the harness are enforced by import-linter's contracts in pyproject.toml (`make test` runs
`lint-imports`): they hold on the code, and a wrong-way import breaks them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

# lint-imports and fresh interpreters run as processes: not in make test-fast.
pytestmark = pytest.mark.process

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """Runs lint-imports on the package under `root` with the repository's contracts."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def copy_of_the_package(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(REPO / "harness", root / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold(copy_of_the_package):
    r = _lint(copy_of_the_package)
    assert r.returncode == 0, r.stdout[-3000:]
    n = (REPO / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert n >= 4 and f"Contracts: {n} kept, 0 broken." in r.stdout


@pytest.mark.parametrize("module,bad_import,contract", [
    ("harness/model/dit.py", "import harness.bench", "nothing imports the benchmarks"),  # the domain, upwards
    ("harness/cell.py", "import harness.sweep", "nothing imports the benchmarks"),      # the cell imports the sweep
    ("harness/results.py", "import harness.model.flops", "imports nothing that builds torch models"),  # the analysis
    ("harness/core/cli.py", "import harness.core.config", "The core is layered"),       # inside the core, upwards
    ("harness/scaling/fitting.py", "import harness.scaling.summary", "The scaling package is layered"),
    ("harness/soak/cluster.py", "import harness.soak.faults", "The soak is layered"),
    ("harness/soak/faults.py", "import harness.soak.invariants", "The soak is layered"),  # sideways
    ("harness/data/datasets.py", "import harness.metrics.fidelity", "nothing imports the benchmarks"),  # sideways
])
def test_a_wrong_way_import_breaks_a_contract(copy_of_the_package, module, bad_import, contract):
    path = copy_of_the_package / module
    original = path.read_text()
    path.write_text(original + f"\n{bad_import}  # noqa\n")
    try:
        r = _lint(copy_of_the_package)
    finally:
        path.write_text(original)
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and contract in r.stdout.split("Broken contracts")[1], r.stdout[-3000:]


# What the training side must not load when it starts: the evaluation's and the analysis's packages. A sweep's
# plan and every training job import harness.sweep / harness.train; these cost seconds a cell never uses.
HEAVY_FOR_TRAINING = ("torch_fidelity", "torchvision", "matplotlib", "pandas", "scipy", "fvcore", "sklearn")


@pytest.mark.parametrize("module", ["harness.sweep", "harness.train"])
def test_the_training_side_starts_without_the_analysis_packages(module):
    code = (f"import sys, {module}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"set({HEAVY_FOR_TRAINING!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [], f"importing {module} loads {out.stdout.strip()}"
