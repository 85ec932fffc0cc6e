"""Compute accounting in the paper's convention, and the paper's Table 4: pure functions, no torch.

Convention (DiT paper; the authors in the public repository's issues): `gflops` counts one multiply-add
as one flop (MACs), for one forward pass of one image through the transformer (VAE excluded). Real FLOPs
are 2x that. Training compute = gflops x batch x steps x 3 (the backward pass costs about twice the
forward). `harness.model.flops` counts the Gflops of a model; the analysis only needs these formulas, so it
never imports the models.
"""

from __future__ import annotations

import csv

import numpy as np

from harness.core.config import REPO_ROOT

# The paper's Table 4; its one home in the repository (a verbatim copy of the paper's numbers).
PAPER_TABLE_PATH = REPO_ROOT / "analysis" / "reference" / "dit_table4.csv"
FORWARD_BACKWARD_FACTOR = 3  # one forward plus a backward of about twice its cost (paper, Fig 9 caption)
FLOPS_PER_MAC = 2


def _check_nonnegative(**values):
    for name, value in values.items():
        if np.any(np.asarray(value) < 0):  # scalars, numpy arrays and pandas columns alike
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def real_flops_per_image(gflops):
    """Returns the real FLOPs (2 per multiply-add) of one forward pass of one image."""
    _check_nonnegative(gflops=gflops)
    return FLOPS_PER_MAC * gflops * 1e9


def train_compute_gflops(gflops, global_batch, steps):
    """Returns training compute in the paper's units (Gflops x batch x steps x 3; backward ~ 2x forward)."""
    _check_nonnegative(gflops=gflops, global_batch=global_batch, steps=steps)
    return gflops * global_batch * steps * FORWARD_BACKWARD_FACTOR


def train_flops(gflops, global_batch, steps):
    """Returns training compute in real FLOPs (2 x 3 x 1e9 x gflops x batch x steps), for utilisation."""
    return FLOPS_PER_MAC * 1e9 * train_compute_gflops(gflops, global_batch, steps)


def sampling_gflops_per_image(gflops, sampling_steps, guidance=False):
    """Returns the Gflops (paper convention) to sample one image; guidance doubles the batch."""
    _check_nonnegative(gflops=gflops, sampling_steps=sampling_steps)
    return gflops * sampling_steps * (2 if guidance else 1)


# Feature extraction per image, in multiply-adds (the paper's convention), for the evaluation's cost in a plan.
# Inception-v3 at 299 x 299: 5.71 G (torchvision's model table); DINOv2 ViT-L/14 at 224 x 224: ViT-L/16's 61.6 G
# (torchvision) scaled to /14's 257 tokens, about 80 G; the in-house CNNs at 16 x 16: about 0.003 G.
EXTRACTOR_GFLOPS = {"inception-v3-compat": 5.71, "inception-v3-compat-spatial": 5.71, "dinov2-vit-l-14": 80.0}
IN_HOUSE_EXTRACTOR_GFLOPS = 0.003


def sampler_evaluations(sampler: str, sampling_steps) -> int:
    """Returns the network evaluations one sample takes: the respaced steps of a DDPM/DDIM string ("250",
    "ddim50", "10,20,20": their sum), a flow sampler's steps (Heun: two per step, one at the last)."""
    s = str(sampling_steps)
    steps = sum(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in s.split(","))
    return 2 * steps - 1 if sampler == "heun" and steps > 0 else steps


def evaluation_gflops(gflops, num_samples: int, evaluations_per_sample: int, guided: bool,
                      extractor_gflops: float) -> float:
    """Returns one evaluation's forward compute in the paper's units: sampling (num_samples x network evaluations
    x gflops, twice the batch under guidance) plus feature extraction of the samples."""
    _check_nonnegative(gflops=gflops, num_samples=num_samples, evaluations_per_sample=evaluations_per_sample)
    return num_samples * (sampling_gflops_per_image(gflops, evaluations_per_sample, guided) + extractor_gflops)


def validation_gflops(gflops, images: int, times: int, records: int) -> float:
    """Returns the forward compute of a cell's validation losses: records x 2 (raw and EMA) x images x times."""
    _check_nonnegative(gflops=gflops, images=images, times=times, records=records)
    return 2 * records * images * times * gflops


def paper_table() -> list[dict]:
    """Returns Table 4 of the paper as a list of dicts (gflops in Gflops, params_m in millions)."""
    if not PAPER_TABLE_PATH.exists():
        raise FileNotFoundError(f"{PAPER_TABLE_PATH} is missing: it is the repository's copy of Table 4")
    types = dict(patch=int, resolution=int, gflops=float, params_m=int, train_steps_k=int,
                 fid50k_no_guidance=float)
    with open(PAPER_TABLE_PATH, newline="") as f:
        return [{k: types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]
