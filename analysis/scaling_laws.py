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
# # Scaling laws
# FID against Gflops and against training compute, as a pure power law and with a floor
# F(C) = F_inf + A (C / C_ref)^-b, fitted in log space with a Huber loss by L-BFGS (Besiroglu et al. 2024),
# with bootstrap intervals over cells, a held-out extrapolation check and the compute frontier.
# Point it at another sweep with `SWEEP_DIRS` or the environment variable `HARNESS_RESULTS`.

# %%
import os

import pandas as pd

from harness import scaling
from harness.plots import figures
from harness.results import load

SWEEP_DIRS = ["../outputs/demo"]
if os.environ.get("HARNESS_RESULTS"):
    SWEEP_DIRS = os.environ["HARNESS_RESULTS"].split(os.pathsep)
FIG_DIR = os.environ.get("HARNESS_FIG_DIR", "figures")
N_RESAMPLES = int(os.environ.get("HARNESS_RESAMPLES", "1000"))

# %%
df = load(SWEEP_DIRS)

# %% [markdown]
# ## Fits against Gflops (at the comparison step) and training compute (on the compute frontier)

# %%
fits = {(x, form): scaling.fit_table(df, x=x, form=form, n_resamples=N_RESAMPLES)
        for x in ("gflops", "train_compute_gflops") for form in ("power", "floor")}
for key, law in fits.items():
    print(key, law.describe())
pd.DataFrame([law.to_dict() for law in fits.values()])

# %%
# Each figure draws the floor law unless its bootstrap leaves it undetermined; then the power law (legend says).
for x in ("gflops", "train_compute_gflops"):
    print(x, "floor law:", figures.law_problem(fits[x, "floor"]) or "determined")
fig = figures.fig8_gflops(df, law=fits["gflops", "floor"], fallback=fits["gflops", "power"])
figures.save_figure(fig, FIG_DIR, "law_gflops")
fig = figures.fig9_compute(
    df, law=fits["train_compute_gflops", "floor"], fallback=fits["train_compute_gflops", "power"]
)
figures.save_figure(fig, FIG_DIR, "law_compute")

# %% [markdown]
# ## Held-out extrapolation: fit the cheaper cells, predict the two most expensive

# %%
scaling.extrapolation_check(df, x="gflops", form="power", n_holdout=2)

# %% [markdown]
# ## Compute frontier and correlations (ours, and the paper's Table 4)

# %%
scaling.compute_frontier(df)[["budget", "cell_id", "step", "fid"]]

# %%
pd.DataFrame({"ours": scaling.gflops_correlation(df), "paper Table 4": scaling.paper_correlations()})
