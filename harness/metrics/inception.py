"""The extractors whose weights come from the internet: torch-fidelity's TF-compatible Inception (FID, IS, KID,
precision/recall), the same network exposing ADM's sFID map, and DINOv2 through torch hub (FD-DINOv2); where each
one's files go, and the message that says what to fetch when the machine is offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_HUB_MODELS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from harness.core import cli
from harness.core.vocabulary import DINOV2_EXTRACTOR, INCEPTION_EXTRACTOR, INCEPTION_SPATIAL_EXTRACTOR, SPATIAL_FEATURE
from harness.metrics.frechet import spatial_feature

# Where torch hub's DINOv2 comes from: torch-fidelity calls torch.hub.load("facebookresearch/dinov2", ...), whose
# hubconf (facebookresearch/dinov2 dinov2/hub/backbones.py, utils.py) fetches
# <base>/<model>/<model>_pretrain.pth into torch hub's checkpoint folder.
DINOV2_REPO_URL = "https://github.com/facebookresearch/dinov2"

DINOV2_WEIGHTS_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

_DINOV2_REPO_FOLDER = "facebookresearch_dinov2_main"  # torch hub's folder name: <owner>_<repo>_<branch>


class MissingWeightsError(cli.MissingWeights):
    """Feature extractor weights (or torch hub's code) are not on disk and cannot be downloaded; the message says
    what to fetch and where to put it. A cli.MissingWeights, so commands report it in one line."""

def inception_weights_path() -> Path:
    """Return where torch-fidelity looks for (and downloads) the Inception weights (torch hub's folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)

def dinov2_paths(model: str = DINOV2_EXTRACTOR) -> dict:
    """Return what torch hub needs for a DINOv2 extractor, and where it goes: {"repo_url", "repo_dir" (Path),
    "weights_url", "weights_path" (Path)}, under torch hub's folder ($TORCH_HOME/hub)."""
    if model not in DINOV2_HUB_MODELS:
        raise ValueError(f"model={model!r} is no DINOv2 extractor; allowed: {sorted(DINOV2_HUB_MODELS)}")
    hub, name = Path(torch.hub.get_dir()), DINOV2_HUB_MODELS[model]  # e.g. dinov2_vitl14
    return {"repo_url": DINOV2_REPO_URL, "repo_dir": hub / _DINOV2_REPO_FOLDER,
            "weights_url": f"{DINOV2_WEIGHTS_BASE_URL}/{name}/{name}_pretrain.pth",
            "weights_path": hub / "checkpoints" / f"{name}_pretrain.pth"}


# ---- Inception's spatial feature (sFID) ----
#
# ADM's evaluator (openai/guided-diffusion evaluations/evaluator.py, which the DiT paper used) reads sFID from the
# 2015-12-05 TF graph's tensor "mixed_6/conv:0", NHWC (N, 17, 17, 192) at the graph's 299 x 299 input, and keeps
# `spatial[..., :7]` reshaped to (N, 2023). Which tensor of torch-fidelity's port that is:
#  - block: the graph numbers its Inception blocks mixed, mixed_1, ..., mixed_10; the port names them Mixed_5b, 5c,
#    5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c, so mixed_6 is Mixed_6d, the third 17 x 17 block (torch-fidelity's weight
#    converter, utils/util_convert_inception_weights.py, maps mixed_6/conv/{conv2d_params, batchnorm} to
#    Mixed_6d.branch1x1.{conv, bn}).
#  - branch: the block's own "conv" (its towers are mixed_6/tower*/conv*) is the 1x1 branch, Mixed_6d.branch1x1,
#    192 channels; InceptionC concatenates it first, so it is also channels 0-191 of Mixed_6d's output.
#  - after batch norm and ReLU: the graph's ops in that scope run conv/Conv2D -> conv/batchnorm -> CheckNumerics ->
#    control_dependency -> "conv", the ReLU, so the op named exactly mixed_6/conv is the ReLU output, what the
#    port's BasicConv2d returns (conv, bn, relu). A forward hook on Mixed_6d.branch1x1 sees it, in NCHW.
# Layout: the map is permuted to NHWC before ADM's slice and reshape, so features are flattened (H, W, 7) as ADM's.
# One coordinate permutation applied to both sets leaves a Frechet distance unchanged, so the order cannot change
# an sFID computed here from images; it matters for statistics computed elsewhere: ADM's reference batches hold
# mu_s and sigma_s in (H, W, C) order, and only features flattened the same way can be compared with them.
# Input: the port resizes to 299 x 299 as TF1 does and maps [0, 255] to [-1, 1], as the graph does to the uint8-valued
# NHWC batches ADM feeds (at their own resolution) into ExpandDims:0.


class InceptionV3SpatialExtractor(FeatureExtractorBase):
    """torch-fidelity's TF Inception (the same weights) with one more feature: SPATIAL_FEATURE, ADM's sFID
    feature (N, 2023), from the tensor TF names mixed_6/conv:0."""

    SPATIAL_SOURCE = ("TF mixed_6/conv:0 = Mixed_6d.branch1x1 after BN+ReLU (N, 17, 17, 192): "
                      "[..., :7] flattened (H, W, C)")

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        # torch-fidelity's forward stops after the last feature asked for; '768' (after Mixed_6e) is its first stop
        # past Mixed_6d, so the spatial feature alone skips the Mixed_7 blocks.
        pooled = [f for f in features_list if f != SPATIAL_FEATURE] or ["768"]
        self.inception = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, pooled, **kwargs)
        self._mixed_6_conv: torch.Tensor | None = None
        self.inception.Mixed_6d.branch1x1.register_forward_hook(self._keep_mixed_6_conv)

    def _keep_mixed_6_conv(self, module, inputs, output):
        self._mixed_6_conv = output

    def _run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return ({pooled feature: (N, D)}, mixed_6/conv:0 as float32 NHWC (N, 17, 17, 192)) of uint8 images."""
        pooled = self.inception(x)
        nchw, self._mixed_6_conv = self._mixed_6_conv, None
        return dict(zip(self.inception.features_list, pooled)), nchw.permute(0, 2, 3, 1).to(torch.float32)

    def mixed_6_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Return TF's mixed_6/conv:0 of uint8 images (N, 3, H, W): float32 (N, 17, 17, 192), NHWC like the graph."""
        return self._run(x)[1]

    def forward(self, x):
        features, nhwc = self._run(x)
        features[SPATIAL_FEATURE] = spatial_feature(nhwc)
        return tuple(features[f] for f in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL_FEATURE)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "sfid":
            return SPATIAL_FEATURE
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    @staticmethod
    def can_be_compiled():
        return False  # the hook hands a tensor from inside the network to forward

    @staticmethod
    def get_dummy_input_for_compile():
        return FeatureExtractorInceptionV3.get_dummy_input_for_compile()

if INCEPTION_SPATIAL_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(INCEPTION_SPATIAL_EXTRACTOR, InceptionV3SpatialExtractor)

def offline_message(extractor: str) -> str:
    """Return what to fetch, and where to put it, when extractor weights cannot be downloaded."""
    hub = "torch hub's checkpoint folder: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints"
    if extractor not in (INCEPTION_EXTRACTOR, INCEPTION_SPATIAL_EXTRACTOR):
        return (f"cannot download the {extractor} weights (offline?): torch-fidelity fetches them into "
                f"{inception_weights_path().parent} ({hub}); copy them there from a machine with network.")
    return (f"cannot download the {INCEPTION_EXTRACTOR} weights (offline?), which FID, IS, KID, precision/recall "
            f"and sFID share. Fetch\n  {URL_INCEPTION_V3}\nand put the file at\n  {inception_weights_path()}\n({hub}).")

def dinov2_missing(model: str) -> list[str]:
    """Return which of torch hub's DINOv2 files are missing: 'repo' (the code), 'weights'."""
    p = dinov2_paths(model)
    # torch hub falls back on <owner>_<repo>_main, then _master, when it cannot ask GitHub for the default branch.
    repos = (p["repo_dir"], p["repo_dir"].with_name(_DINOV2_REPO_FOLDER.replace("_main", "_master")))
    missing = [] if any((r / "hubconf.py").is_file() for r in repos) else ["repo"]
    return missing + ([] if p["weights_path"].is_file() else ["weights"])

def dinov2_offline_message(model: str, missing: list[str]) -> str:
    """Return what to fetch for a DINOv2 extractor, and exactly where torch hub looks for it."""
    p = dinov2_paths(model)
    state = {k: "MISSING" if k in missing else "present" for k in ("repo", "weights")}
    return (f"FD-DINOv2 ({model}) needs torch hub's copy of the DINOv2 code and weights and cannot download them "
            f"(offline?). Fetch them on a machine with network and copy them here:\n"
            f"  code ({state['repo']}): git clone {p['repo_url']} {p['repo_dir']}\n"
            f"  weights ({state['weights']}): {p['weights_url']}\n    -> {p['weights_path']}\n"
            f"(torch hub's folder is $TORCH_HOME/hub, default ~/.cache/torch/hub; the code folder must be named "
            f"{_DINOV2_REPO_FOLDER}, torch hub's name for the repository's main branch).")
