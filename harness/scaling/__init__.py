"""Scaling laws, in one namespace: the laws of one variable (harness.scaling.powerlaw: FID or loss against Gflops or
training compute, as the paper's Figs 8 and 9) and the compute-optimal analyses built on them
(harness.scaling.joint: the joint law in size and images, IsoFLOP profiles, loss to FID, the report's summary).

    from harness import scaling
    scaling.fit_table(df, x="gflops")                 # a law of one variable, bootstrapped over cells
    scaling.compute_optimal_summary(val_df, df)       # which size and how many images for a budget

docs/scaling.md says what each fit needs and what its intervals mean.
"""

from harness.scaling.joint import (  # noqa: F401
    JOINT_PARAMS,
    LOSS_FID_EXPONENT_BOUNDS,
    MIN_ISOFLOP_BUDGETS,
    MIN_RECORDS_PER_CELL,
    MIN_SIZES,
    IsoFlopResult,
    JointLaw,
    LossToFid,
    compute_optimal_summary,
    fid_points,
    fit_joint_law,
    fit_joint_table,
    fit_loss_to_fid,
    fit_loss_to_fid_table,
    format_compute_optimal_markdown,
    holdout_check,
    isoflop_profiles,
    summary_budgets,
    validation_points,
)
from harness.scaling.powerlaw import (  # noqa: F401 - the namespace of scaling laws
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
    to_plain,
)
