"""The metric vocabulary, in one torch-free module: what each metric is called, which feature extractor measures
it, how tables and figures label it, and which metrics an extractor can give (checked for every cell before any
sampling, without loading an extractor).

Every layer reads these words from here: the data kinds (which extractor measures them), the metrics (which
compute them), the results table, the figures and the scaling laws (which label them). The facts about
torch-fidelity's extractors are written down here because importing torch-fidelity (and the torchvision it loads)
takes seconds, and a sweep validates every cell of its grid before it starts; the tests check this table against
torch-fidelity's registry, so it cannot drift. harness.metrics computes the metrics.
"""

from __future__ import annotations

import math

# ---- feature extractors ----
DIGITS_EXTRACTOR = "digits-cnn"  # a small CNN trained on the embedded digits (FID "(digits extractor)")
SHAPES_EXTRACTOR = "shapes-cnn"  # a small CNN trained on the procedural shapes (FID "(shapes extractor)")
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's port of the TF Inception the paper used
PAPER_EXTRACTOR = INCEPTION_EXTRACTOR  # the extractor whose FID is the paper's number; any other is labelled
INCEPTION_SPATIAL_EXTRACTOR = "inception-v3-compat-spatial"  # the same network and weights, plus sFID's feature
DINOV2_EXTRACTOR = "dinov2-vit-l-14"  # the network Stein et al. 2023 recommend; EDM2 reports FD with it
# Extractors trained in-house on an embedded data set: the data set they know (which names them in tables and
# figures) and the sha256 of the weights that ship with the package (harness.metrics.inhouse checks the file against
# it; records and statistics are named by its first 12 digits). Here, torch-free, because the analysis labels
# records made with other weights (an earlier version trained them on first use, per machine) by it.
IN_HOUSE_EXTRACTORS = {
    DIGITS_EXTRACTOR: ("digits", "0614089547d5f8cc09bc564a23f80088d580d5b994cf8fcae7d6339ceb9f3e7a"),
    SHAPES_EXTRACTOR: ("shapes", "2915191133b1836efb9025879b7fe6e34fc04b9c56be624fbc6fc65b805e50a1"),
}


def weights_id(extractor: str) -> str | None:
    """Returns the first 12 hex digits of an in-house extractor's shipped weights hash (what names its records and
    statistics); None for an extractor whose weights come pinned from elsewhere (Inception's URL carries its own)."""
    entry = IN_HOUSE_EXTRACTORS.get(extractor)
    return entry[1][:12] if entry else None

# ---- metrics ----
METRICS = ("fid", "isc", "kid", "prc", "sfid", "fd_dinov2")  # what eval.metrics may ask for
DEFAULT_METRICS = ("fid", "isc", "kid", "prc")  # torch-fidelity's four; sfid and fd_dinov2 are asked for
FRECHET_METRICS = ("fid", "sfid", "fd_dinov2")  # the Frechet distances among METRICS
# The values an evaluation record holds (its "metrics" mapping), in the order tables show them.
VALUE_KEYS = ("fid", "sfid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "fd_dinov2")
METRIC_OF_KEY = {k: k for k in VALUE_KEYS} | {"isc_mean": "isc", "isc_std": "isc", "kid_mean": "kid",
                                               "kid_std": "kid", "precision": "prc", "recall": "prc"}
OWN_SPACE_METRICS = ("fd_dinov2",)  # measured in their own feature space, whatever the record's extractor
# How a metric (as asked for) or a value (as recorded) is named in tables, figures and records.
NAMES = {
    "fid": "FID", "sfid": "sFID", "fd_dinov2": "FD-DINOv2", "isc": "IS", "kid": "KID", "prc": "precision/recall",
    "isc_mean": "Inception Score", "isc_std": "IS std", "kid_mean": "KID", "kid_std": "KID std",
    "precision": "Precision", "recall": "Recall",
    "val_loss": "validation loss", "val_loss_ema": "validation loss (EMA)", "train_loss": "training loss",
    "val_vb": "validation VB term", "val_vb_ema": "validation VB term (EMA)",
    "train_batch_loss": "fixed training-batch loss", "train_batch_loss_ema": "fixed training-batch loss (EMA)",
}
ISC_LAYER = "logits_unbiased"  # the layer torch-fidelity's Inception Score reads
SPATIAL_FEATURE = "spatial"  # the name of sFID's feature map in an extractor that provides one
# Where an extractor's FID comes with sFID from a companion extractor (the same network exposing the map).
SFID_COMPANIONS = {INCEPTION_EXTRACTOR: INCEPTION_SPATIAL_EXTRACTOR}


def format_samples(num_samples: float) -> str:
    """Returns a sample count the way papers write it: 50000 -> '50K', 1500 -> '1.5K', 800 -> '800'."""
    n = int(num_samples)
    return f"{n / 1000:g}K" if n >= 1000 else str(n)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def metric_label(metric: str, num_samples: float | None = None, extractor: str | None = None) -> str:
    """Returns how a metric is labelled in tables, figures and records: 'FID-50K', 'sFID (digits extractor)',
    'FD-DINOv2 (dinov2-vit-s-14)', 'Precision-500 (vgg16 extractor)', 'validation loss'.

    `metric` is a metric as asked for (METRICS) or a recorded value (VALUE_KEYS); any other name (a loss) is
    named from NAMES. The paper's names belong to Inception, "FD-DINOv2" to DINOv2 ViT-L/14; any other
    extractor is named beside the number, an in-house one by the data set it knows.
    """
    if metric not in NAMES:
        raise ValueError(f"metric={metric!r} has no name; allowed: {sorted(NAMES)}")
    name = NAMES[metric]
    if metric not in METRIC_OF_KEY and metric not in METRICS:
        return name
    if not _missing(num_samples):
        name = f"{name}-{format_samples(num_samples)}"
    if _missing(extractor):
        return name
    extractor = str(extractor)
    if METRIC_OF_KEY.get(metric, metric) in OWN_SPACE_METRICS:
        return name if extractor == DINOV2_EXTRACTOR or not extractor.startswith("dinov2") else f"{name} ({extractor})"
    if extractor in (INCEPTION_EXTRACTOR, INCEPTION_SPATIAL_EXTRACTOR):
        return name
    return f"{name} ({IN_HOUSE_EXTRACTORS[extractor][0] if extractor in IN_HOUSE_EXTRACTORS else extractor} extractor)"


_CLIP = ("clip",)
# The features each extractor provides (torch-fidelity's get_provided_features_list, and the harness's own).
KNOWN_FEATURES = {
    DIGITS_EXTRACTOR: ("64", "logits_unbiased", "logits", SPATIAL_FEATURE),
    SHAPES_EXTRACTOR: ("64", "logits_unbiased", "logits", SPATIAL_FEATURE),
    INCEPTION_EXTRACTOR: ("64", "192", "768", "2048", "logits_unbiased", "logits"),
    INCEPTION_SPATIAL_EXTRACTOR: ("64", "192", "768", "2048", "logits_unbiased", "logits", SPATIAL_FEATURE),
    **{f"dinov2-vit-{s}-14": ("dinov2",) for s in ("s", "b", "l", "g")},
    **{f"clip-{m}": _CLIP for m in ("rn50", "rn101", "rn50x4", "rn50x16", "rn50x64", "vit-b-32", "vit-b-16",
                                     "vit-l-14", "vit-l-14-336px")},
    "vgg16": ("fc2", "fc2_relu"),
}
DINOV2_MODELS = tuple(k for k in KNOWN_FEATURES if k.startswith("dinov2-"))


def provided_features(extractor: str) -> tuple[str, ...] | None:
    """Returns the features an extractor provides, None for an extractor nobody registered."""
    if extractor in KNOWN_FEATURES:
        return KNOWN_FEATURES[extractor]
    # Here, not at the top: only an extractor a user registered with torch-fidelity needs the import.
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY.get(extractor)
    return None if cls is None else tuple(cls.get_provided_features_list())


def sfid_extractor(extractor: str) -> str | None:
    """Returns the extractor whose SPATIAL_FEATURE gives sFID beside this extractor's FID, or None when none does."""
    if SPATIAL_FEATURE in (provided_features(extractor) or ()):
        return extractor
    return SFID_COMPANIONS.get(extractor)


def sfid_extractors() -> list[str]:
    """Returns the extractors sFID can be computed with."""
    return sorted(n for n in {*KNOWN_FEATURES, *SFID_COMPANIONS} if sfid_extractor(n) is not None)


def metric_problems(metrics, extractor: str, dinov2_model: str = DINOV2_EXTRACTOR) -> list[str]:
    """Returns why these metrics cannot be computed with this extractor, one sentence each (empty when they can):
    unknown names, an unregistered extractor, IS without class logits, sFID without a spatial feature, FD-DINOv2
    with a model that is no DINOv2 extractor. Loads nothing."""
    if isinstance(metrics, str):
        return [f"metrics must be a list of names, got the string {metrics!r}; allowed names: {list(METRICS)}"]
    metrics = list(metrics)
    problems = []
    if not metrics:
        problems.append(f"no metric asked for; allowed: {list(METRICS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        problems.append(f"unknown metric(s) {unknown}; allowed: {list(METRICS)}")
    if any(m in METRICS and m != "fd_dinov2" for m in metrics):
        provided = provided_features(extractor)
        if provided is None:
            problems.append(f"extractor {extractor!r} is not registered; allowed: {sorted(KNOWN_FEATURES)}")
        else:
            if "isc" in metrics and ISC_LAYER not in provided:
                problems.append(f"isc (Inception Score) needs class logits ('{ISC_LAYER}'), which extractor "
                                f"{extractor} does not provide (it provides {list(provided)})")
            if "sfid" in metrics and sfid_extractor(extractor) is None:
                problems.append(f"sfid needs a spatial feature map ('{SPATIAL_FEATURE}'), which extractor "
                                f"{extractor} does not provide; extractors with one: {sfid_extractors()}")
    if "fd_dinov2" in metrics and dinov2_model not in DINOV2_MODELS:
        problems.append(f"fd_dinov2: dinov2_model={dinov2_model!r} is no DINOv2 extractor; "
                        f"allowed: {sorted(DINOV2_MODELS)}")
    return problems
