"""Sample quality metrics: FID, sFID, Inception Score, KID, precision and recall, and the opt-in FD-DINOv2.

ImageNet uses torch-fidelity's `inception-v3-compat` extractor (the TF Inception the FID literature and
the DiT paper use). The embedded digits set gets its own extractor, `digits-cnn`: a small classifier
trained deterministically on the digits' training split in seconds, cached, and registered with
torch-fidelity. A metric measured with it is not comparable to an Inception one, so it is labelled
"FID (digits extractor)", "sFID (digits extractor)", ... everywhere (`metric_label`).

FID, IS, KID and precision/recall come from one torch-fidelity call. sFID (ADM's spatial FID, the paper's
second metric) and FD-DINOv2 (Stein et al. 2023) read other feature spaces: their features come from
torch-fidelity extractors too, their statistics from `feature_statistics` and their distance from
`frechet_distance`. docs/metrics.md describes every metric, its feature space and what it needs offline.

Reference statistics are cached under a key that holds a content hash of the reference images
(`reference_stats_id`), inside a cache folder named by the extractor (and, for the digits CNN, its weights):
torch-fidelity's own cache is keyed by name only, so a changed reference set, or a retrained digits
extractor, would otherwise silently return a stale FID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_HUB_MODELS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from harness.core import cli
from harness.core.runfolder import atomic_open, atomic_write_bytes
from harness.core.vocabulary import (  # noqa: F401 - the names a metric list is checked against, re-exported here
    DEFAULT_METRICS,
    DIGITS_EXTRACTOR,
    DINOV2_EXTRACTOR,
    FRECHET_METRICS,
    INCEPTION_EXTRACTOR,
    INCEPTION_SPATIAL_EXTRACTOR,
    ISC_LAYER,
    METRICS,
    NAMES,
    SFID_COMPANIONS,
    SPATIAL_FEATURE,
    metric_label,
    metric_problems,
    sfid_extractor,
    sfid_extractors,
)
from harness.data import datasets
from harness.data.datasets import to_uint8_rgb  # noqa: F401 - part of this module's interface (the evaluator's pixels)

log = logging.getLogger(__name__)

_TORCH_FIDELITY_METRICS = ("fid", "isc", "kid", "prc")  # computed by one torch_fidelity.calculate_metrics call

# torch-fidelity's defaults, stated here so every record can say which settings produced it.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # reduced to the smaller set's size when fewer images are given
ISC_SPLITS = 10  # reduced to the sample count when fewer samples are given
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019)
METRICS_SEED = 2020  # KID subset draws and IS shuffling

# sFID's feature, as ADM's evaluator computes it (Nash et al. 2021, "Generating images with sparse
# representations"): the first SFID_CHANNELS channels of a mid-level feature map, flattened in (H, W, channel)
# order. An extractor that provides it names it SPATIAL_FEATURE (harness.core.vocabulary).
SFID_CHANNELS = 7  # ADM evaluator: `spatial[..., :7]`

# torch-fidelity's result keys -> the keys of evals/step_N.json (docs/run_folder.md)
_RESULT_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
}
_ISC_LAYER = ISC_LAYER
_DINOV2_LAYER = "dinov2"  # torch-fidelity's name for the DINOv2 embedding (the final-norm CLS token)

# Where torch hub's DINOv2 comes from: torch-fidelity calls torch.hub.load("facebookresearch/dinov2", ...), whose
# hubconf (facebookresearch/dinov2 dinov2/hub/backbones.py, utils.py) fetches
# <base>/<model>/<model>_pretrain.pth into torch hub's checkpoint folder.
DINOV2_REPO_URL = "https://github.com/facebookresearch/dinov2"
DINOV2_WEIGHTS_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
_DINOV2_REPO_FOLDER = "facebookresearch_dinov2_main"  # torch hub's folder name: <owner>_<repo>_<branch>
_PROBE_IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)  # every extractor here resizes, so any size probes widths


class MissingWeightsError(cli.MissingWeights):
    """Feature extractor weights (or torch hub's code) are not on disk and cannot be downloaded; the message says
    what to fetch and where to put it. A cli.MissingWeights, so commands report it in one line."""


def cache_dir() -> Path:
    """Return the harness cache folder: $HARNESS_CACHE, else ~/.cache/harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").expanduser()


def default_extractor(data_name: str) -> str:
    """Return the feature extractor for a data set: the digits CNN for digits, Inception otherwise."""
    return DIGITS_EXTRACTOR if data_name == "digits" else INCEPTION_EXTRACTOR


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


def spatial_feature(nhwc: torch.Tensor) -> torch.Tensor:
    """Return sFID's feature of feature maps in TF layout (N, H, W, C): float32 (N, H * W * SFID_CHANNELS), the
    first SFID_CHANNELS channels flattened in (H, W, channel) order, as ADM's `spatial[..., :7]` then reshape."""
    if nhwc.ndim != 4 or nhwc.shape[-1] < SFID_CHANNELS:
        raise ValueError(f"expected feature maps (N, H, W, C >= {SFID_CHANNELS}), got {tuple(nhwc.shape)}")
    return nhwc[..., :SFID_CHANNELS].reshape(nhwc.shape[0], -1).to(torch.float32)


# ---- the digits feature extractor ----

DIGITS_CNN_SIZE = 16  # input resolution of the classifier; other resolutions are resized to it
DIGITS_CNN_FEATURE_DIM = 64  # the pooled feature that FID, KID and precision/recall read
_DIGITS_FEATURE_LAYER = str(DIGITS_CNN_FEATURE_DIM)  # torch-fidelity names layers by width ("2048")
# sFID's map, the digits' analogue of Inception's mixed_6/conv: the middle conv layer's ReLU output after its max
# pool, body[:6] -> (N, 32, 4, 4), whose first SFID_CHANNELS channels give 4 x 4 x 7 = 112 features. Like mixed_6
# (the 17 x 17 stage, before the 8 x 8 one) it is mid-network and spatial. The 8 x 8 map before the pool would give
# 448 features, more than the 299 test images the digits demo compares against: a singular covariance, as
# mixed_6/conv's 2,023 features are for 50,000 ImageNet references (25 images per feature); 112 keep ~3.
_DIGITS_SPATIAL_END = 6
# Changing any value retrains: the cache key hashes this recipe together with the training data.
_DIGITS_RECIPE = {"version": 1, "size": DIGITS_CNN_SIZE, "epochs": 10, "batch": 64, "lr": 1e-2, "seed": 0}


class DigitsCNN(nn.Module):
    """Small digit classifier: three conv layers, global average pooling (the feature), a linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16 -> 8
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(32, DIGITS_CNN_FEATURE_DIM, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(DIGITS_CNN_FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (features (N, 64), logits (N, classes)) of images (N, 1, 16, 16) in [-1, 1]."""
        feat = self.body(x)
        return feat, self.head(feat)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (sFID's map (N, 32, 4, 4), features (N, 64), logits (N, classes)) of images (N, 1, 16, 16): the
        same computation as forward, which training uses, split after the second conv block."""
        mid = self.body[:_DIGITS_SPATIAL_END](x)
        feat = self.body[_DIGITS_SPATIAL_END:](mid)
        return mid, feat, self.head(feat)


def _digits_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Return uint8 images (N, 3, H, W) as grayscale float (N, 1, 16, 16) in [-1, 1]."""
    x = x.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1.0
    if x.shape[-2:] != (DIGITS_CNN_SIZE, DIGITS_CNN_SIZE):
        x = F.interpolate(x, size=(DIGITS_CNN_SIZE, DIGITS_CNN_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
    return x


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a trained DigitsCNN; weights come from `digits_extractor_info`."""

    SPATIAL_SOURCE = "DigitsCNN conv2 ReLU after its 2x2 max pool (N, 4, 4, 32): [..., :7] flattened (H, W, C)"

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{DIGITS_EXTRACTOR} needs feature_extractor_weights_path: "
                             "call harness.metrics.fidelity.digits_extractor_info() and pass its 'weights_path'")
        ckpt = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net = DigitsCNN()
        self.net.load_state_dict(ckpt["model"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return _DIGITS_FEATURE_LAYER, "logits_unbiased", "logits", SPATIAL_FEATURE

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": _DIGITS_FEATURE_LAYER, "kid": _DIGITS_FEATURE_LAYER,
                "prc": _DIGITS_FEATURE_LAYER, "sfid": SPATIAL_FEATURE}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, DIGITS_CNN_SIZE, DIGITS_CNN_SIZE, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        mid, feat, logits = self.net.features(_digits_preprocess(x))
        # Like Inception's 'logits_unbiased': the head without its bias, what torch-fidelity's IS reads.
        features = {_DIGITS_FEATURE_LAYER: feat, "logits_unbiased": feat @ self.net.head.weight.T,
                    "logits": logits, SPATIAL_FEATURE: spatial_feature(mid.permute(0, 2, 3, 1))}
        return tuple(features[a] for a in self.features_list)


def _digits_split(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 (N, 1, S, S) in [-1, 1], labels int64) of the embedded digits split."""
    images, labels = datasets.digits_split(split, image_size)
    return np.asarray(images, dtype=np.float32), np.asarray(labels, dtype=np.int64)


@contextlib.contextmanager
def _deterministic(seed: int):
    """Seed torch, use deterministic kernels and one thread; restore the caller's RNG and settings on exit."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    num_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        # One thread: CPU reductions then do not depend on the core count (the weights did: 1 vs 2 threads
        # gave different hashes), and this tiny net trains 10x faster than on 2 threads of a busy machine.
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(num_threads)
            torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def _train_digits_cnn(recipe: dict) -> tuple[dict[str, torch.Tensor], float, int, int]:
    """Return (state dict, held-out accuracy in [0, 1], train count, held-out count) of a fresh DigitsCNN."""
    x_train, y_train = _digits_split("train", recipe["size"])
    x_test, y_test = _digits_split("test", recipe["size"])
    # Train on what the extractor will see: uint8 images through the extractor's own preprocessing.
    u_train = torch.from_numpy(to_uint8_rgb(x_train)).permute(0, 3, 1, 2)
    u_test = torch.from_numpy(to_uint8_rgb(x_test)).permute(0, 3, 1, 2)
    y_train_t, y_test_t = torch.from_numpy(y_train), torch.from_numpy(y_test)
    with _deterministic(recipe["seed"]):
        net = DigitsCNN()
        opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
        steps_per_epoch = -(-len(u_train) // recipe["batch"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"],
                                                    total_steps=recipe["epochs"] * steps_per_epoch)
        x_all = _digits_preprocess(u_train)
        for _ in range(recipe["epochs"]):
            perm = torch.randperm(len(u_train))
            for idx in perm.split(recipe["batch"]):
                _, logits = net(x_all[idx])
                loss = F.cross_entropy(logits, y_train_t[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            _, logits = net(_digits_preprocess(u_test))
    accuracy = float((logits.argmax(1) == y_test_t).float().mean())
    return net.state_dict(), accuracy, len(u_train), len(u_test)


def _state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Return the sha256 hex digest of a state dict's names, shapes and tensor bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _digits_weights_key() -> str:
    """Return the sha256 of the recipe and both digits splits: a changed split or recipe retrains."""
    key = hashlib.sha256(json.dumps(_DIGITS_RECIPE, sort_keys=True).encode())
    for split in ("train", "test"):
        for arr in _digits_split(split, _DIGITS_RECIPE["size"]):
            key.update(np.ascontiguousarray(arr).tobytes())
    return key.hexdigest()


_DIGITS_INFO: dict[str, dict] = {}  # weights path -> info, so a process trains or loads at most once


def digits_extractor_info(cache: Path | None = None) -> dict:
    """Train (deterministically, CPU, seconds) or load the cached digits CNN, register it, return its facts.

    Returns {"name", "heldout_accuracy" (fraction), "weights_sha256", "feature_dim", "weights_path",
    "num_train", "num_heldout"}.
    """
    cache = Path(cache) if cache is not None else cache_dir()
    path = cache / "digits_cnn" / f"{DIGITS_EXTRACTOR}_{_digits_weights_key()[:12]}.pt"
    if str(path) in _DIGITS_INFO:
        return dict(_DIGITS_INFO[str(path)])

    ckpt = None
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if _state_sha256(ckpt["model"]) != ckpt["weights_sha256"]:
            log.warning("digits extractor weights %s fail their checksum: retraining", path)
            ckpt = None
    if ckpt is None:
        state, accuracy, num_train, num_heldout = _train_digits_cnn(_DIGITS_RECIPE)
        ckpt = {"model": state, "heldout_accuracy": accuracy, "weights_sha256": _state_sha256(state),
                "num_train": num_train, "num_heldout": num_heldout, "recipe": json.dumps(_DIGITS_RECIPE)}
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        atomic_write_bytes(path, buf.getvalue())
        log.info("trained %s: held-out accuracy %.4f, cached at %s", DIGITS_EXTRACTOR, accuracy, path)

    if DIGITS_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(DIGITS_EXTRACTOR, DigitsFeatureExtractor)
    info = {"name": DIGITS_EXTRACTOR, "heldout_accuracy": float(ckpt["heldout_accuracy"]),
            "weights_sha256": ckpt["weights_sha256"], "feature_dim": DIGITS_CNN_FEATURE_DIM,
            "weights_path": str(path), "num_train": int(ckpt["num_train"]),
            "num_heldout": int(ckpt["num_heldout"])}
    _DIGITS_INFO[str(path)] = info
    return dict(info)


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

# Extractors without a spatial feature of their own, and the registered extractor that computes their sFID.
_SFID_COMPANIONS = SFID_COMPANIONS


def _extractor_class(extractor: str) -> type[FeatureExtractorBase] | None:
    """Return the torch-fidelity extractor class of a name (the digits CNN before it is registered too), or None."""
    return DigitsFeatureExtractor if extractor == DIGITS_EXTRACTOR else FEATURE_EXTRACTORS_REGISTRY.get(extractor)


_sfid_extractor = sfid_extractor
_sfid_extractors = sfid_extractors


# ---- Frechet distance and reference statistics ----

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


def _check_images(images: np.ndarray, what: str) -> None:
    """Raise ValueError unless images is a non-empty uint8 array (N, H, W, 3)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3 or images.shape[0] == 0:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{what} must be a non-empty uint8 array (N, H, W, 3) (ADM npz layout), got {desc}")


def _check_name_part(value: str, what: str) -> None:
    """Raise ValueError unless value can be part of a cache file name."""
    if not isinstance(value, str) or not value or any(c in value for c in "/\\") or value.split() != [value]:
        raise ValueError(f"{what}={value!r} must be a non-empty string without '/', '\\' or whitespace")


def _reference_stats_ids(images_uint8: np.ndarray, data_name: str, split: str, extractors) -> dict[str, str]:
    """Return {extractor: reference_stats_id}, hashing the images once (a 50k ImageNet set takes seconds)."""
    _check_images(images_uint8, "images_uint8")
    _check_name_part(data_name, "data_name")
    _check_name_part(split, "split")
    for extractor in extractors:
        _check_name_part(extractor, "extractor")
    _, h, w, _ = images_uint8.shape
    digest = hashlib.sha256(f"{images_uint8.shape}|{images_uint8.dtype}|".encode())
    digest.update(np.ascontiguousarray(images_uint8).data)  # no copy when already contiguous
    res = f"{h}" if h == w else f"{h}x{w}"
    return {e: f"{data_name}_{split}_{res}_{e}_{digest.hexdigest()[:12]}" for e in extractors}


def reference_stats_id(images_uint8: np.ndarray, data_name: str, split: str, extractor: str) -> str:
    """Return the statistics key '<data>_<split>_<res>_<extractor>_<sha256[:12] of shape and bytes>'."""
    return _reference_stats_ids(images_uint8, data_name, split, [extractor])[extractor]


def reference_images(data_cfg, split: str = "test", max_images: int | None = None) -> np.ndarray:
    """Return the reference set of a data config as uint8 (N, H, W, 3).

    digits: the split at data_cfg.image_size. imagefolder: the training images (ADM's reference is the
    training set; other splits are refused), ADM centre crop to data_cfg.image_size. max_images keeps a
    fixed seeded subset, in data set order.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images} must be positive or None")
    if data_cfg.name not in ("digits", "imagefolder"):
        raise ValueError(f"no reference images for data={data_cfg.name!r}: allowed 'digits', 'imagefolder' "
                         "(pass synthetic references to compute_metrics directly)")
    ds = datasets.build_dataset(data_cfg, split)
    keep = np.arange(len(ds))
    if max_images is not None and len(ds) > max_images:
        keep = np.sort(np.random.default_rng(0).choice(len(ds), max_images, replace=False))
    if data_cfg.name == "digits":
        return to_uint8_rgb(ds.images[torch.from_numpy(keep)])
    size = int(data_cfg.image_size)
    out = np.empty((len(keep), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(keep):
        with Image.open(ds.samples[i][0]) as im:
            # uint8 straight from the ADM crop: no float round trip between the files and the extractor
            out[j] = np.asarray(datasets.center_crop_arr(im.convert("RGB"), size))
    return out


# ---- the metrics ----

class _UInt8Images(Dataset):
    """uint8 (N, H, W, 3) array as a Dataset of uint8 tensors (3, H, W), torch-fidelity's input layout."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images)  # shares memory: 50k ImageNet samples are not copied

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i].permute(2, 0, 1)


@dataclasses.dataclass(frozen=True)
class _FeatureSpace:
    """Where a metric reads its features: an extractor, one of its layers, its weights, its statistics cache."""

    extractor: str
    layer: str
    weights_path: str | None  # None: torch-fidelity's pinned Inception download, or torch hub's DINOv2
    stats_root: Path  # cache folder named by the extractor (and, for the digits CNN, by its weights)


def _feature_spaces(metrics, extractor: str, dinov2_model: str,
                    cache: Path) -> tuple[_FeatureSpace, dict[str, _FeatureSpace], dict]:
    """Return (the extractor's FID space, {metric: space}, facts about the extractor for the record); trains or
    loads the digits CNN when it is the extractor."""
    if extractor == DIGITS_EXTRACTOR:
        info = digits_extractor_info(cache)
        weights_path = info["weights_path"]
        # Features of a retrained extractor must never meet cached features of the old one.
        root = cache / "fidelity" / f"{extractor}_{info['weights_sha256'][:12]}"
        extractor_info = {k: info[k] for k in ("name", "heldout_accuracy", "weights_sha256")}
    else:
        weights_path = None  # torch-fidelity's pinned weights (Inception's URL carries its hash)
        root = cache / "fidelity" / extractor
        extractor_info = {"name": extractor}
        if extractor == INCEPTION_EXTRACTOR:
            extractor_info["weights_url"] = URL_INCEPTION_V3
    cls = _extractor_class(extractor)
    spaces = {}
    for m in metrics:
        if m == "fd_dinov2":
            spaces[m] = _FeatureSpace(dinov2_model, _DINOV2_LAYER, None, cache / "fidelity" / dinov2_model)
        elif m == "sfid" and _sfid_extractor(extractor) == extractor:
            spaces[m] = _FeatureSpace(extractor, SPATIAL_FEATURE, weights_path, root)
        elif m == "sfid":
            companion = _sfid_extractor(extractor)  # the same weights, which torch-fidelity fetches itself
            spaces[m] = _FeatureSpace(companion, SPATIAL_FEATURE, None, cache / "fidelity" / companion)
        else:
            spaces[m] = _FeatureSpace(extractor, cls.get_default_feature_layer_for_metric(m), weights_path, root)
    main = _FeatureSpace(extractor, cls.get_default_feature_layer_for_metric("fid"), weights_path, root)
    return main, spaces, extractor_info


_FEATURE_DIMS: dict[tuple, dict[str, int]] = {}


def _probe_feature_dims(extractor: str, weights_path: str | None, layers, image: np.ndarray, cuda: bool,
                        use_cache: bool = True) -> dict[str, int]:
    """Return {layer: width} of an extractor by running it on one uint8 image (H, W, 3) (loads the weights)."""
    layers = sorted(set(layers))
    # Weights that torch hub fetches live in its folder, which another $TORCH_HOME may lack: part of the key.
    key = (extractor, weights_path or f"hub:{torch.hub.get_dir()}", tuple(layers), image.shape)
    if key not in _FEATURE_DIMS or not use_cache:
        fe = create_feature_extractor(extractor, layers, cuda=cuda, verbose=False,
                                      feature_extractor_weights_path=weights_path)
        x = torch.from_numpy(image[None]).permute(0, 3, 1, 2)
        with torch.no_grad():
            features = fe(x.cuda() if cuda else x)
        _FEATURE_DIMS[key] = {layer: int(f.shape[1]) for layer, f in zip(layers, features)}
    return dict(_FEATURE_DIMS[key])


def _offline_message(extractor: str) -> str:
    """Return what to fetch, and where to put it, when extractor weights cannot be downloaded."""
    hub = "torch hub's checkpoint folder: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints"
    if extractor not in (INCEPTION_EXTRACTOR, INCEPTION_SPATIAL_EXTRACTOR):
        return (f"cannot download the {extractor} weights (offline?): torch-fidelity fetches them into "
                f"{inception_weights_path().parent} ({hub}); copy them there from a machine with network.")
    return (f"cannot download the {INCEPTION_EXTRACTOR} weights (offline?), which FID, IS, KID, precision/recall "
            f"and sFID share. Fetch\n  {URL_INCEPTION_V3}\nand put the file at\n  {inception_weights_path()}\n({hub}).")


def _dinov2_missing(model: str) -> list[str]:
    """Return which of torch hub's DINOv2 files are missing: 'repo' (the code), 'weights'."""
    p = dinov2_paths(model)
    # torch hub falls back on <owner>_<repo>_main, then _master, when it cannot ask GitHub for the default branch.
    repos = (p["repo_dir"], p["repo_dir"].with_name(_DINOV2_REPO_FOLDER.replace("_main", "_master")))
    missing = [] if any((r / "hubconf.py").is_file() for r in repos) else ["repo"]
    return missing + ([] if p["weights_path"].is_file() else ["weights"])


def _dinov2_offline_message(model: str, missing: list[str]) -> str:
    """Return what to fetch for a DINOv2 extractor, and exactly where torch hub looks for it."""
    p = dinov2_paths(model)
    state = {k: "MISSING" if k in missing else "present" for k in ("repo", "weights")}
    return (f"FD-DINOv2 ({model}) needs torch hub's copy of the DINOv2 code and weights and cannot download them "
            f"(offline?). Fetch them on a machine with network and copy them here:\n"
            f"  code ({state['repo']}): git clone {p['repo_url']} {p['repo_dir']}\n"
            f"  weights ({state['weights']}): {p['weights_url']}\n    -> {p['weights_path']}\n"
            f"(torch hub's folder is $TORCH_HOME/hub, default ~/.cache/torch/hub; the code folder must be named "
            f"{_DINOV2_REPO_FOLDER}, torch hub's name for the repository's main branch).")


def _load_spaces(spaces, image: np.ndarray, cuda: bool) -> dict[tuple[str, str], int]:
    """Load every extractor the spaces need and return {(extractor, layer): width}; raises MissingWeightsError
    saying what to fetch, and where, for weights that are neither on disk nor downloadable."""
    groups: dict[tuple[str, str | None], set[str]] = {}
    for s in spaces:
        groups.setdefault((s.extractor, s.weights_path), set()).add(s.layer)
    dims = {}
    for (extractor, weights_path), layers in groups.items():
        if extractor in DINOV2_HUB_MODELS:
            missing = _dinov2_missing(extractor)
            try:  # torch hub downloads what is missing when it can
                found = _probe_feature_dims(extractor, weights_path, layers, image, cuda, use_cache=not missing)
            except Exception as e:
                # Whatever torch hub raises without network (URLError, or RuntimeError when it cannot ask GitHub
                # for the default branch and has no cached copy), the cure is the files; the cause stays chained.
                if missing:
                    raise MissingWeightsError(_dinov2_offline_message(extractor, missing)) from e
                raise
        else:
            try:
                found = _probe_feature_dims(extractor, weights_path, layers, image, cuda)
            except URLError as e:
                raise MissingWeightsError(_offline_message(extractor)) from e
        dims.update({(extractor, layer): width for layer, width in found.items()})
    return dims


def preflight(metrics, extractor: str, cuda: bool, *, dinov2_model: str = DINOV2_EXTRACTOR,
              cache: Path | None = None) -> dict:
    """Load every feature extractor these metrics need, before any sampling, and return their feature spaces:
    {metric: {"extractor", "layer", "feature_dim"}}.

    Trains the digits CNN once when it is not cached (seconds). Raises ValueError listing `metric_problems`, and
    MissingWeightsError saying what to fetch and where to put it when weights (Inception) or torch hub's code and
    weights (DINOv2) are neither on disk nor downloadable.
    """
    problems = metric_problems(metrics, extractor, dinov2_model)
    if problems:
        raise ValueError(f"cannot compute metrics={list(metrics)} with extractor {extractor!r}:\n  - "
                         + "\n  - ".join(problems))
    cache = Path(cache) if cache is not None else cache_dir()
    if "fd_dinov2" in metrics and _dinov2_missing(dinov2_model):  # fetched, or said missing, before other work
        _load_spaces([_FeatureSpace(dinov2_model, _DINOV2_LAYER, None, cache / "fidelity" / dinov2_model)],
                     _PROBE_IMAGE, cuda)
    _, spaces, _ = _feature_spaces(tuple(dict.fromkeys(metrics)), extractor, dinov2_model, cache)
    dims = _load_spaces(spaces.values(), _PROBE_IMAGE, cuda)
    return {m: {"extractor": s.extractor, "layer": s.layer, "feature_dim": dims[(s.extractor, s.layer)]}
            for m, s in spaces.items()}


def _extract_features(fe: FeatureExtractorBase, images: np.ndarray, batch_size: int, cuda: bool) -> np.ndarray:
    """Return the one feature fe was built for, of uint8 images (N, H, W, 3): float32 (N, D)."""
    (layer,) = fe.get_requested_features_list()
    out = get_featuresdict_from_dataset(_UInt8Images(images), fe, batch_size, cuda, True, False)
    return out[layer].numpy()


def _frechet_in_space(space: _FeatureSpace, samples: np.ndarray, reference: np.ndarray, stats_id: str,
                      batch_size: int, cuda: bool) -> float:
    """Return the Frechet distance of samples to the reference in one feature space; the reference's statistics
    are read from, or written to, '<stats_root>/<stats_id>-<layer>-stats.npz'."""
    fe = create_feature_extractor(space.extractor, [space.layer], cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=space.weights_path)
    path = space.stats_root / f"{stats_id}-{space.layer}-stats.npz"
    if path.exists():
        with np.load(path) as z:
            mu_ref, sigma_ref = z["mu"], z["sigma"]
    else:
        mu_ref, sigma_ref = feature_statistics(_extract_features(fe, reference, batch_size, cuda))
        with atomic_open(path) as f:  # a killed evaluation never leaves half a statistics file
            np.savez(f, mu=mu_ref, sigma=sigma_ref, num_images=len(reference))
    mu, sigma = feature_statistics(_extract_features(fe, samples, batch_size, cuda))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


def _warn(message: str, record: list[str]) -> None:
    """Warn loudly (warnings + log) and keep the message for the evaluation record."""
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    record.append(message)


def _check_inputs(samples_uint8, reference_uint8, metrics: tuple, device: str, batch_size: int) -> None:
    """Raises ValueError naming what is wrong with compute_metrics' inputs."""
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics={list(metrics)}: each must be one of {list(METRICS)} (at least one)")
    _check_images(samples_uint8, "samples_uint8")
    _check_images(reference_uint8, "reference_uint8")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r}: allowed 'cpu', 'cuda', 'cuda:N'")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if min(len(samples_uint8), len(reference_uint8)) < 2:
        raise ValueError(f"need at least 2 samples and 2 reference images, "
                         f"got {len(samples_uint8)} and {len(reference_uint8)}")


def _torch_fidelity_values(samples_uint8, reference_uint8, metrics: list[str], extractor: str, main, stats_id: str,
                           settings: dict, cuda: bool) -> dict:
    """Returns FID, IS, KID and precision/recall (those in `metrics`) from one torch-fidelity pass."""
    try:
        raw = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(samples_uint8), input2=_UInt8Images(reference_uint8),
            cuda=cuda, batch_size=settings["batch_size"], feature_extractor=extractor,
            feature_extractor_weights_path=main.weights_path,
            isc="isc" in metrics, fid="fid" in metrics, kid="kid" in metrics, prc="prc" in metrics,
            # important: the cache name holds the content hash (torch-fidelity keys its cache by name only)
            input2_cache_name=stats_id, cache_root=str(main.stats_root), cache=True,
            kid_subsets=settings["kid_subsets"], kid_subset_size=settings["kid_subset_size"],
            isc_splits=settings["isc_splits"], prc_neighborhood=PRC_NEIGHBORHOOD, rng_seed=METRICS_SEED,
            save_cpu_ram=True,  # in-memory tensors: loader worker processes only cost start-up time
            verbose=False,
        )
    except URLError as e:
        raise MissingWeightsError(_offline_message(extractor)) from e
    return {_RESULT_KEYS[k]: float(v) for k, v in raw.items() if k in _RESULT_KEYS}


def _space_record(metric: str, space, dims: dict, stats_ids: dict) -> dict:
    """Returns the record's description of one metric's feature space."""
    rec = {"extractor": space.extractor, "layer": space.layer, "feature_dim": dims[(space.extractor, space.layer)],
           "reference_stats_id": None if metric == "isc" else stats_ids[space.extractor]}
    if metric == "sfid":
        rec["source"] = getattr(_extractor_class(space.extractor), "SPATIAL_SOURCE", None)
    if metric == "fd_dinov2":
        rec["weights_url"] = dinov2_paths(space.extractor)["weights_url"]
    return rec


def compute_metrics(samples_uint8: np.ndarray, reference_uint8: np.ndarray, *, extractor: str, data_name: str,
                    split: str = "test", metrics=DEFAULT_METRICS, cache: Path | None = None, batch_size: int = 256,
                    device: str = "cpu", dinov2_model: str = DINOV2_EXTRACTOR) -> dict:
    """Return the metric record of samples against a reference set, both uint8 (N, H, W, 3).

    Record: {"metrics": {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "sfid",
    "fd_dinov2"} (those asked for), "metric_label" (the FID's), "metric_labels" ({metric: label}), "extractor",
    "reference_stats_id" (the extractor's), "num_samples", "num_reference", "feature_dim" (the extractor's FID
    layer), "feature_spaces" ({metric: {"extractor", "layer", "feature_dim", "reference_stats_id" (None for IS)}},
    sFID's with its "source" tensor), "metric_wall_s" ({metrics computed together: seconds}), "settings",
    "versions", "extractor_info" (digits: held-out accuracy and weights hash), "warnings"}.
    """
    metrics = tuple(dict.fromkeys(metrics))
    _check_inputs(samples_uint8, reference_uint8, metrics, device, batch_size)
    cuda = device != "cpu"
    cache = Path(cache) if cache is not None else cache_dir()
    num_samples, num_reference = len(samples_uint8), len(reference_uint8)
    record_warnings: list[str] = []

    cls = _extractor_class(extractor)
    if cls is None:
        raise ValueError(f"extractor={extractor!r} is not registered; allowed: "
                         f"{sorted(set(FEATURE_EXTRACTORS_REGISTRY) | {DIGITS_EXTRACTOR})}")
    # Kept from before metric_problems existed: IS asked for (it is in the default list) with an extractor
    # without logits is skipped loudly rather than refused.
    if "isc" in metrics and _ISC_LAYER not in cls.get_provided_features_list():
        _warn(f"Inception Score skipped: extractor {extractor} has no '{_ISC_LAYER}' layer", record_warnings)
        metrics = tuple(m for m in metrics if m != "isc")
        if not metrics:
            raise ValueError(f"extractor {extractor} cannot compute any of the requested metrics")
    problems = metric_problems(metrics, extractor, dinov2_model)
    if problems:
        raise ValueError(f"cannot compute metrics={list(metrics)}: " + "; ".join(problems))

    # Every extractor is loaded before any image is: missing weights fail before any work.
    main, spaces, extractor_info = _feature_spaces(metrics, extractor, dinov2_model, cache)
    dims = _load_spaces([main, *spaces.values()], samples_uint8[0], cuda)
    feature_dim = dims[(main.extractor, main.layer)]
    extractor_info["feature_dim"] = feature_dim

    for m in FRECHET_METRICS:
        name = NAMES[m]
        d = dims[(spaces[m].extractor, spaces[m].layer)] if m in metrics else 0
        if min(num_samples, num_reference) < d:
            _warn(f"{name} from fewer images than feature dimensions ({num_samples} samples, {num_reference} "
                  f"reference images, {d} features): the covariance is singular and the {name} is biased; "
                  f"do not compare it with {name}s from more images", record_warnings)
    if "prc" in metrics and min(num_samples, num_reference) <= PRC_NEIGHBORHOOD:
        raise ValueError(f"precision/recall needs more than {PRC_NEIGHBORHOOD} images in each set, "
                         f"got {num_samples} and {num_reference}")

    stats_ids = _reference_stats_ids(reference_uint8, data_name, split,
                                     sorted({main.extractor, *(s.extractor for s in spaces.values())}))
    stats_id = stats_ids[extractor]
    settings = {"kid_subsets": KID_SUBSETS,
                "kid_subset_size": min(KID_SUBSET_SIZE, num_samples, num_reference),  # KID needs n >= it
                "isc_splits": min(ISC_SPLITS, num_samples), "prc_neighborhood": PRC_NEIGHBORHOOD,
                "rng_seed": METRICS_SEED, "batch_size": batch_size}
    values, wall_s = {}, {}
    with_fidelity = [m for m in metrics if m in _TORCH_FIDELITY_METRICS]
    if with_fidelity:
        t0 = time.perf_counter()
        values.update(_torch_fidelity_values(samples_uint8, reference_uint8, with_fidelity, extractor, main, stats_id,
                                             settings, cuda))
        wall_s["+".join(with_fidelity)] = time.perf_counter() - t0
    for m in metrics:
        if m not in _TORCH_FIDELITY_METRICS:  # one more pass over both sets, in another feature space
            t0 = time.perf_counter()
            space = spaces[m]
            values[m] = _frechet_in_space(space, samples_uint8, reference_uint8, stats_ids[space.extractor],
                                          batch_size, cuda)
            wall_s[m] = time.perf_counter() - t0
    for k, v in values.items():
        if not np.isfinite(v):
            _warn(f"{k} is {v}", record_warnings)

    feature_spaces = {m: _space_record(m, sp, dims, stats_ids) for m, sp in spaces.items()}
    labels = {m: metric_label(m, extractor=spaces[m].extractor if m == "fd_dinov2" else extractor) for m in metrics}
    return {"metrics": values, "metric_label": metric_label("fid", extractor=extractor), "metric_labels": labels,
            "extractor": extractor, "reference_stats_id": stats_id, "num_samples": num_samples,
            "num_reference": num_reference, "feature_dim": feature_dim, "feature_spaces": feature_spaces,
            "metric_wall_s": wall_s, "settings": settings,
            "versions": {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__},
            "extractor_info": extractor_info, "warnings": record_warnings}
