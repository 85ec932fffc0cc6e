"""The digits feature extractor, `digits-cnn`: a small classifier of the embedded digits whose pooled features give
FID, KID and precision/recall, whose logits give IS, and whose middle feature map gives sFID, registered with
torch-fidelity. A metric measured with it is not comparable to an Inception one, so it is labelled
"FID (digits extractor)", "sFID (digits extractor)", ... everywhere (harness.core.vocabulary.metric_label).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from harness.core.runfolder import atomic_write_bytes
from harness.core.vocabulary import DIGITS_EXTRACTOR, SPATIAL_FEATURE
from harness.data import datasets
from harness.data.datasets import to_uint8_rgb
from harness.metrics.frechet import spatial_feature
from harness.metrics.references import cache_dir

log = logging.getLogger(__name__)

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
