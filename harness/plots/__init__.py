"""The paper's figures (figures: Figs 2, 5, 6, 8, 9, 12 and Table 4, each from the results table, next to the
paper's values) and the compute-optimal figures (optimal: IsoFLOP profiles, the optimal size against budget, loss to
FID, the joint law against measurement). The figure functions are handed on here, so `from harness import plots;
plots.fig8_gflops(df)` reads as it did before the figures had a package.
"""

from harness.plots.figures import (  # noqa: F401 - the figures' namespace
    fig2_bubbles,
    fig5_conditioning,
    fig6_training,
    fig8_gflops,
    fig9_compute,
    fig12_metrics,
    save_figure,
    table4,
)
from harness.plots.optimal import (  # noqa: F401
    fig_isoflop_profiles,
    fig_joint_predicted,
    fig_loss_to_fid,
    fig_size_opt,
)
