"""Sample quality metrics as one evaluation record: FID, sFID, Inception Score, KID, precision and recall, and the
opt-in FD-DINOv2.

ImageNet uses torch-fidelity's `inception-v3-compat` extractor (the TF Inception the FID literature and the DiT
paper use; harness.metrics.inception); the embedded digits use their own (harness.metrics.digits). FID, IS, KID and
precision/recall come from one torch-fidelity call. sFID (ADM's spatial FID, the paper's second metric) and
FD-DINOv2 (Stein et al. 2023) read other feature spaces: their features come from torch-fidelity extractors too,
their statistics and distance from harness.metrics.frechet. Reference statistics are cached under a content-hashed
key (harness.metrics.references). docs/metrics.md describes every metric, its feature space and what it needs
offline.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_HUB_MODELS
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from harness.core.runfolder import atomic_open
from harness.core.vocabulary import (
    DEFAULT_METRICS,
    DINOV2_EXTRACTOR,
    FRECHET_METRICS,
    INCEPTION_EXTRACTOR,
    ISC_LAYER,
    METRICS,
    NAMES,
    SPATIAL_FEATURE,
    metric_label,
    metric_problems,
    sfid_extractor,
)
from harness.metrics import inhouse
from harness.metrics.frechet import feature_statistics, frechet_distance
from harness.metrics.inception import (
    MissingWeightsError,
    dinov2_missing,
    dinov2_offline_message,
    dinov2_paths,
    offline_message,
)
from harness.metrics.references import cache_dir, check_images, reference_stats_ids

log = logging.getLogger(__name__)

_TORCH_FIDELITY_METRICS = ("fid", "isc", "kid", "prc")  # computed by one torch_fidelity.calculate_metrics call

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

_DINOV2_LAYER = "dinov2"  # torch-fidelity's name for the DINOv2 embedding (the final-norm CLS token)

_PROBE_IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)  # every extractor here resizes, so any size probes widths

def _extractor_class(extractor: str) -> type[FeatureExtractorBase] | None:
    """Return the torch-fidelity extractor class of a name (the digits CNN before it is registered too), or None."""
    return inhouse.InHouseFeatureExtractor if extractor in inhouse.SPECS else FEATURE_EXTRACTORS_REGISTRY.get(extractor)

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
    stats_root: Path  # cache folder named by the extractor (and, for an in-house one, by its weights)


def _feature_spaces(metrics, extractor: str, dinov2_model: str,
                    cache: Path) -> tuple[_FeatureSpace, dict[str, _FeatureSpace], dict]:
    """Return (the extractor's FID space, {metric: space}, facts about the extractor for the record); loads and
    checks the shipped weights of an in-house extractor."""
    if extractor in inhouse.SPECS:
        info = inhouse.extractor_info(extractor)
        weights_path = info["weights_path"]
        # Statistics of other weights (an earlier version's, trained on first use) must never meet these.
        root = cache / "fidelity" / f"{extractor}_{info['weights_sha256'][:12]}"
        extractor_info = {k: info[k] for k in ("name", "heldout_accuracy", "weights_sha256", "weights")}
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
        elif m == "sfid" and sfid_extractor(extractor) == extractor:
            spaces[m] = _FeatureSpace(extractor, SPATIAL_FEATURE, weights_path, root)
        elif m == "sfid":
            companion = sfid_extractor(extractor)  # the same weights, which torch-fidelity fetches itself
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

def _load_spaces(spaces, image: np.ndarray, cuda: bool) -> dict[tuple[str, str], int]:
    """Load every extractor the spaces need and return {(extractor, layer): width}; raises MissingWeightsError
    saying what to fetch, and where, for weights that are neither on disk nor downloadable."""
    groups: dict[tuple[str, str | None], set[str]] = {}
    for s in spaces:
        groups.setdefault((s.extractor, s.weights_path), set()).add(s.layer)
    dims = {}
    for (extractor, weights_path), layers in groups.items():
        if extractor in DINOV2_HUB_MODELS:
            missing = dinov2_missing(extractor)
            try:  # torch hub downloads what is missing when it can
                found = _probe_feature_dims(extractor, weights_path, layers, image, cuda, use_cache=not missing)
            except Exception as e:
                # Whatever torch hub raises without network (URLError, or RuntimeError when it cannot ask GitHub
                # for the default branch and has no cached copy), the cure is the files; the cause stays chained.
                if missing:
                    raise MissingWeightsError(dinov2_offline_message(extractor, missing)) from e
                raise
        else:
            try:
                found = _probe_feature_dims(extractor, weights_path, layers, image, cuda)
            except URLError as e:
                raise MissingWeightsError(offline_message(extractor)) from e
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
    if "fd_dinov2" in metrics and dinov2_missing(dinov2_model):  # fetched, or said missing, before other work
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
    check_images(samples_uint8, "samples_uint8")
    check_images(reference_uint8, "reference_uint8")
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
        raise MissingWeightsError(offline_message(extractor)) from e
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
                         f"{sorted(set(FEATURE_EXTRACTORS_REGISTRY) | set(inhouse.SPECS))}")
    # Kept from before metric_problems existed: IS asked for (it is in the default list) with an extractor
    # without logits is skipped loudly rather than refused.
    if "isc" in metrics and ISC_LAYER not in cls.get_provided_features_list():
        _warn(f"Inception Score skipped: extractor {extractor} has no '{ISC_LAYER}' layer", record_warnings)
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

    stats_ids = reference_stats_ids(reference_uint8, data_name, split,
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
