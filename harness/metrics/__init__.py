"""Sample quality: the feature extractors (Inception, its sFID map, the digits CNN, DINOv2), Frechet distances with
cached reference statistics, and the torch-fidelity metrics, as one evaluation record. The names live in
harness.core.vocabulary, which the torch-free analysis reads too."""
