# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The paper's figures from a sweep
# Regenerates Fig 2, 5, 6, 8, 9 and Table 4 of Peebles & Xie (2023) from any results table, with the
# paper's values (stars) drawn alongside: on the same axes when the sweep's FID uses the paper's Inception
# extractor, otherwise in a separate panel (another extractor is another metric). Point it at another
# sweep by editing `SWEEP_DIRS` (sweep folders or a saved results CSV / Parquet), or set the environment
# variable `HARNESS_RESULTS` (paths joined by `:`).

# %%
import os

from harness import scaling
from harness.plots import figures
from harness.results import load

SWEEP_DIRS = ["../outputs/demo"]
if os.environ.get("HARNESS_RESULTS"):
    SWEEP_DIRS = os.environ["HARNESS_RESULTS"].split(os.pathsep)
FIG_DIR = os.environ.get("HARNESS_FIG_DIR", "figures")

# %%
df = load(SWEEP_DIRS)
print(f"{df.cell_id.nunique()} cells, {int(df.evaluated.sum())} evaluations")
df.drop_duplicates("cell_id")[["cell_id", "state", "step"]]

# %% [markdown]
# ## Fig 2: FID at the comparison step, bubble area = Gflops

# %%
fig = figures.fig2_bubbles(df)
figures.save_figure(fig, FIG_DIR, "fig2_bubbles")

# %% [markdown]
# ## Fig 5: conditioning variants over training (needs more than one variant)

# %%
if df.cond.nunique() > 1:
    fig = figures.fig5_conditioning(df)
    figures.save_figure(fig, FIG_DIR, "fig5_conditioning")

# %% [markdown]
# ## Fig 6: FID over training, by patch size and by model size

# %%
fig = figures.fig6_training(df)
figures.save_figure(fig, FIG_DIR, "fig6_training")

# %% [markdown]
# ## Fig 8: FID against Gflops
# The paper's "-0.93" is the Pearson correlation of FID-50K with log10 Gflops (Table 4 gives -0.930).

# %%
print(scaling.gflops_correlation(df))
fig = figures.fig8_gflops(df)
figures.save_figure(fig, FIG_DIR, "fig8_gflops")

# %% [markdown]
# ## Fig 9: FID against training compute (Gflops x batch x steps x 3)

# %%
fig = figures.fig9_compute(df)
figures.save_figure(fig, FIG_DIR, "fig9_compute")

# %% [markdown]
# ## Fig 12: every metric of the paper's evaluator against training compute
# FID, sFID, Inception Score, precision and recall, one line per model; a metric the sweep did not measure
# gets a panel that says so. The repository's copy of Table 4 holds the paper's FID only.

# %%
fig = figures.fig12_metrics(df)
figures.save_figure(fig, FIG_DIR, "fig12_metrics")

# %% [markdown]
# ## Samples: what the models generate
# Each cell's last evaluation, one row per cell, smallest model on top; sample i has the same class label and
# initial noise in every row, so a row shows what its model compute buys, image by image.

# %%
try:
    fig = figures.fig_samples(df)
    figures.save_figure(fig, FIG_DIR, "samples")
except ValueError as e:  # a table whose run folders are not on this machine has no pixels to show
    print(e)

# %% [markdown]
# ## Table 4

# %%
figures.table4(df)
