"""Every analysis notebook runs headless on a results fixture and writes figures; .py pairs in sync."""

import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from fixtures_results import REPO, make_demo_sweep, make_paper_sweep
from nbclient import NotebookClient

from harness.results import load_results, save_table

# Notebooks execute in a Jupyter kernel, a process of its own: not in make test-fast.
pytestmark = [pytest.mark.notebook, pytest.mark.process]

NOTEBOOKS = sorted((REPO / "analysis").glob("*.ipynb"))
EXPECTED = {
    "figures": ["fig2_bubbles", "fig5_conditioning", "fig6_training", "fig8_gflops", "fig9_compute", "fig12_metrics"],
    "scaling_laws": ["law_gflops", "law_compute"],
    # The fixture's validation loss does not move with steps: the size_opt figure has no IsoFLOP minima to draw.
    "compute_optimal": ["joint_law_predicted", "isoflop_profiles", "loss_to_fid"],
}
# Drawn only from sweep folders whose evaluations kept their samples (the demo's), never from a saved table alone.
FROM_RUN_FOLDERS = {"figures": ["samples"]}


def _ensure_kernel():
    """Installs the venv's python3 kernelspec when a fresh clone has none (ipykernel is a dev dependency)."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True)


@pytest.fixture(scope="module")
def results_csv(tmp_path_factory):
    """The paper fixture as a sweep folder and as a saved table: (folder, csv)."""
    root = tmp_path_factory.mktemp("nb")
    sweep = make_paper_sweep(root / "paper", broken=True)
    # A saved table exercises the CSV path of `load`; the compute-optimal notebook reads the validation records
    # of the run folders, which only a sweep folder has.
    return sweep, save_table(load_results(sweep), root / "results.csv")


def test_every_notebook_is_listed():
    assert {p.stem for p in NOTEBOOKS} == set(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_matches_its_py_pair(path):
    py = jupytext.read(path.with_suffix(".py"))
    nb = nbformat.read(path, as_version=4)
    assert [c.source for c in py.cells] == [c.source for c in nb.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_and_writes_figures(path, results_csv, tmp_path, monkeypatch):
    _ensure_kernel()
    fig_dir = tmp_path / "figs"
    sweep, csv = results_csv
    monkeypatch.setenv("HARNESS_RESULTS", str(sweep if path.stem == "compute_optimal" else csv))
    monkeypatch.setenv("HARNESS_FIG_DIR", str(fig_dir))
    monkeypatch.setenv("HARNESS_RESAMPLES", "100")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    for name in EXPECTED[path.stem]:
        for ext in ("png", "pdf"):
            assert (fig_dir / f"{name}.{ext}").stat().st_size > 1000, name
    assert not list(Path(path.parent).glob("figures"))  # nothing written beside the notebooks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_unedited_draws_the_demo_after_make_demo(path, tmp_path, monkeypatch):
    """A new user runs `make demo`, then a notebook as it is: its first cell's default sweep folder is where
    the demo writes (outputs/demo beside analysis/), and the figures are drawn from it."""
    _ensure_kernel()
    make_demo_sweep(tmp_path / "outputs" / "demo")
    (tmp_path / "analysis").mkdir()
    copy = tmp_path / "analysis" / path.name
    copy.write_bytes(path.read_bytes())
    for var in ("HARNESS_RESULTS", "HARNESS_FIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HARNESS_RESAMPLES", "100")
    nb = nbformat.read(copy, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(copy.parent)}}).execute()
    for name in EXPECTED[path.stem] + FROM_RUN_FOLDERS.get(path.stem, []):
        if name == "fig5_conditioning":  # the demo trains one conditioning variant: the notebook skips Fig 5
            assert not (copy.parent / "figures" / f"{name}.png").exists()
            continue
        assert (copy.parent / "figures" / f"{name}.png").stat().st_size > 1000, name
