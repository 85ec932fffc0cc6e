"""The data benchmark: images/s of a data kind's training batches (get_batch + augment over consecutive indices, the
order the trainer reads an unlimited stream in), and for the procedural shapes the uint8 rendering alone."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from harness.bench.common import device_name
from harness.core.config import compose
from harness.data import datasets, shapes

# A generated data set must never starve a training step: the rate the shapes must reach on a 2-core CPU.
DATA_TARGET_IMAGES_PER_S = 20_000


def data_kinds() -> tuple[str, ...]:
    """Returns the data kinds this benchmark can build: those that need no folder (their config preset has the
    kind's name)."""
    return tuple(k.name for k in datasets.DATA_KINDS.values() if not k.needs_path)


def _rates(fn, batch: int, steps: int, repeats: int) -> list[float]:
    """Returns images/s of each of `repeats` chunks of `steps` calls fn(start) (start: the chunk's first index)."""
    fn(0)  # warm-up: allocator, caches, a fixed split's one-off rendering
    runs, start = [], batch
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn(start)
            start += batch
        runs.append(batch * steps / (time.perf_counter() - t0))
    return runs


def bench_data(kind: str = "shapes", batch: int = 256, steps: int = 20, repeats: int = 3,
               image_size: int | None = None) -> dict:
    """Returns the data record: images/s (median of `repeats` chunks of `steps` batches, after one warm-up batch) of
    `get_batch` + `augment` on consecutive training indices of the kind's preset (conf/data/KIND.yaml, at
    `image_size` when given), on the calling thread; for shapes also of `shapes.render` (uint8, no tensors)."""
    if kind not in data_kinds():
        raise ValueError(f"data kind {kind!r} cannot be benchmarked here; allowed: {', '.join(data_kinds())}")
    if batch < 1 or steps < 1 or repeats < 1:
        raise ValueError(f"batch={batch}, steps={steps} and repeats={repeats} must be positive")
    overrides = [f"data={kind}"] + ([f"data.image_size={image_size}"] if image_size is not None else [])
    data_cfg = compose(overrides).data
    ds = datasets.build_dataset(data_cfg, "train")
    n = datasets.unique_images(ds)
    g = torch.Generator().manual_seed(0)

    def training_batch(start: int) -> None:
        idx = torch.arange(start, start + batch) if n is None else torch.arange(start, start + batch) % n
        ds.augment(ds.get_batch(idx)[0], g)

    settings = [("get_batch + augment", training_batch)]
    if kind == "shapes":
        def rendered(start: int) -> None:
            shapes.render(shapes.SEED, "train", np.arange(start, start + batch), data_cfg.image_size)

        settings.append(("render (uint8)", rendered))
    rows = []
    for name, fn in settings:
        runs = _rates(fn, batch, steps, repeats)
        rows.append({"name": name, "images_per_s": statistics.median(runs), "images_per_s_runs": runs,
                     "meets_target": statistics.median(runs) >= DATA_TARGET_IMAGES_PER_S})
    return {"kind": "data", "data": kind, "device": {"name": device_name(torch.device("cpu"))}, "batch": batch,
            "steps": steps, "repeats": repeats, "image_size": int(data_cfg.image_size),
            "unique_images": n, "target_images_per_s": DATA_TARGET_IMAGES_PER_S, "settings": rows,
            "complete": True}
