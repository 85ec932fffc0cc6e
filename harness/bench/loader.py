"""The latent loader benchmark: images/s of LatentShardDataset.get_batch + augment from temporary shards,
per intra-op thread count; and `write_latent_shards`, the random shards it (and the plan benchmark) reads."""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from harness.bench.common import IMAGENET_CLASSES, device_name
from harness.core.runfolder import atomic_write_json, file_sha256
from harness.data import datasets
from harness.data.codec import DEFAULT_VAE, SD_VAE_GEOMETRY, encoder_id
from harness.data.datasets import LatentShardDataset
from harness.data.precompute import STORE_DTYPES
from harness.train import DataOrder

# The latent loader must never starve a GPU; this is the rate it must reach on this CPU.
LOADER_TARGET_IMAGES_PER_S = 20_000
LATENT_CHANNELS, VAE_DOWNSAMPLE = SD_VAE_GEOMETRY
LATENT_SHAPE_256 = (LATENT_CHANNELS, 256 // VAE_DOWNSAMPLE, 256 // VAE_DOWNSAMPLE)  # ImageNet 256 -> 4x32x32


def write_latent_shards(root: str | Path, count: int, latent_shape=LATENT_SHAPE_256, dtype: str = "float16",
                        shard_size: int = 4096, num_classes: int = IMAGENET_CLASSES, seed: int = 0) -> Path:
    """Writes `count` random posterior moments as latent shards (harness.data.precompute's format); returns root."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    if count < 1 or shard_size < 1:
        raise ValueError(f"count={count} and shard_size={shard_size} must be positive")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        moments = rng.standard_normal((n, 2, 2, *latent_shape), dtype=np.float32)
        moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1  # the std rows are positive
        moments_name, labels_name, _ = datasets.shard_names(k)
        np.save(root / moments_name, moments.astype(dtype))
        np.save(root / labels_name, rng.integers(0, num_classes, n).astype(np.int64))
        shards.append(dict(file=moments_name, labels_file=labels_name, count=n,
                           sha256=file_sha256(root / moments_name), labels_sha256=file_sha256(root / labels_name)))
    meta = dict(format=datasets.SHARD_FORMAT, vae=DEFAULT_VAE, encoder=encoder_id(DEFAULT_VAE),
                resolution=latent_shape[-1] * VAE_DOWNSAMPLE, latent_shape=list(latent_shape), dtype=dtype,
                layout=datasets.MOMENTS_LAYOUT, shard_size=shard_size, count=count, num_classes=num_classes,
                source="harness.bench (random moments)", shards=shards)
    atomic_write_json(root / datasets.META_FILE, meta)
    return root


def loader_rates(ds, batch: int, steps: int, repeats: int, threads: int) -> dict:
    """Returns images/s of get_batch + augment (median of `repeats` chunks of `steps` batches), its runs, and
    the images/s of get_batch and of augment alone, measured in a worker thread with `threads` intra-op
    threads (like the trainer's prefetcher).

    OpenMP thread counts are per thread: setting it here leaves the calling thread's count alone.
    """
    out: dict = {}

    def work():
        try:
            torch.set_num_threads(threads)
            order = DataOrder(len(ds), 0, batch)
            g = torch.Generator().manual_seed(0)
            ds.augment(ds.get_batch(order.next_indices())[0], g)  # warm the page cache and allocator
            runs, get_s, aug_s = [], 0.0, 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(steps):
                    a = time.perf_counter()
                    x, _ = ds.get_batch(order.next_indices())
                    b = time.perf_counter()
                    ds.augment(x, g)
                    get_s, aug_s = get_s + b - a, aug_s + time.perf_counter() - b
                runs.append(batch * steps / (time.perf_counter() - t0))
            n = batch * steps * repeats
            out.update(images_per_s=statistics.median(runs), images_per_s_runs=runs,
                       get_batch_images_per_s=n / get_s, augment_images_per_s=n / aug_s)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            out["error"] = e

    t = threading.Thread(target=work, name="bench-loader")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out


def bench_loader(batch: int = 256, count: int = 8192, dtype: str = "float16", threads=(1,), steps: int = 20,
                 repeats: int = 3, root: str | None = None) -> dict:
    """Returns the loader record: latent images/s of LatentShardDataset.get_batch + augment per intra-op
    thread count, and whether each meets LOADER_TARGET_IMAGES_PER_S. The shards live in a temporary folder
    (under `root` when given) removed before returning."""
    if batch < 1 or count < batch:
        raise ValueError(f"batch={batch} must be >= 1 and count={count} >= batch")
    if any(t < 1 for t in threads):
        raise ValueError(f"threads={list(threads)}: each must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_latents_", dir=root) as tmp:
        ds = LatentShardDataset(str(write_latent_shards(tmp, count, dtype=dtype)))
        rows = [{"threads": t, **loader_rates(ds, batch, steps, repeats, t)} for t in threads]
        del ds  # release the memory maps before the folder goes
    for r in rows:
        r["meets_target"] = r["images_per_s"] >= LOADER_TARGET_IMAGES_PER_S
    return {"kind": "loader", "device": {"name": device_name(torch.device("cpu"))}, "batch": batch,
            "count": count, "dtype": dtype, "steps": steps, "repeats": repeats,
            "target_images_per_s": LOADER_TARGET_IMAGES_PER_S, "settings": rows, "complete": True}
