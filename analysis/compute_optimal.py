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
# # Compute-optimal scaling
# Given a training budget, which DiT (forward Gflops per image) and how many training images, and what
# validation loss and FID will that reach? The joint law loss = E + A / N^alpha + B / D^beta (Hoffmann et al.
# 2022, Approach 3, fitted as Besiroglu et al. 2024 refit it), IsoFLOP profiles (Approach 2) as a check, and
# FID as a power law of the validation loss. Size N in forward Gflops per image, D in images seen, training
# compute C = 3 N D in Gflops. Intervals: bootstrap over cells. See docs/scaling.md for the method and its limits.
#
# Point it at another sweep by editing `SWEEP_DIRS` (sweep folders or saved tables), or set the environment
# variable `HARNESS_RESULTS` (paths joined by `:`); `HARNESS_FIG_DIR` says where figures go and
# `HARNESS_RESAMPLES` how many bootstrap resamples to draw.

# %%
import json
import os

from harness import scaling
from harness.plots import figures, optimal
from harness.report import format_compute_optimal_markdown
from harness.results import load, load_validation

# The CPU study (python -m harness.sweep -m sweeps=scaling) when it has run, else the demo of `make demo`.
SWEEP_DIRS = ["../outputs/scaling"] if os.path.isdir("../outputs/scaling") else ["../outputs/demo"]
if os.environ.get("HARNESS_RESULTS"):
    SWEEP_DIRS = os.environ["HARNESS_RESULTS"].split(os.pathsep)
FIG_DIR = os.environ.get("HARNESS_FIG_DIR", "figures")
N_RESAMPLES = int(os.environ.get("HARNESS_RESAMPLES", "1000"))
print(f"sweep folders: {SWEEP_DIRS}")


def draw(name, make):
    """Saves the figure `make()` returns as FIG_DIR/name.{png,pdf}, or says why the data cannot give it."""
    try:
        figures.save_figure(make(), FIG_DIR, name)
    except ValueError as e:
        print(f"{name}: not drawn ({e})")

# %%
val = load_validation(SWEEP_DIRS)  # a row per (cell, validation record)
df = load(SWEEP_DIRS)  # a row per (cell, evaluated step), with FID
print(f"{val.cell_id.nunique()} cells, {len(val)} validation records; {int(df.evaluated.sum())} evaluations")

# %% [markdown]
# ## Joint law: validation loss against size and images seen

# %%
joint = scaling.fit_joint_table(val, n_resamples=N_RESAMPLES)
print(joint.describe())
holdout = scaling.holdout_check(val, df)
print(json.dumps({k: v for k, v in holdout.get("joint", {}).items() if k != "rows"}, indent=1))
draw("joint_law_predicted", lambda: optimal.fig_joint_predicted(joint, holdout.get("joint")))

# %% [markdown]
# ## IsoFLOP profiles and the compute-optimal size
# A budget whose parabola has no minimum inside the sizes trained at that budget is drawn dotted and left out
# of the power law size_opt ~ C^a.

# %%
iso = scaling.isoflop_profiles(val, n_resamples=N_RESAMPLES)
print(iso.describe())
draw("isoflop_profiles", lambda: optimal.fig_isoflop_profiles(iso))
draw("size_opt", lambda: optimal.fig_size_opt(iso, joint))

# %% [markdown]
# ## FID against validation loss

# %%
loss_to_fid = scaling.fit_loss_to_fid_table(df, n_resamples=N_RESAMPLES)
print(loss_to_fid.describe())
draw("loss_to_fid", lambda: optimal.fig_loss_to_fid(loss_to_fid))

# %% [markdown]
# ## What each budget buys
# Budgets inside the sweep and two beyond it (the rule is printed with the table), each with its interval.

# %%
summary = scaling.compute_optimal_summary(val, df, n_resamples=N_RESAMPLES)
print(format_compute_optimal_markdown(summary))
