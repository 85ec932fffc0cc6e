"""The Frechet distance of two Gaussians, the feature statistics it compares, and sFID's feature.

FID, sFID and FD-DINOv2 are the same distance in three feature spaces (harness.metrics.fidelity picks the space);
ADM's evaluator and torch-fidelity compute the statistics and the distance as here.
"""

from __future__ import annotations

import numpy as np
import torch

# sFID's feature, as ADM's evaluator computes it (Nash et al. 2021, "Generating images with sparse
# representations"): the first SFID_CHANNELS channels of a mid-level feature map, flattened in (H, W, channel)
# order. An extractor that provides it names it SPATIAL_FEATURE (harness.core.vocabulary).
SFID_CHANNELS = 7  # ADM evaluator: `spatial[..., :7]`


def spatial_feature(nhwc: torch.Tensor) -> torch.Tensor:
    """Return sFID's feature of feature maps in TF layout (N, H, W, C): float32 (N, H * W * SFID_CHANNELS), the
    first SFID_CHANNELS channels flattened in (H, W, channel) order, as ADM's `spatial[..., :7]` then reshape."""
    if nhwc.ndim != 4 or nhwc.shape[-1] < SFID_CHANNELS:
        raise ValueError(f"expected feature maps (N, H, W, C >= {SFID_CHANNELS}), got {tuple(nhwc.shape)}")
    return nhwc[..., :SFID_CHANNELS].reshape(nhwc.shape[0], -1).to(torch.float32)

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Return the Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}; expected (d,) and (d, d)")
    diff = mu1 - mu2
    # tr((S1 S2)^(1/2)) as the sum of square roots of the eigenvalues of S1 S2 (real and >= 0 for PSD
    # inputs, up to rounding), the way torch-fidelity computes it: no sqrtm, no imaginary residue.
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)).real)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)

def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Return (mean (D,), covariance (D, D), ddof 1), float64, of features (N, D): what a Frechet distance compares
    (ADM's evaluator and torch-fidelity compute them the same way)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))
