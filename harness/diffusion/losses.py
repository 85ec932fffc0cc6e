"""Closed-form terms of the variational bound: the Gaussian KL and the discretised Gaussian decoder.

Equation numbers refer to Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
(arXiv 2102.09672), and Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv 2006.11239).
"""

import math

import torch

# Data in [-1, 1] quantised to 256 levels: neighbouring levels are 2/255 apart, so a bin is +-1/255 wide.
BIN_HALF_WIDTH = 1.0 / 255.0
# The lowest and highest levels (-1 and +1) own the whole tail below / above their bin edge.
EDGE_LEVEL = 0.999
# Floor on a bin's probability before the log, so a hopeless prediction costs a finite ~27.6 nats.
MIN_BIN_PROB = 1e-12


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Returns the mean over all dimensions but the first (batch): shape (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Returns KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) elementwise, in nats.

    The L_{t-1} terms of the bound (iDDPM Eq. 5) are KLs between two Gaussians, so they have this closed form.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor):
    """Returns log p(x) elementwise, in nats, of x in [-1, 1] on 256 levels under N(means, exp(log_scales)^2).

    This is the decoder p(x_0 | x_1) of Ho et al. 2020 (their Eq. 13), whose negative is L_0 (iDDPM Eq. 4):
    the Gaussian's mass over the bin [x - 1/255, x + 1/255], with the two end bins stretched to +-infinity.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(log_scales.shape)}"
        )
    # Note: the public (guided-diffusion / DiT) code uses a tanh approximation of the normal CDF; we use the
    # exact one (torch.special.ndtr), which only changes the t = 0 term of the bound, slightly.
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + BIN_HALF_WIDTH)
    min_in = inv_stdv * (centered - BIN_HALF_WIDTH)
    # Every bin's probability is floored at MIN_BIN_PROB, the end bins included (as in the public code).
    log_min_prob = math.log(MIN_BIN_PROB)
    log_cdf_plus = torch.special.log_ndtr(plus_in).clamp(min=log_min_prob)  # log P(X <= x + 1/255)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in).clamp(min=log_min_prob)  # log P(X > x - 1/255)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    return torch.where(
        x < -EDGE_LEVEL,
        log_cdf_plus,
        torch.where(x > EDGE_LEVEL, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=MIN_BIN_PROB))),
    )
