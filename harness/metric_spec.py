"""Which metrics an evaluation can ask for, and what each feature extractor gives them: checked for every cell
before any sampling, without loading an extractor.

The facts about torch-fidelity's extractors are written down here because importing torch-fidelity (and the
torchvision it loads) takes seconds, and a sweep validates every cell of its grid before it starts; the tests
check this table against torch-fidelity's registry, so it cannot drift. harness.metrics computes the metrics.
"""

from __future__ import annotations

from harness.data import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR

METRICS = ("fid", "isc", "kid", "prc", "sfid", "fd_dinov2")  # every metric harness.metrics computes
DEFAULT_METRICS = ("fid", "isc", "kid", "prc")  # torch-fidelity's four; sfid and fd_dinov2 are asked for
INCEPTION_SPATIAL_EXTRACTOR = "inception-v3-compat-spatial"  # the same network and weights, plus sFID's feature
DINOV2_EXTRACTOR = "dinov2-vit-l-14"  # the network Stein et al. 2023 recommend; EDM2 reports FD with it
ISC_LAYER = "logits_unbiased"  # the layer torch-fidelity's Inception Score reads
SPATIAL_FEATURE = "spatial"  # the name of sFID's feature map in an extractor that provides one
# Where an extractor's FID comes with sFID from a companion extractor (the same network exposing the map).
SFID_COMPANIONS = {INCEPTION_EXTRACTOR: INCEPTION_SPATIAL_EXTRACTOR}

_CLIP = ("clip",)
# The features each extractor provides (torch-fidelity's get_provided_features_list, and the harness's own).
KNOWN_FEATURES = {
    DIGITS_EXTRACTOR: ("64", "logits_unbiased", "logits", SPATIAL_FEATURE),
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
