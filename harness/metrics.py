"""Sample quality metrics through torch-fidelity: FID, Inception Score, KID, precision and recall.

ImageNet uses torch-fidelity's `inception-v3-compat` extractor (the TF Inception the FID literature and
the DiT paper use). The embedded digits set gets its own extractor, `digits-cnn`: a small classifier
trained deterministically on the digits' training split in seconds, cached, and registered with
torch-fidelity. An FID measured with it is not comparable to an Inception FID, so it is labelled
"FID (digits extractor)" everywhere (`metric_label`).

Reference statistics are cached under a key that holds a content hash of the reference images
(`reference_stats_id`), inside a cache folder named by the extractor's weights: torch-fidelity's own
cache is keyed by name only, so a changed reference set, or a retrained digits extractor, would
otherwise silently return a stale FID.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
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
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from harness import data
from harness.runfolder import atomic_write_bytes

log = logging.getLogger(__name__)

DIGITS_EXTRACTOR = "digits-cnn"
INCEPTION_EXTRACTOR = "inception-v3-compat"
METRICS = ("fid", "isc", "kid", "prc")

# torch-fidelity's defaults, stated here so every record can say which settings produced it.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # reduced to the smaller set's size when fewer images are given
ISC_SPLITS = 10  # reduced to the sample count when fewer samples are given
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls (Kynkaanniemi et al. 2019)
METRICS_SEED = 2020  # KID subset draws and IS shuffling

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
_ISC_LAYER = "logits_unbiased"  # the layer torch-fidelity's Inception Score reads


class MissingWeightsError(RuntimeError):
    """Feature extractor weights are not on disk and cannot be downloaded."""


def cache_dir() -> Path:
    """Return the harness cache folder: $HARNESS_CACHE, else ~/.cache/harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").expanduser()


def default_extractor(data_name: str) -> str:
    """Return the feature extractor for a data set: the digits CNN for digits, Inception otherwise."""
    return DIGITS_EXTRACTOR if data_name == "digits" else INCEPTION_EXTRACTOR


def metric_label(extractor: str) -> str:
    """Return how an FID from this extractor is labelled in tables and plots."""
    if extractor == INCEPTION_EXTRACTOR:
        return "FID"
    if extractor == DIGITS_EXTRACTOR:
        return "FID (digits extractor)"
    return f"FID ({extractor} extractor)"


def inception_weights_path() -> Path:
    """Return where torch-fidelity looks for (and downloads) the Inception weights (torch hub's folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def to_uint8_rgb(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Return float images (N, C, H, W) in [-1, 1] as uint8 (N, H, W, 3); grayscale is replicated to RGB."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in (1, 3), got shape {tuple(x.shape)}")
    # The rounding of facebookresearch/DiT sample_ddp.py, so references and samples quantise alike.
    x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()


# ---- the digits feature extractor ----

DIGITS_CNN_SIZE = 16  # input resolution of the classifier; other resolutions are resized to it
DIGITS_CNN_FEATURE_DIM = 64  # the pooled feature that FID, KID and precision/recall read
_DIGITS_FEATURE_LAYER = str(DIGITS_CNN_FEATURE_DIM)  # torch-fidelity names layers by width ("2048")
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


def _digits_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Return uint8 images (N, 3, H, W) as grayscale float (N, 1, 16, 16) in [-1, 1]."""
    x = x.to(torch.float32).mean(dim=1, keepdim=True) / 127.5 - 1.0
    if x.shape[-2:] != (DIGITS_CNN_SIZE, DIGITS_CNN_SIZE):
        x = F.interpolate(x, size=(DIGITS_CNN_SIZE, DIGITS_CNN_SIZE), mode="bilinear",
                          align_corners=False, antialias=True)
    return x


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor around a trained DigitsCNN; weights come from `digits_extractor_info`."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{DIGITS_EXTRACTOR} needs feature_extractor_weights_path: "
                             "call harness.metrics.digits_extractor_info() and pass its 'weights_path'")
        ckpt = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        self.net = DigitsCNN()
        self.net.load_state_dict(ckpt["model"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return _DIGITS_FEATURE_LAYER, "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits_unbiased", "fid": _DIGITS_FEATURE_LAYER,
                "kid": _DIGITS_FEATURE_LAYER, "prc": _DIGITS_FEATURE_LAYER}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, DIGITS_CNN_SIZE, DIGITS_CNN_SIZE, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        feat, logits = self.net(_digits_preprocess(x))
        # Like Inception's 'logits_unbiased': the head without its bias, what torch-fidelity's IS reads.
        features = {_DIGITS_FEATURE_LAYER: feat, "logits_unbiased": feat @ self.net.head.weight.T,
                    "logits": logits}
        return tuple(features[a] for a in self.features_list)


def _digits_split(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (images float32 (N, 1, S, S) in [-1, 1], labels int64) of the embedded digits split."""
    images, labels = data.digits_split(split, image_size)
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


def reference_stats_id(images_uint8: np.ndarray, data_name: str, split: str, extractor: str) -> str:
    """Return the statistics key '<data>_<split>_<res>_<extractor>_<sha256[:12] of shape and bytes>'."""
    _check_images(images_uint8, "images_uint8")
    _check_name_part(data_name, "data_name")
    _check_name_part(split, "split")
    _check_name_part(extractor, "extractor")
    _, h, w, _ = images_uint8.shape
    digest = hashlib.sha256(f"{images_uint8.shape}|{images_uint8.dtype}|".encode())
    digest.update(np.ascontiguousarray(images_uint8).data)  # no copy when already contiguous
    res = f"{h}" if h == w else f"{h}x{w}"
    return f"{data_name}_{split}_{res}_{extractor}_{digest.hexdigest()[:12]}"


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
    ds = data.build_dataset(data_cfg, split)
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
            out[j] = np.asarray(data.center_crop_arr(im.convert("RGB"), size))
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


_FEATURE_DIMS: dict[tuple[str, str | None], int] = {}


def _probe_feature_dim(extractor: str, weights_path: str | None, image: np.ndarray, cuda: bool) -> int:
    """Return the width of the extractor's FID layer by running it on one image (loads the weights)."""
    key = (extractor, weights_path)
    if key not in _FEATURE_DIMS:
        layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
        fe = create_feature_extractor(extractor, [layer], cuda=cuda, verbose=False,
                                      feature_extractor_weights_path=weights_path)
        x = torch.from_numpy(image[None]).permute(0, 3, 1, 2)
        with torch.no_grad():
            (feat,) = fe(x.cuda() if cuda else x)
        _FEATURE_DIMS[key] = int(feat.shape[1])
    return _FEATURE_DIMS[key]


def _offline_message(extractor: str) -> str:
    """Return what to fetch, and where to put it, when extractor weights cannot be downloaded."""
    hub = "torch hub's checkpoint folder: $TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints"
    if extractor != INCEPTION_EXTRACTOR:
        return (f"cannot download the {extractor} weights (offline?): torch-fidelity fetches them into "
                f"{inception_weights_path().parent} ({hub}); copy them there from a machine with network.")
    return (f"cannot download the {extractor} weights (offline?). Fetch\n  {URL_INCEPTION_V3}\n"
            f"and put the file at\n  {inception_weights_path()}\n({hub}).")


def _warn(message: str, record: list[str]) -> None:
    """Warn loudly (warnings + log) and keep the message for the evaluation record."""
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    record.append(message)


def compute_metrics(samples_uint8: np.ndarray, reference_uint8: np.ndarray, *, extractor: str, data_name: str,
                    split: str = "test", metrics=METRICS, cache: Path | None = None, batch_size: int = 256,
                    device: str = "cpu") -> dict:
    """Return the metric record of samples against a reference set, both uint8 (N, H, W, 3).

    Record: {"metrics": {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall"}
    (those asked for), "metric_label", "extractor", "reference_stats_id", "num_samples", "num_reference",
    "feature_dim", "settings", "versions", "extractor_info" (digits: held-out accuracy and weights hash),
    "warnings"}.
    """
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metrics={list(metrics)}: each must be one of {list(METRICS)} (at least one)")
    _check_images(samples_uint8, "samples_uint8")
    _check_images(reference_uint8, "reference_uint8")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device={device!r}: allowed 'cpu', 'cuda', 'cuda:N'")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    cuda = device != "cpu"
    cache = Path(cache) if cache is not None else cache_dir()
    num_samples, num_reference = len(samples_uint8), len(reference_uint8)
    if min(num_samples, num_reference) < 2:
        raise ValueError(f"need at least 2 samples and 2 reference images, "
                         f"got {num_samples} and {num_reference}")
    record_warnings: list[str] = []

    if extractor == DIGITS_EXTRACTOR:
        info = digits_extractor_info(cache)
        weights_path = info["weights_path"]
        # Features of a retrained extractor must never meet cached features of the old one.
        stats_root = cache / "fidelity" / f"{extractor}_{info['weights_sha256'][:12]}"
        extractor_info = {k: info[k] for k in ("name", "heldout_accuracy", "weights_sha256")}
    elif extractor in FEATURE_EXTRACTORS_REGISTRY:
        weights_path = None  # torch-fidelity's pinned weights (Inception's URL carries its hash)
        stats_root = cache / "fidelity" / extractor
        extractor_info = {"name": extractor}
        if extractor == INCEPTION_EXTRACTOR:
            extractor_info["weights_url"] = URL_INCEPTION_V3
    else:
        raise ValueError(f"extractor={extractor!r} is not registered; allowed: "
                         f"{sorted(set(FEATURE_EXTRACTORS_REGISTRY) | {DIGITS_EXTRACTOR})}")

    try:
        feature_dim = _probe_feature_dim(extractor, weights_path, samples_uint8[0], cuda)
    except URLError as e:
        raise MissingWeightsError(_offline_message(extractor)) from e
    extractor_info["feature_dim"] = feature_dim

    provided = FEATURE_EXTRACTORS_REGISTRY[extractor].get_provided_features_list()
    if "isc" in metrics and _ISC_LAYER not in provided:
        _warn(f"Inception Score skipped: extractor {extractor} has no '{_ISC_LAYER}' layer", record_warnings)
        metrics = tuple(m for m in metrics if m != "isc")
        if not metrics:
            raise ValueError(f"extractor {extractor} cannot compute any of the requested metrics")
    if "fid" in metrics and min(num_samples, num_reference) < feature_dim:
        _warn(f"FID from fewer images than feature dimensions ({num_samples} samples, {num_reference} "
              f"reference images, {feature_dim} features): the covariance is singular and the FID is biased; "
              "do not compare it with FIDs from more images", record_warnings)
    if "prc" in metrics and min(num_samples, num_reference) <= PRC_NEIGHBORHOOD:
        raise ValueError(f"precision/recall needs more than {PRC_NEIGHBORHOOD} images in each set, "
                         f"got {num_samples} and {num_reference}")

    stats_id = reference_stats_id(reference_uint8, data_name, split, extractor)
    settings = {"kid_subsets": KID_SUBSETS,
                "kid_subset_size": min(KID_SUBSET_SIZE, num_samples, num_reference),  # KID needs n >= it
                "isc_splits": min(ISC_SPLITS, num_samples), "prc_neighborhood": PRC_NEIGHBORHOOD,
                "rng_seed": METRICS_SEED, "batch_size": batch_size}
    try:
        raw = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(samples_uint8), input2=_UInt8Images(reference_uint8),
            cuda=cuda, batch_size=batch_size, feature_extractor=extractor,
            feature_extractor_weights_path=weights_path,
            isc="isc" in metrics, fid="fid" in metrics, kid="kid" in metrics, prc="prc" in metrics,
            # important: the cache name holds the content hash (torch-fidelity keys its cache by name only)
            input2_cache_name=stats_id, cache_root=str(stats_root), cache=True,
            kid_subsets=settings["kid_subsets"], kid_subset_size=settings["kid_subset_size"],
            isc_splits=settings["isc_splits"], prc_neighborhood=PRC_NEIGHBORHOOD, rng_seed=METRICS_SEED,
            save_cpu_ram=True,  # in-memory tensors: loader worker processes only cost start-up time
            verbose=False,
        )
    except URLError as e:
        raise MissingWeightsError(_offline_message(extractor)) from e
    values = {_RESULT_KEYS[k]: float(v) for k, v in raw.items() if k in _RESULT_KEYS}
    for k, v in values.items():
        if not np.isfinite(v):
            _warn(f"{k} is {v}", record_warnings)
    return {"metrics": values, "metric_label": metric_label(extractor), "extractor": extractor,
            "reference_stats_id": stats_id, "num_samples": num_samples, "num_reference": num_reference,
            "feature_dim": feature_dim, "settings": settings,
            "versions": {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__},
            "extractor_info": extractor_info, "warnings": record_warnings}
