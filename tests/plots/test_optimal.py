"""Figures of the compute-optimal analyses draw what their results hold (found by gid) and refuse absent data."""

import dataclasses
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from fixtures_scaling import dense_sweep, sweep_tables, true_budget

from harness.plots import optimal
from harness.plots.figures import save_figure
from harness.scaling.heldout import holdout_check
from harness.scaling.isoflop import isoflop_profiles
from harness.scaling.joint import fit_joint_law, fit_joint_table
from harness.scaling.loss_to_fid import fit_loss_to_fid, fit_loss_to_fid_table


def gids(fig, gid):
    """Returns the artists of `fig` with this gid (lines, collections, containers' parts)."""
    return [a for a in fig.findobj() if a.get_gid() == gid]


def legend_texts(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for leg in legends for t in leg.get_texts()]


@pytest.fixture(scope="module")
def fits():
    val, ev = sweep_tables()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "joint": fit_joint_table(val, n_resamples=100),
            "iso": isoflop_profiles(val, n_resamples=100),
            "fid": fit_loss_to_fid_table(ev, n_resamples=100),
            "holdout": holdout_check(val, ev, n_resamples=50),
        }


@pytest.fixture(scope="module")
def dense():
    df = dense_sweep()
    return {
        "iso": isoflop_profiles(df, budgets=true_budget(np.geomspace(2, 20, 6)), n_resamples=100),
        "joint": fit_joint_law(df["gflops"], df["images_seen"], df["val_loss_ema"], df["cell_id"], n_resamples=100),
    }


def test_isoflop_profiles_draw_every_budget_and_mark_rejected_minima(fits):
    iso = fits["iso"]
    fig = optimal.fig_isoflop_profiles(iso)
    with_points = [p for p in iso.profiles if len(p["points"])]
    assert len(gids(fig, "points")) == len(with_points)
    assert len(gids(fig, "parabola")) == len(gids(fig, "minimum")) == len(iso.minima)
    rejected = [p for p in iso.profiles if p["coefficients"] is not None and p["size_opt"] is None]
    assert len(gids(fig, "parabola_rejected")) == len(rejected)
    texts = legend_texts(fig)
    assert sum("no minimum" in t for t in texts) == len(with_points) - len(iso.minima)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "Gflops" in ax.get_xlabel() and ax.get_ylabel() == iso.label
    plt.close(fig)


def test_size_opt_draws_the_isoflop_law_and_the_joint_law_with_bands(dense):
    fig = optimal.fig_size_opt(dense["iso"], dense["joint"])
    assert len(gids(fig, "minimum")) == 1 and len(gids(fig, "minimum")[0].get_offsets()) == len(dense["iso"].minima)
    for gid in ("fit", "band", "joint", "joint_band", "trained"):
        assert len(gids(fig, gid)) == 1, gid
    # The joint law's line is its closed-form optimum at each budget drawn.
    line = gids(fig, "joint")[0]
    c, size = line.get_data()
    np.testing.assert_allclose(size, dense["joint"].optimal(c)[0])
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    plt.close(fig)


def test_size_opt_without_a_determined_isoflop_law_draws_minima_only_and_says_so(fits):
    fig = optimal.fig_size_opt(fits["iso"])
    assert not gids(fig, "fit") and not gids(fig, "joint")
    assert any("not determined" in t for t in legend_texts(fig)) == (not fits["iso"].determined)
    plt.close(fig)


def test_loss_to_fid_draws_points_law_band_and_names_the_form(fits):
    fit = fits["fid"]
    fig = optimal.fig_loss_to_fid(fit)
    assert len(gids(fig, "points")[0].get_offsets()) == len(fit.points)
    assert gids(fig, "fit") and gids(fig, "band")
    assert any(fit.choice.split(":")[0] in t.replace("\n", " ") for t in legend_texts(fig))
    assert not gids(fig, "floor")  # these records carry no floor
    plt.close(fig)
    floored = dataclasses.replace(fit, floor={"value": 4.0, "spread": 0.5})
    fig = optimal.fig_loss_to_fid(floored)
    assert len(gids(fig, "floor")) == 1 and any("floor: real images (4 +- 0.5)" in t for t in legend_texts(fig))
    assert fig.axes[0].get_ylim()[0] <= 3.5
    plt.close(fig)


def test_joint_predicted_has_the_identity_line_and_the_held_out_records(fits, tmp_path):
    joint, hold = fits["joint"], fits["holdout"]["joint"]
    fig = optimal.fig_joint_predicted(joint, hold)
    assert len(gids(fig, "points")[0].get_offsets()) == joint.n_points
    x, y = gids(fig, "identity")[0].get_data()
    np.testing.assert_allclose(x, y)
    assert gids(fig, "held_out")
    assert any(f"held out ({len(hold['rows'])})" in t for t in legend_texts(fig))
    png, pdf = save_figure(fig, tmp_path, "joint")
    assert png.stat().st_size > 1000 and pdf.stat().st_size > 1000


def test_absent_data_is_a_clear_error():
    val, ev = sweep_tables()
    empty = isoflop_profiles(val, budgets=[1.0], n_resamples=0)  # a budget no cell reaches
    with pytest.raises(ValueError, match="no IsoFLOP budget has any cell"):
        optimal.fig_isoflop_profiles(empty)
    with pytest.raises(ValueError, match="nothing to draw"):
        optimal.fig_size_opt(empty)
    with pytest.raises(ValueError, match="nothing to draw"):
        optimal.fig_size_opt(None, None)
    fit = fit_loss_to_fid([0.1, 0.12, 0.14], [10.0, 20.0, 40.0], n_resamples=0)
    fit.points = pd.DataFrame(columns=["val_loss", "fid"])
    with pytest.raises(ValueError, match="no \\(validation loss, FID\\) points"):
        optimal.fig_loss_to_fid(fit)
    joint = fit_joint_table(val, n_resamples=0)
    joint.points = None
    with pytest.raises(ValueError, match="no fitted points"):
        optimal.fig_joint_predicted(joint)


@pytest.mark.parametrize("low", [1.3e-3, 0.37, 6.0])
@pytest.mark.parametrize("decades", [0.3, 0.7, 1.25, 1.8, 2.5, 3.5])
def test_isoflop_size_labels_never_overlap(low, decades):
    """Whatever sizes a study trains (from a CPU study's 0.001 Gflops to DiT-XL's 118, over a third of a decade to
    three and a half), the size axis's tick labels stand apart (the CPU study's '3 x 10^-3' and '4 x 10^-3' ran
    into each other, then touched) and each says its number."""
    sizes = low * 10 ** np.linspace(0, decades, 7)
    rows = [(f"c{i}", s, images, 0.02 + 0.01 * s ** -0.3 + 30 * images ** -0.5)
            for i, s in enumerate(sizes) for images in np.geomspace(1e3, 1e5, 8) / np.sqrt(s / low)]
    cell, size, images, loss = map(list, zip(*rows))
    iso = isoflop_profiles({"cell_id": cell, "gflops": size, "images_seen": images, "val_loss_ema": loss},
                           n_resamples=0, cond=None)
    fig = optimal.fig_isoflop_profiles(iso)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    shown = [(t.label1.get_window_extent(renderer), t.label1.get_text(), t.get_loc()) for t in ticks
             if t.label1.get_visible() and t.label1.get_text()]
    lo, hi = ax.get_xlim()
    shown = sorted(((box, text, loc) for box, text, loc in shown if lo <= loc <= hi), key=lambda s: s[2])
    assert len(shown) >= 2, [t for _, t, _ in shown]
    for (a, _, _), (b, _, _) in zip(shown, shown[1:]):  # a visible space between neighbours, not just no overlap
        assert b.x0 - a.x1 >= 0.25 * a.height, [t for _, t, _ in shown]
    for _, text, loc in shown:
        assert float(text) == pytest.approx(loc, rel=1e-2)
    plt.close(fig)


@pytest.mark.parametrize("spread", [1.001, 1.01, 1.2, 10.0])
def test_isoflop_legend_tells_every_budget_apart(fits, spread):
    """Budgets however close together (a grid whose cells all stop near one compute) get distinct legend labels,
    each the budget's number to the digits shown."""
    iso = fits["iso"]
    budgets = iso.budgets[0] * spread ** np.arange(len(iso.budgets))
    close = dataclasses.replace(iso, profiles=[p | {"budget": float(b)} for p, b in zip(iso.profiles, budgets)])
    fig = optimal.fig_isoflop_profiles(close)
    labels = [t for t in legend_texts(fig) if t.startswith("C = ")]
    drawn = [b for p, b in zip(close.profiles, budgets) if len(p["points"])]
    assert len(labels) == len(drawn) == len(set(labels)), labels
    for text, b in zip(labels, drawn):
        shown = text.split(" ")[2]
        assert shown in {f"{b:.{digits}g}" for digits in range(2, 7)}, text  # b rounded, not another number
    plt.close(fig)
