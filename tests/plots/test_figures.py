"""Figures draw the sweep's own cells whatever their names, keep the paper's values off foreign axes, and take
their y-limits from the data, never from a fit's band (what a first demo report got wrong)."""

import warnings

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest
from fixtures_results import DEMO_CELLS, DEMO_STEPS, make_demo_sweep, make_paper_sweep

from harness import scaling
from harness.plots import figures
from harness.results import load_results

N_PAPER_ADALN_ZERO = 12  # Table 4: S..XL x patch 8, 4, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return load_results(make_demo_sweep(tmp_path_factory.mktemp("plots") / "demo"))


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    return load_results(make_paper_sweep(tmp_path_factory.mktemp("plots") / "paper", steps=(200_000, 400_000)))


@pytest.fixture(scope="module")
def demo_laws(demo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {form: scaling.fit_table(demo, form=form, n_resamples=100) for form in ("floor", "power")}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _n_points(ax, gid: str) -> int:
    """Returns the number of data points drawn on `ax` by artists tagged `gid`."""
    n = sum(len(c.get_offsets()) for c in ax.collections if c.get_gid() == gid)
    return n + sum(len(line.get_xdata()) for line in ax.lines if line.get_gid() == gid)


def _colors(ax, gid: str) -> set[str]:
    """Returns the colours (hex) of the artists tagged `gid` on `ax`."""
    out = {matplotlib.colors.to_hex(c.get_facecolor()[0]) for c in ax.collections if c.get_gid() == gid}
    return out | {matplotlib.colors.to_hex(line.get_color()) for line in ax.lines if line.get_gid() == gid}


def _paper_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() == "paper"]


def test_off_paper_sizes_get_their_own_colours_by_parameter_count(demo):
    assert figures.size_order(demo) == ["demo-S", "demo-B"]
    colors = figures.size_colors(demo)
    assert colors["demo-S"] == figures.EXTRA_SIZE_COLORS[0] and colors["demo-B"] == figures.EXTRA_SIZE_COLORS[1]
    assert {k: colors[k] for k in figures.SIZES} == figures.SIZE_COLORS  # the paper's sizes keep theirs


@pytest.mark.parametrize("name", ["fig2_bubbles", "fig8_gflops"])
def test_gflops_figures_draw_every_cell_of_an_off_paper_sweep(demo, name):
    fig = getattr(figures, name)(demo)
    ax = fig.axes[0]
    assert _n_points(ax, "sweep") == len(DEMO_CELLS)  # one point per cell at the comparison step
    colors = _colors(ax, "sweep")
    assert colors == {figures.EXTRA_SIZE_COLORS[0], figures.EXTRA_SIZE_COLORS[1]}  # coloured by size, not grey


def test_fig9_draws_every_evaluation_coloured_by_size_styled_by_patch(demo):
    ax = figures.fig9_compute(demo).axes[0]
    lines = [line for line in ax.lines if line.get_gid() == "sweep"]
    assert len(lines) == len(DEMO_CELLS) and _n_points(ax, "sweep") == len(DEMO_CELLS) * len(DEMO_STEPS)
    colors = figures.size_colors(demo)
    assert {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in lines} == {
        (colors[m], figures.PATCH_STYLES[p], figures.PATCH_MARKERS[p]) for m, p in DEMO_CELLS
    }
    legend = ax.get_legend()
    assert legend is not None
    # The legend sits right of the axes (anchored beyond x = 1 in axes coordinates): it covers no data.
    fig = ax.figure
    fig.canvas.draw()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1


def test_fig6_has_panels_for_the_sweeps_sizes_and_patches_only(demo):
    fig = figures.fig6_training(demo)
    data_axes = [ax for ax in fig.axes if ax.get_label() != "paper"]
    titles = {ax.get_title() for ax in data_axes}
    assert titles == {"patch 8: varying size", "patch 4: varying size", "patch 2: varying size"} | {
        "DiT-demo-S: varying patch",
        "DiT-demo-B: varying patch",
    }
    top = [ax for ax in data_axes if ax.get_title().startswith("patch")]
    assert sum(_n_points(ax, "sweep") for ax in top) == len(DEMO_CELLS) * len(DEMO_STEPS)
    # Step ticks suit a 300-step sweep: the axis ends near 300, not at 400K.
    assert data_axes[0].get_xlim()[1] < 2 * DEMO_STEPS[-1]


@pytest.mark.parametrize("name", ["fig2_bubbles", "fig6_training", "fig8_gflops", "fig9_compute"])
def test_paper_values_leave_the_sweeps_axes_when_the_extractor_differs(demo, name):
    fig = getattr(figures, name)(demo)
    for ax in fig.axes:
        if ax.get_label() != "paper":
            assert _n_points(ax, "paper") == 0, ax.get_title()
    (pax,) = _paper_axes(fig)
    assert _n_points(pax, "paper") == N_PAPER_ADALN_ZERO and figures.PAPER_PANEL_TITLE in pax.get_title()
    if name in ("fig2_bubbles", "fig8_gflops"):
        # The sweep's axis spans the sweep's Gflops (1e-3..1e-1), not the paper's (0.36..119).
        assert fig.axes[0].get_xlim()[1] < 0.2


def test_fig8_y_limits_follow_the_data_and_undetermined_floor_falls_back(demo, demo_laws):
    floor, power = demo_laws["floor"], demo_laws["power"]
    assert figures.law_problem(floor) is not None  # 6 noisy points: the floor law's CI is unconstrained
    assert figures.choose_law(floor, power)[0] is power
    fig = figures.fig8_gflops(demo, law=floor, fallback=power)
    ax = fig.axes[0]
    fid = demo.loc[demo.step == DEMO_STEPS[-1], "fid"]
    lo, hi = ax.get_ylim()
    span = fid.max() - fid.min()
    assert fid.min() - 0.2 * span <= lo <= fid.min() and fid.max() <= hi <= fid.max() + 0.2 * span
    (fit,) = [line for line in ax.lines if line.get_gid() == "fit"]
    assert "power law" in fit.get_label() and "undetermined" in fit.get_label()
    g = demo["gflops"]
    assert g.min() / 1.5 <= fit.get_xdata().min() and fit.get_xdata().max() <= g.max() * 1.5
    (band,) = [c for c in ax.collections if c.get_gid() == "band"]
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    assert ys.min() >= lo - 1e-9 and ys.max() <= hi + 1e-9  # clipped to the axes


def test_paper_fixture_keeps_stars_on_the_primary_axis_with_r_0_930(paper):
    fig = figures.fig8_gflops(paper)
    ax = fig.axes[0]
    assert not _paper_axes(fig)
    assert _n_points(ax, "paper") == N_PAPER_ADALN_ZERO and _n_points(ax, "sweep") == N_PAPER_ADALN_ZERO
    assert "= -0.930" in fig._suptitle.get_text()
    assert scaling.gflops_correlation(paper)["pearson_log10_gflops"] == pytest.approx(-0.930, abs=5e-4)
    # Fig 6 draws each model's star twice: in its patch panel (top row) and its size panel (bottom row).
    for name, n_stars in (("fig2_bubbles", 1), ("fig6_training", 2), ("fig9_compute", 1)):
        fig = getattr(figures, name)(paper)
        assert not _paper_axes(fig) and sum(_n_points(a, "paper") for a in fig.axes) == n_stars * N_PAPER_ADALN_ZERO


def test_table4_orders_off_paper_sizes_by_parameter_count(demo):
    t4 = figures.table4(demo)
    assert list(t4["model"]) == ["demo-S"] * 3 + ["demo-B"] * 3 and list(t4["patch"]) == [8, 4, 2] * 2


def test_fig12_draws_each_measured_metric_and_says_which_were_not(tmp_path):
    """Fig 12 draws one line per model in each measured metric's panel; a metric the sweep did not measure gets a
    panel saying so, never a line of zeros; the paper's FID stars only on comparable axes."""
    df = load_results(make_paper_sweep(tmp_path / "paper"))
    fig = figures.fig12_metrics(df)
    panels = {ax.get_title().split(" (")[0]: ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"FID", "sFID", "Inception Score", "Precision", "Recall"}
    n_models = df[df.cond == "adaln_zero"].groupby(["model", "patch"]).ngroups
    for name in ("FID", "Inception Score", "Precision", "Recall"):
        assert len([ln for ln in panels[name].lines if ln.get_gid() == "sweep"]) == n_models, name
    assert not [ln for ln in panels["sFID"].lines] and any(t.get_gid() == "absent" for t in panels["sFID"].texts)
    assert any(c.get_gid() == "paper" for c in panels["FID"].collections)
    assert not any(c.get_gid() == "paper" for c in panels["Inception Score"].collections)
    df = df.drop(columns=["fid", "sfid", "isc_mean", "precision", "recall"])
    with pytest.raises(ValueError, match="none of"):
        figures.fig12_metrics(df)


@pytest.mark.parametrize("name", ["fig6_training", "fig8_gflops", "fig9_compute", "fig12_metrics"])
def test_the_floor_is_a_band_and_repeated_points_are_ringed(demo, name):
    """The demo's records carry the FID floor (500 real digits) and are past 4 epochs of the 1,501 training
    digits: each FID figure draws the floor as a band and rings those points."""
    fig = getattr(figures, name)(demo)
    fid_axes = [ax for ax in fig.axes if any(c.get_gid() == "sweep" for c in [*ax.collections, *ax.lines])]
    assert fid_axes
    for ax in fid_axes[:1] if name == "fig12_metrics" else fid_axes:
        bands = [p for p in ax.patches if p.get_gid() == "floor"]
        assert len(bands) == 1
        y = bands[0].get_path().vertices[:, 1] if hasattr(bands[0], "get_path") else None
        lo, hi = ax.get_ylim()
        assert lo <= 1.38 - 0.13 and hi >= 1.38 + 0.13 and y is not None
    rings = sum(_n_points(ax, "repeated") for ax in fig.axes)
    assert rings >= 1
    labels = [t.get_text() for ax in fig.axes for leg in [ax.get_legend()] if leg for t in leg.get_texts()]
    labels += [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert name == "fig6_training" or any("past 4 epochs" in s for s in labels)


def test_the_samples_figure_has_a_row_per_cell_smallest_model_on_top(demo):
    fig = figures.fig_samples(demo)
    rows = [ax for ax in fig.axes if ax.get_gid() == "samples"]
    assert len(rows) == len(DEMO_CELLS)
    labels = [ax.get_ylabel() for ax in rows]
    gflops = [float(s.split("\n")[1].split()[0]) for s in labels]
    assert gflops == sorted(gflops) and all(f"step {DEMO_STEPS[-1]:,}" in s for s in labels)
    widths = {ax.get_images()[0].get_array().shape[1] for ax in rows}
    assert len(widths) == 1  # the same number of samples in every row
    with pytest.raises(ValueError, match="nothing to show"):
        figures.fig_samples(demo.assign(samples_npz=None))
