"""The floor of a metric: what N real images get against the same reference statistics.

FID from N samples is biased upwards, roughly as 1/N (Chong & Forsyth 2020, "Effectively Unbiased FID"), and no
generator can beat the data itself: a perfect generator's FID-N is the FID-N of N real images that are not the
reference set. Every prediction of a law is read against this floor, and figures draw it as a band: a predicted
FID-500 of 0.07 means nothing when 500 real images score 0.6.

For each (reference, extractor, N) the floor is measured once and cached like the reference statistics, from a few
disjoint draws of N real images (their mean and standard deviation). When the real images number fewer than
draws x N (the digits' 1,501 training images against FID-5K, or ImageNet's 50,000 validation images against
FID-50K), the floor is extrapolated: each metric is measured at three smaller sample counts (the largest that
give `draws` disjoint draws, then a half and a quarter of it), FID(n) = a + b / n is fitted to all of them by
least squares, and the floor at N is a + b / N with the fit's standard error as its spread. The record says which
method gave it. Precision and recall get the same treatment: they are the values real images reach, a ceiling
rather than a floor, named "floor" with the others for one vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from harness.core.runfolder import atomic_write_json, read_json
from harness.core.vocabulary import weights_id
from harness.metrics import fidelity
from harness.metrics.references import cache_dir, reference_stats_ids

FLOOR_DRAWS = 3  # disjoint draws of N real images: mean and spread
MIN_EXTRAPOLATION_COUNT = 32  # no sample count below this enters the 1/N fit (precision/recall need k-NN balls)
FLOOR_METRICS = ("fid", "sfid", "kid", "prc", "fd_dinov2")  # IS has no reference: nothing real to stand under it
FLOOR_VERSION = 1  # part of the cache key: a changed method never returns an old floor


def floor_metrics(metrics) -> tuple[str, ...]:
    """Returns the metrics of a list that have a floor (those compared with a reference)."""
    return tuple(m for m in metrics if m in FLOOR_METRICS)


def _counts(n: int, pool: int, draws: int) -> tuple[list[int], str]:
    """Returns (the sample counts measured, the method): [n] when the pool holds `draws` disjoint draws of n, else
    the largest such count and a half and a quarter of it (at least MIN_EXTRAPOLATION_COUNT)."""
    if pool >= draws * n:
        return [n], "disjoint draws"
    top = pool // draws
    counts = sorted({c for c in (top, top // 2, top // 4) if c >= MIN_EXTRAPOLATION_COUNT})
    if len(counts) < 2:
        raise ValueError(f"a floor at N={n} needs at least {draws * 2 * MIN_EXTRAPOLATION_COUNT} real images beside "
                         f"the reference set to extrapolate from; there are {pool}")
    return counts, f"extrapolated as a + b / N from counts {counts}"


def _extrapolate(points: list[tuple[int, float]], n: int) -> tuple[float, float]:
    """Returns (a + b / n, its standard error) from a least-squares fit of value = a + b / count."""
    x = np.array([1.0 / c for c, _ in points])
    y = np.array([v for _, v in points])
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    dof = max(1, len(y) - 2)
    sigma2 = float(resid @ resid) / dof
    at = np.array([1.0, 1.0 / n])
    cov = sigma2 * np.linalg.pinv(design.T @ design)
    return float(at @ coef), float(math.sqrt(max(0.0, at @ cov @ at)))


def metric_floor(real_uint8: np.ndarray, reference_uint8: np.ndarray, n: int, *, extractor: str, data_name: str,
                 split: str, metrics, real_split: str, draws: int = FLOOR_DRAWS, cache: Path | None = None,
                 device: str = "cpu", batch_size: int = 256) -> dict:
    """Returns the floor of `metrics` at N = n samples: {"num_samples", "draws", "method", "counts", "pool",
    "real_split", "reference_stats_id", "extractor", "extractor_weights", "values": {value key: {"mean", "spread",
    "draws": [...] (disjoint draws) or "points": [[count, value], ...] (extrapolated)}}}. Cached under the
    reference's content hash, the extractor (and its weights), N, the draws and a hash of the real images."""
    metrics = floor_metrics(metrics)
    if not metrics:
        raise ValueError("none of the metrics asked for has a floor; allowed: " + ", ".join(FLOOR_METRICS))
    stats_id = reference_stats_ids(reference_uint8, data_name, split, [extractor])[extractor]
    real_hash = hashlib.sha256(np.ascontiguousarray(real_uint8).data).hexdigest()[:12]
    key = (f"{stats_id}_w{weights_id(extractor) or 'pinned'}_real{real_hash}_N{n}_d{draws}_"
           f"{'-'.join(sorted(metrics))}_v{FLOOR_VERSION}")
    path = Path(cache if cache is not None else cache_dir()) / "floors" / f"{key}.json"
    cached = read_json(path) if path.exists() else None
    if cached is not None:
        return cached
    counts, method = _counts(n, len(real_uint8), draws)
    order = np.random.default_rng(0).permutation(len(real_uint8))
    measured: dict[str, list[tuple[int, float]]] = {}
    for c in counts:
        for d in range(draws):
            subset = real_uint8[np.sort(order[d * c:(d + 1) * c])]
            rec = fidelity.compute_metrics(subset, reference_uint8, extractor=extractor, data_name=data_name,
                                           split=split, metrics=metrics, cache=cache, device=device,
                                           batch_size=batch_size)
            for k, v in rec["metrics"].items():
                if k not in ("kid_std",):
                    measured.setdefault(k, []).append((c, float(v)))
    values = {}
    for k, points in measured.items():
        if len(counts) == 1:
            draws_v = [v for _, v in points]
            values[k] = {"mean": float(np.mean(draws_v)), "spread": float(np.std(draws_v, ddof=1)),
                         "draws": draws_v}
        else:
            mean, se = _extrapolate(points, n)
            values[k] = {"mean": mean, "spread": se, "points": [[c, v] for c, v in points]}
    floor = {"num_samples": n, "draws": draws, "method": method, "counts": counts, "pool": len(real_uint8),
             "real_split": real_split, "reference_stats_id": stats_id, "extractor": extractor,
             "extractor_weights": weights_id(extractor), "values": values, "version": FLOOR_VERSION}
    atomic_write_json(path, floor)
    return json.loads(json.dumps(floor))
