"""`python -m harness.report`: figures, table, fits and a Markdown page that links them."""

import json
import re
import subprocess
import sys

import pytest
from fixtures_results import REPO, make_paper_sweep

from harness import scaling
from harness.report import write_report


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    sweep = make_paper_sweep(tmp_path_factory.mktemp("rep") / "paper", broken=True)
    return write_report(sweep, n_resamples=100)


@pytest.mark.slow
def test_report_writes_figures_tables_and_fits(report):
    out = report.parent
    assert out.name == "report"
    for name in ("fig2_bubbles", "fig5_conditioning", "fig6_training", "fig8_gflops", "fig9_compute"):
        assert (out / f"{name}.png").stat().st_size > 10_000 and (out / f"{name}.pdf").exists()
    text = report.read_text()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (out / link).exists(), link
    fits = json.loads((out / "fits.json").read_text())
    assert {"gflops_floor", "gflops_power", "compute_floor", "compute_power"} <= set(fits)
    lo, hi = fits["gflops_power"]["exponent_ci"]
    assert lo < fits["gflops_power"]["exponent"] < hi
    assert "failed" in text and "CUDA out of memory" in text  # unfinished cells are listed


@pytest.mark.slow
def test_fig8_correlation_on_table4_fixture_matches_paper(report):
    text = report.read_text()
    row = re.search(r"\| Pearson\(FID, log10 Gflops\) \| (-?[\d.]+) \| (-?[\d.]+) \|", text)
    ours, paper = float(row.group(1)), float(row.group(2))
    assert ours == pytest.approx(paper) and ours == pytest.approx(scaling.PAPER_CORRELATION, abs=0.02)


def _not_json(token: str):
    raise AssertionError(f"{token} is not JSON")


@pytest.mark.process
def test_digits_sweep_is_labelled_and_not_a_sweep_fails_cleanly(tmp_path):
    sweep = make_paper_sweep(tmp_path / "digits", steps=(400_000,), num_samples=5_000, extractor="digits-cnn")
    report = write_report(sweep, n_resamples=0)
    text = report.read_text()
    assert "FID-5K (digits extractor)" in text and "not directly comparable" in text
    # Without resamples every interval is undetermined: written null, so that any JSON reader takes the files.
    written = sorted(report.parent.glob("*.json"))
    assert written and all(json.loads(p.read_text(), parse_constant=_not_json) for p in written)
    assert json.loads((report.parent / "fits.json").read_text())["gflops_power"]["exponent_ci"] == [None, None]
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "harness.report", str(tmp_path / "empty")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "not a sweep folder" in proc.stderr


def test_last_evaluations_give_each_cell_its_latest_record_smallest_first(tmp_path):
    from harness.report import last_evaluations
    from harness.results import load

    df = load([make_paper_sweep(tmp_path / "paper", broken=True)])
    last = last_evaluations(df)
    evaluated = df[df["evaluated"].astype(bool)]
    assert sorted(last["cell_id"]) == sorted(evaluated["cell_id"].unique())  # one row per evaluated cell
    assert last.set_index("cell_id")["step"].sort_index().equals(evaluated.groupby("cell_id")["step"].max())
    assert list(last["gflops"]) == sorted(last["gflops"])
    assert "fid" in last and "sfid" not in last  # the fixture measured FID only: no column of blanks
    assert last_evaluations(df[~df["evaluated"].astype(bool)]).empty


@pytest.mark.slow
def test_the_report_says_what_each_number_is(tmp_path):
    """Split, images, times and standard error of the validation loss; sample count, extractor weights and floor of
    each metric; how far the training images were repeated; the earlier form of a loss labelled as what it is."""
    from fixtures_results import make_demo_sweep

    report = write_report(make_demo_sweep(tmp_path / "demo"), n_resamples=0)
    text = report.read_text()
    section = text[text.index("## What the numbers are"):].split("\n## ")[0]
    assert "held-out 'test' split, 296 images at 8 stratified times" in section
    assert "standard error is 0.4% of the loss" in section
    assert "FID-500 (digits extractor)" in section and "extractor weights 0614089547d5" in section
    assert "its floor (as many real images against the same reference): 1.38 +- 0.13" in section
    assert "past 4 epochs" in section
    legacy = write_report(make_demo_sweep(tmp_path / "legacy", legacy=True), n_resamples=0).read_text()
    assert "fixed training-batch loss" in legacy and "not a validation loss" in legacy
