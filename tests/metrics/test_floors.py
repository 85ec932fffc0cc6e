"""The floor of a metric: what N real images (not the reference set) get against the same reference statistics,
from disjoint draws, or extrapolated in 1/N when there are too few real images; measured once, then cached."""

import numpy as np
import pytest

from harness.core.config import compose
from harness.metrics import fidelity, floors, references


@pytest.fixture(scope="module")
def digits_floor_sets():
    cfg = compose(["data=digits", "data.image_size=8"])
    reference = references.reference_images(cfg.data, "test")
    real, split = references.floor_images(cfg.data, "test")
    return reference, real, split


def test_the_digits_floor_of_fid_500_from_three_disjoint_draws_is_cached(digits_floor_sets, tmp_path, monkeypatch):
    reference, real, split = digits_floor_sets
    assert split == "train" and len(real) == 1501 and len(reference) == 296  # real images beside the reference
    kw = dict(extractor="digits-cnn", data_name="digits", split="test", real_split=split, cache=tmp_path)
    floor = floors.metric_floor(real, reference, 500, metrics=("fid", "isc", "prc"), **kw)
    assert floor["method"] == "disjoint draws" and floor["counts"] == [500] and floor["pool"] == 1501
    fid = floor["values"]["fid"]
    assert len(fid["draws"]) == 3 and fid["mean"] == pytest.approx(np.mean(fid["draws"]))
    assert fid["spread"] == pytest.approx(np.std(fid["draws"], ddof=1))
    assert 0 < fid["mean"] < 5 and "isc_mean" not in floor["values"]  # IS has nothing real to stand under it
    assert 0.8 < floor["values"]["precision"]["mean"] <= 1 and floor["extractor_weights"] == "0614089547d5"

    def no_work(*a, **k):
        raise AssertionError("a cached floor is measured again")

    monkeypatch.setattr(fidelity, "compute_metrics", no_work)
    assert floors.metric_floor(real, reference, 500, metrics=("fid", "prc"), **kw) == floor


def test_a_floor_beyond_the_real_images_is_extrapolated_in_one_over_n(digits_floor_sets, tmp_path):
    reference, real, split = digits_floor_sets
    floor = floors.metric_floor(real, reference, 5000, extractor="digits-cnn", data_name="digits", split="test",
                                metrics=("fid",), real_split=split, cache=tmp_path)
    assert floor["counts"] == [125, 250, 500] and floor["method"].startswith("extrapolated")
    fid = floor["values"]["fid"]
    assert len(fid["points"]) == 9 and fid["spread"] > 0
    at_500 = np.mean([v for c, v in fid["points"] if c == 500])
    assert fid["mean"] < at_500  # FID's bias falls with N: the floor at 5,000 lies under the one at 500
    with pytest.raises(ValueError, match="at least"):
        floors.metric_floor(real[:100], reference, 5000, extractor="digits-cnn", data_name="digits", split="test",
                            metrics=("fid",), real_split=split, cache=tmp_path)


@pytest.mark.parametrize("seed", range(50))
def test_the_one_over_n_fit_recovers_a_known_law(seed):
    """On many random laws value = a + b / n (with a little noise), the extrapolation recovers a + b / N within a
    few standard errors, and exactly without noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 10), rng.uniform(0, 2000)
    counts = sorted(rng.choice([64, 125, 250, 500, 1000], size=3, replace=False).tolist())
    exact = [(c, a + b / c) for c in counts for _ in range(3)]
    assert floors._extrapolate(exact, 5000)[0] == pytest.approx(a + b / 5000, rel=1e-9, abs=1e-9)
    noisy = [(c, v + rng.normal(0, 0.05 * (a + b / c))) for c, v in exact]
    mean, se = floors._extrapolate(noisy, 5000)
    assert abs(mean - (a + b / 5000)) <= 5 * se + 1e-9
