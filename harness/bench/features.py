"""The feature-extraction benchmark: images/s of the FID feature extractors (the digits CNN; Inception
when its weights are on the machine)."""

from __future__ import annotations

import statistics
import time

import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from harness.bench.common import device_name, sync
from harness.core import vocabulary
from harness.metrics import inhouse
from harness.metrics.inception import inception_weights_path

INCEPTION_INPUT_SIZE = 256  # the ImageNet images the grid's FID is computed on (uint8, 256x256)


def bench_features(device: torch.device, batch: int = 256, repeats: int = 3, inception: bool = True) -> dict:
    """Returns the features record: images/s (median of `repeats` batches after one warm-up) of the digits
    extractor (16x16) and, when its weights are present, of Inception (256x256 uint8, torch-fidelity's
    inception-v3-compat); a row says `skipped` and why for an extractor without weights."""
    rows = []
    info = inhouse.extractor_info(vocabulary.DIGITS_EXTRACTOR)
    candidates = [(vocabulary.DIGITS_EXTRACTOR, inhouse.spec(vocabulary.DIGITS_EXTRACTOR).size, info["weights_path"])]
    if inception:
        candidates.append((vocabulary.INCEPTION_EXTRACTOR, INCEPTION_INPUT_SIZE, None))
    for name, size, weights in candidates:
        if name == vocabulary.INCEPTION_EXTRACTOR and not inception_weights_path().exists():
            rows.append({"name": name, "skipped": f"no weights at {inception_weights_path()}"})
            continue
        layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        fe = create_feature_extractor(name, [layer], cuda=device.type == "cuda", verbose=False,
                                      feature_extractor_weights_path=weights)
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        with torch.no_grad():
            fe(x)
            runs = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                fe(x)
                sync(device)
                runs.append(batch / (time.perf_counter() - t0))
        rows.append({"name": name, "input_size": size, "images_per_s": statistics.median(runs),
                     "images_per_s_runs": runs})
    return {"kind": "features", "device": {"name": device_name(device)}, "batch": batch, "repeats": repeats,
            "settings": rows, "complete": True}
