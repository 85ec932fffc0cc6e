"""The reference side of a metric: the reference images of a data set, the content-hashed key of their statistics,
and the cache folder those statistics (and the in-house extractors' copies) live in.

torch-fidelity keys its statistics cache by name only, so a changed reference set would silently return a stale
FID: every key here holds a content hash of the images.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.data import datasets
from harness.data.datasets import to_uint8_rgb
from harness.data.shapes import ShapesDataset


def cache_dir() -> Path:
    """Return the harness cache folder: $HARNESS_CACHE, else ~/.cache/harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness").expanduser()

def check_images(images: np.ndarray, what: str) -> None:
    """Raise ValueError unless images is a non-empty uint8 array (N, H, W, 3)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3 or images.shape[0] == 0:
        desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{what} must be a non-empty uint8 array (N, H, W, 3) (ADM npz layout), got {desc}")

def _check_name_part(value: str, what: str) -> None:
    """Raise ValueError unless value can be part of a cache file name."""
    if not isinstance(value, str) or not value or any(c in value for c in "/\\") or value.split() != [value]:
        raise ValueError(f"{what}={value!r} must be a non-empty string without '/', '\\' or whitespace")

def reference_stats_ids(images_uint8: np.ndarray, data_name: str, split: str, extractors) -> dict[str, str]:
    """Return {extractor: reference_stats_id}, hashing the images once (a 50k ImageNet set takes seconds)."""
    check_images(images_uint8, "images_uint8")
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
    return reference_stats_ids(images_uint8, data_name, split, [extractor])[extractor]

def reference_images(data_cfg, split: str = "test", max_images: int | None = None) -> np.ndarray:
    """Return the reference set of a data config as uint8 (N, H, W, 3).

    digits: the split at data_cfg.image_size. shapes: the held-out test set (its training split is an unlimited
    stream; other splits are refused). imagefolder: the training images (ADM's reference is the training set; other
    splits are refused), ADM centre crop to data_cfg.image_size. max_images keeps a fixed seeded subset, in data set
    order.
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images={max_images} must be positive or None")
    if data_cfg.name not in ("digits", "shapes", "imagefolder"):
        raise ValueError(f"no reference images for data={data_cfg.name!r}: allowed 'digits', 'imagefolder', 'shapes' "
                         "(pass synthetic references to compute_metrics directly)")
    if data_cfg.name == "shapes" and split != "test":
        raise ValueError(f"shapes reference split {split!r} not allowed; allowed: 'test' (the training split is an "
                         "unlimited stream: set eval.reference_split=test, as conf/eval/shapes.yaml does)")
    return _uint8_images(datasets.build_dataset(data_cfg, split), data_cfg, max_images)


def floor_images(data_cfg, reference_split: str, max_images: int | None = None) -> tuple[np.ndarray, str] | None:
    """Return (real images other than the reference set, as uint8 (N, H, W, 3), their split): what a metric's
    floor is measured with (the metric of real images against the reference statistics). digits: the split that
    is not the reference; shapes: its floor stream (FLOOR_COUNT images from their own seed stream, neither trained
    on nor the reference); an image folder whose reference is its training set: its held-out folder (val/). None
    when the data set has no such images (latent shards, a reference batch from elsewhere)."""
    if data_cfg.name == "shapes":
        floor = ShapesDataset("floor", int(data_cfg.image_size))
        return _uint8_images(floor, data_cfg, max_images), "floor"
    if data_cfg.name == "digits":
        split = "train" if reference_split == "test" else "test"
        return _uint8_images(datasets.build_dataset(data_cfg, split), data_cfg, max_images), split
    if data_cfg.name == "imagefolder":  # its training set (ADM's reference) or a reference batch made from it
        found = datasets.heldout_dataset(data_cfg)
        if found is None:
            return None
        return _uint8_images(found[0], data_cfg, max_images), found[1]
    return None


def _uint8_images(ds, data_cfg, max_images: int | None) -> np.ndarray:
    """Return a data set's images as uint8 (N, H, W, 3), a fixed seeded subset of max_images in data set order."""
    keep = np.arange(len(ds))
    if max_images is not None and len(ds) > max_images:
        keep = np.sort(np.random.default_rng(0).choice(len(ds), max_images, replace=False))
    if data_cfg.name == "digits":
        return to_uint8_rgb(ds.images[torch.from_numpy(keep)])
    if data_cfg.name == "shapes":  # rendered as uint8: no float round trip
        return ds.uint8_images(keep)
    size = int(data_cfg.image_size)
    out = np.empty((len(keep), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(keep):
        with Image.open(ds.samples[i][0]) as im:
            # uint8 straight from the ADM crop: no float round trip between the files and the extractor
            out[j] = np.asarray(datasets.center_crop_arr(im.convert("RGB"), size))
    return out
