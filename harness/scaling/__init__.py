"""Scaling laws, in one namespace: the laws of one variable (FID or loss against Gflops or training compute, as
the paper's Figs 8 and 9) and the compute-optimal analyses built on them.

    from harness import scaling
    scaling.fit_table(df, x="gflops")                 # a law of one variable, bootstrapped over cells
    scaling.compute_optimal_summary(val_df, df)       # which size and how many images for a budget

The modules, bottom to top (each imports only those below it; pyproject.toml's import contracts check it):
    fitting      the Huber loss, the best of several L-BFGS-B runs, the bootstrap over cells, percentile intervals
    powerlaw     laws of one variable: F(C) = F_inf + A (C / C_ref)^(-b)
    rows         which rows may share a law, and what a fit needs of them
    joint        the joint law in size and images (Chinchilla's Approach 3; its docstring has the conventions)
    isoflop      IsoFLOP profiles (Approach 2)
    loss_to_fid  FID as a power law of the validation loss
    heldout      the laws of the cheaper cells against the largest
    design       how many cells per size a study's IsoFLOP interval needs, simulated from its own law
    summary      what a budget buys, for the report (harness.report writes it as Markdown)

docs/scaling.md says what each fit needs and what its intervals mean.
"""

from harness.scaling.design import isoflop_replicates  # noqa: F401 - the namespace of scaling laws
from harness.scaling.fitting import to_plain  # noqa: F401
from harness.scaling.heldout import holdout_check  # noqa: F401
from harness.scaling.isoflop import MIN_ISOFLOP_BUDGETS, IsoFlopResult, isoflop_profiles  # noqa: F401
from harness.scaling.joint import JOINT_PARAMS, JointLaw, fit_joint_law, fit_joint_table  # noqa: F401
from harness.scaling.loss_to_fid import (  # noqa: F401
    LOSS_FID_EXPONENT_BOUNDS,
    LossToFid,
    fid_points,
    fit_loss_to_fid,
    fit_loss_to_fid_table,
)
from harness.scaling.powerlaw import (  # noqa: F401
    EXPONENT_BOUNDS,
    FORMS,
    HUBER_DELTA,
    LEVEL,
    N_RESAMPLES,
    PAPER_CORRELATION,
    X_COLUMNS,
    ScalingLaw,
    compute_frontier,
    correlations,
    extrapolation_check,
    fit_law,
    fit_table,
    gflops_correlation,
    paper_correlations,
    pareto_mask,
    select_points,
)
from harness.scaling.rows import MIN_RECORDS_PER_CELL, MIN_SIZES, validation_points  # noqa: F401
from harness.scaling.summary import compute_optimal_summary, summary_budgets  # noqa: F401
