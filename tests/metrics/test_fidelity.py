"""Metrics: the FID path against closed forms, the digits extractor, reference statistics keys, bad input."""

import logging
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
import torch_fidelity
from fixtures_metrics import TestExtractor
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from harness.core import vocabulary
from harness.core.config import DataConfig
from harness.core.vocabulary import DEFAULT_METRICS, DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, KNOWN_FEATURES, METRICS
from harness.data.datasets import center_crop_arr, digits_split, to_uint8_rgb
from harness.metrics import fidelity as M
from harness.metrics import frechet, inception, inhouse, references

PACKED = "test-packed-float32"
PACKED_DIM = 12  # 12 float32 features = 48 bytes = one 4x4 RGB image


class PackedFloatExtractor(TestExtractor):
    """Identity-like extractor: the features are the float32 values packed into each image's HWC bytes.

    Exact features let the test compare the harness's FID with a closed form to rounding error, and any
    mistake in the image layout on the way to torch-fidelity (HWC vs CHW) decodes to different numbers.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return ("packed",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "packed"

    def forward(self, x):
        b = x.shape[0]
        return (x.permute(0, 2, 3, 1).contiguous().reshape(b, -1).view(torch.float32).clone(),)


if PACKED not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(PACKED, PackedFloatExtractor)


def pack(features: np.ndarray) -> np.ndarray:
    """Return float features (N, 12) as uint8 images (N, 4, 4, 3) holding their float32 bytes."""
    return np.ascontiguousarray(features, dtype=np.float32).view(np.uint8).reshape(len(features), 4, 4, 3)


def gaussian_set(rng, n, mu, sigma) -> np.ndarray:
    """Return n points whose sample mean is exactly mu and sample covariance (ddof 1) exactly sigma."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: sample covariance I
    return z @ np.linalg.cholesky(sigma).T + mu


@pytest.fixture(scope="module")
def two_gaussians():
    """Two packed feature sets with known moments and their analytic Frechet distance."""
    rng = np.random.default_rng(0)
    rot, _ = np.linalg.qr(rng.standard_normal((PACKED_DIM, PACKED_DIM)))
    a, b = rng.uniform(1, 9, PACKED_DIM), rng.uniform(1, 9, PACKED_DIM)
    mu1, mu2 = rng.normal(0, 1, PACKED_DIM), rng.normal(0, 1, PACKED_DIM)
    # Same eigenvectors, different eigenvalues: the trace term has the closed form sum (sqrt a - sqrt b)^2
    # although neither covariance is diagonal.
    s1, s2 = rot @ np.diag(a) @ rot.T, rot @ np.diag(b) @ rot.T
    fid = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    x1, x2 = gaussian_set(rng, 300, mu1, s1), gaussian_set(rng, 200, mu2, s2)
    return pack(x1), pack(x2), (mu1, s1, mu2, s2), fid


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("harness_cache")


@pytest.fixture(scope="session")
def digits_info():
    return inhouse.extractor_info("digits-cnn")



# ---- pure functions ----

def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.5, 4, 5), rng.uniform(0.5, 4, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Non-commuting covariances: against scipy's matrix square root.
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = m1 @ m1.T + np.eye(5), m2 @ m2.T + np.eye(5)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        frechet.frechet_distance(mu1, s1, mu2[:4], s2)


def test_each_data_kind_names_its_extractor():
    from harness.data.datasets import data_kind

    assert data_kind("digits").extractor == DIGITS_EXTRACTOR == "digits-cnn"
    assert data_kind("imagefolder").extractor == INCEPTION_EXTRACTOR == "inception-v3-compat"


def test_reference_stats_id_hashes_content_and_shape():
    x = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    key = references.reference_stats_id(x, "digits", "test", "digits-cnn")
    assert key.startswith("digits_test_4_digits-cnn_") and len(key.rsplit("_", 1)[1]) == 12
    assert references.reference_stats_id(x.copy(), "digits", "test", "digits-cnn") == key
    y = x.copy()
    y[3, 1, 2, 0] ^= 1  # one bit of one image
    assert references.reference_stats_id(y, "digits", "test", "digits-cnn") != key
    # Same bytes, other shape: other images.
    assert references.reference_stats_id(x.reshape(3, 8, 4, 3), "digits", "test", "digits-cnn").rsplit("_", 1)[1] \
        != key.rsplit("_", 1)[1]
    with pytest.raises(ValueError, match="data_name"):
        references.reference_stats_id(x, "a/b", "test", "digits-cnn")
    with pytest.raises(ValueError, match="uint8"):
        references.reference_stats_id(x.astype(np.float32), "digits", "test", "digits-cnn")


# ---- the FID path, with an exact extractor ----

def test_fid_path_matches_closed_form_of_two_gaussians(two_gaussians, tmp_path):
    x1, x2, moments, fid_analytic = two_gaussians
    assert frechet.frechet_distance(*moments) == pytest.approx(fid_analytic, rel=1e-9)
    with pytest.warns(UserWarning, match="Inception Score skipped"):
        rec = M.compute_metrics(x1, x2, extractor=PACKED, data_name="synthetic", split="test", cache=tmp_path)
    assert rec["metrics"]["fid"] == pytest.approx(fid_analytic, rel=1e-3)
    assert rec["feature_dim"] == PACKED_DIM and rec["num_samples"] == 300 and rec["num_reference"] == 200
    assert set(rec["metrics"]) == {"fid", "kid_mean", "kid_std", "precision", "recall"}  # no logits: no IS
    assert any("Inception Score skipped" in w for w in rec["warnings"])
    assert rec["settings"]["kid_subset_size"] == 200  # adapted to the smaller set
    self_rec = M.compute_metrics(x2, x2, extractor=PACKED, data_name="synthetic", metrics=("fid",),
                                 cache=tmp_path)
    assert abs(self_rec["metrics"]["fid"]) < 1e-6 * fid_analytic
    assert self_rec["warnings"] == []


class _Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_changing_one_reference_image_changes_key_and_fid(two_gaussians, tmp_path):
    samples, ref, _, _ = two_gaussians
    changed = ref.copy()
    changed[0] = pack(np.full((1, PACKED_DIM), 40.0))[0]
    kw = dict(extractor=PACKED, data_name="synthetic", metrics=("fid",), cache=tmp_path)
    first = M.compute_metrics(samples, ref, **kw)
    second = M.compute_metrics(samples, changed, **kw)
    again = M.compute_metrics(samples, ref, **kw)  # from the cache
    assert first["reference_stats_id"] != second["reference_stats_id"]
    assert second["metrics"]["fid"] > first["metrics"]["fid"] + 1.0
    assert again["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"], rel=1e-12)
    ids = (first["reference_stats_id"], second["reference_stats_id"])
    cached = [p.name for p in (tmp_path / "fidelity" / PACKED).glob("*.pt")]
    assert {i for i in ids if any(name.startswith(f"{i}-") for name in cached)} == set(ids)
    assert all(name.startswith(ids) for name in cached)
    # Control, why the key must hold the hash: torch-fidelity keyed by a fixed name returns the stale FID.
    fixed = dict(input2_cache_name="fixed-name", cache_root=str(tmp_path / "tf"), feature_extractor=PACKED,
                 fid=True, cuda=False, verbose=False, save_cpu_ram=True)
    stale1 = torch_fidelity.calculate_metrics(input1=_Images(samples), input2=_Images(ref), **fixed)
    stale2 = torch_fidelity.calculate_metrics(input1=_Images(samples), input2=_Images(changed), **fixed)
    assert stale1 == stale2


def test_few_images_warn_loudly_and_are_recorded(two_gaussians, tmp_path, caplog):
    x1, x2, _, _ = two_gaussians
    with caplog.at_level(logging.WARNING, logger="harness.metrics.fidelity"), \
            pytest.warns(UserWarning, match="fewer images than feature dimensions"):
        rec = M.compute_metrics(x1[:8], x2, extractor=PACKED, data_name="synthetic", metrics=("fid",),
                                cache=tmp_path)
    assert any("fewer images than feature dimensions" in w for w in rec["warnings"])
    assert "fewer images than feature dimensions" in caplog.text


def test_bad_input_is_refused_with_the_allowed_values(two_gaussians, tmp_path):
    x1, x2, _, _ = two_gaussians
    kw = dict(extractor=PACKED, data_name="synthetic", cache=tmp_path)
    with pytest.raises(ValueError, match="'fid', 'isc', 'kid', 'prc'"):
        M.compute_metrics(x1, x2, metrics=("fid", "lpips"), **kw)
    with pytest.raises(ValueError, match="uint8"):
        M.compute_metrics(x1.astype(np.float32), x2, **kw)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        M.compute_metrics(x1[..., :1], x2, **kw)
    with pytest.raises(ValueError, match="allowed 'cpu'"):
        M.compute_metrics(x1, x2, device="tpu", **kw)
    with pytest.raises(ValueError, match="not registered.*inception-v3-compat"):
        M.compute_metrics(x1, x2, extractor="no-such-net", data_name="synthetic", cache=tmp_path)


def test_missing_inception_weights_offline_says_where_they_go(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # the network, not the code under test
    x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    expected = tmp_path / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    with pytest.raises(inception.MissingWeightsError) as err:
        M.compute_metrics(x, x, extractor=INCEPTION_EXTRACTOR, data_name="imagefolder", cache=tmp_path)
    assert str(expected) in str(err.value) and URL_INCEPTION_V3 in str(err.value)
    assert expected.parent.is_dir()  # the folder torch-fidelity really looked in is the one we name


# ---- the digits extractor ----

def test_the_shipped_digits_extractor_is_accurate_and_pinned(digits_info):
    assert digits_info["name"] == "digits-cnn" and digits_info["feature_dim"] == inhouse.FEATURE_DIM
    assert digits_info["heldout_accuracy"] >= 0.95
    assert digits_info["num_heldout"] > 200 and digits_info["weights"] == "shipped"
    ckpt = torch.load(digits_info["weights_path"], weights_only=True)
    pinned = inhouse.spec("digits-cnn").weights_sha256
    assert inhouse.state_sha256(ckpt["model"]) == digits_info["weights_sha256"] == pinned
    assert Path(digits_info["weights_path"]).parent == inhouse.WEIGHTS_DIR  # in the package, not a per-user cache


def test_weights_that_differ_from_the_pinned_hash_are_refused(tmp_path, monkeypatch):
    """A retrained (or corrupted) file is not silently used: its FIDs would compare with nobody's."""
    s = inhouse.spec("digits-cnn")
    ckpt = torch.load(s.weights_path, weights_only=True)
    ckpt["model"]["head.bias"] = ckpt["model"]["head.bias"] + 1e-3
    torch.save(ckpt, tmp_path / "digits-cnn.pt")
    monkeypatch.setattr(inhouse, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(inhouse, "_INFO", {})
    with pytest.raises(ValueError, match="not the pinned"):
        inhouse.extractor_info("digits-cnn")
    (tmp_path / "digits-cnn.pt").unlink()
    with pytest.raises(inhouse.cli.MissingWeights, match="python -m harness.metrics.inhouse train digits-cnn"):
        inhouse.extractor_info("digits-cnn")


@pytest.mark.slow
def test_the_training_recipe_still_trains_an_accurate_extractor(tmp_path):
    """The script beside the weights reproduces an extractor of the same quality (its bytes depend on the CPU)."""
    path, ckpt = inhouse.write_weights(inhouse.spec("digits-cnn"), tmp_path)
    assert path.is_file() and ckpt["heldout_accuracy"] >= 0.95
    assert inhouse.state_sha256(ckpt["model"]) == ckpt["weights_sha256"]


def blurred(images: np.ndarray) -> np.ndarray:
    """Return uint8 images (N, H, W, 3) under a 5x5 binomial blur."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_digits_fid_orders_real_blurred_noise(digits_info, digits_cache, digits_sets):
    test, train = digits_sets
    kw = dict(extractor=DIGITS_EXTRACTOR, data_name="digits", split="test", cache=digits_cache)
    real = M.compute_metrics(train, test, **kw)
    blur = M.compute_metrics(blurred(test), test, metrics=("fid",), **kw)
    noise_images = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    noise = M.compute_metrics(noise_images, test, metrics=("fid",), **kw)
    fid_real, fid_blur, fid_noise = (r["metrics"]["fid"] for r in (real, blur, noise))
    assert fid_real < 0.1 * fid_blur and fid_blur < fid_noise
    assert real["metric_label"] == "FID (digits extractor)"
    assert real["reference_stats_id"].startswith("digits_test_16_digits-cnn_")
    assert real["extractor_info"] == {k: digits_info[k] for k in
                                      ("name", "heldout_accuracy", "weights_sha256", "weights", "feature_dim")}
    assert set(real["metrics"]) == {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std",
                                    "precision", "recall"}
    assert real["metrics"]["isc_mean"] > 5  # ten well-separated classes: IS well above 1
    assert real["warnings"] == []


def test_digits_extractor_accepts_other_resolutions(digits_cache, digits_info):
    cfg32 = DataConfig(name="digits", image_size=32)
    test32, train32 = references.reference_images(cfg32, "test"), references.reference_images(cfg32, "train")
    assert test32.shape[1:] == (32, 32, 3)
    rec = M.compute_metrics(train32, test32, extractor=DIGITS_EXTRACTOR, data_name="digits",
                            metrics=("fid",), cache=digits_cache)
    assert rec["reference_stats_id"].startswith("digits_test_32_") and rec["metrics"]["fid"] < 5


# ---- reference images ----

def test_reference_images_digits_and_imagefolder(tmp_path):
    test = references.reference_images(DataConfig(name="digits", image_size=16), "test")
    assert test.dtype == np.uint8 and test.shape[1:] == (16, 16, 3)
    assert (test[..., 0] == test[..., 2]).all()  # grayscale replicated
    rng = np.random.default_rng(0)
    files = []
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            files.append(tmp_path / cls / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(files[-1])
    cfg = DataConfig(name="imagefolder", path=str(tmp_path), image_size=256, num_classes=2, channels=3)
    ref = references.reference_images(cfg, "train")
    assert ref.shape == (4, 256, 256, 3) and ref.dtype == np.uint8
    with Image.open(files[0]) as im:
        np.testing.assert_array_equal(ref[0], np.asarray(center_crop_arr(im.convert("RGB"), 256)))
    sub = references.reference_images(cfg, "train", max_images=2)
    assert len(sub) == 2 and any((sub[0] == r).all() for r in ref)
    with pytest.raises(ValueError, match="split"):
        references.reference_images(cfg, "test")
    with pytest.raises(ValueError, match="allowed 'digits', 'imagefolder'"):
        references.reference_images(DataConfig(name="synthetic"), "test")


# ---- which metrics an extractor can compute ----

def test_metric_problems_name_every_reason():
    assert vocabulary.metric_problems(("fid", "isc", "kid", "prc", "sfid"), DIGITS_EXTRACTOR) == []
    assert vocabulary.metric_problems(METRICS, INCEPTION_EXTRACTOR) == []  # sFID through its spatial companion
    (unknown,) = vocabulary.metric_problems(("fid", "lpips"), DIGITS_EXTRACTOR)
    assert "'lpips'" in unknown and all(f"'{m}'" in unknown for m in METRICS)  # and the allowed names
    isc, sfid = vocabulary.metric_problems(("isc", "sfid"), PACKED)
    assert "logits" in isc and PACKED in isc
    assert PACKED in sfid and INCEPTION_EXTRACTOR in sfid and DIGITS_EXTRACTOR in sfid  # and which can
    assert vocabulary.metric_problems(("sfid",), "vgg16")  # a registered extractor without a spatial map
    (unregistered,) = vocabulary.metric_problems(("fid",), "no-such-net")
    assert "not registered" in unregistered and INCEPTION_EXTRACTOR in unregistered
    (dino,) = vocabulary.metric_problems(("fd_dinov2",), DIGITS_EXTRACTOR, dinov2_model="vgg16")
    assert "'vgg16'" in dino and vocabulary.DINOV2_EXTRACTOR in dino
    assert vocabulary.metric_problems([], DIGITS_EXTRACTOR) and vocabulary.metric_problems("fid", DIGITS_EXTRACTOR)


def test_what_cannot_be_computed_is_refused_before_any_extractor_loads(two_gaussians, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        pytest.fail("an extractor was loaded")

    monkeypatch.setattr(M, "create_feature_extractor", no_load)
    with pytest.raises(ValueError, match="sfid needs a spatial feature map"):
        M.preflight(("fid", "sfid"), PACKED, cuda=False, cache=tmp_path)
    x1, x2, _, _ = two_gaussians
    with pytest.raises(ValueError, match="sfid needs a spatial feature map"):
        M.compute_metrics(x1, x2, extractor=PACKED, data_name="synthetic", metrics=("fid", "sfid"), cache=tmp_path)
    assert DEFAULT_METRICS == ("fid", "isc", "kid", "prc")  # the new metrics are asked for, never implied


def test_the_light_table_of_extractor_features_is_torch_fidelitys():
    """The vocabulary checks metric lists without loading torch-fidelity; its table must say what the registry says."""
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from harness.core import vocabulary

    inhouse.extractor_info("digits-cnn")  # registers the harness's own extractors
    for name, features in KNOWN_FEATURES.items():
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        assert tuple(cls.get_provided_features_list()) == features, name
    shipped = {n for n, c in FEATURE_EXTRACTORS_REGISTRY.items() if c.__module__.startswith("torch_fidelity")}
    assert shipped <= set(KNOWN_FEATURES)  # torch-fidelity's own extractors need no import to check
    assert set(vocabulary.DINOV2_MODELS) == set(MODEL_METADATA)


# The digits test split (296 images) against the train split's statistics (1,501), both at the demo's 8 x 8, with
# the shipped weights: computed once on a 2-core AMD EPYC (AVX2, no AVX-512), the same at 1 and 2 threads.
SHIPPED_DIGITS_VALUES = {"fid": 0.8054896411110235, "sfid": 5.020361377463473, "precision": 0.8986486196517944,
                         "recall": 0.9460359811782837}


def test_the_shipped_digits_extractor_gives_the_same_numbers_on_every_cpu(tmp_path):
    """Fixed images and shipped weights give the committed FID, sFID, precision and recall on any CPU.

    Tolerances: another CPU's float32 convolution kernels (AVX2, AVX-512, other blockings) change a feature by about
    1e-6 of its value, which moves a Frechet distance computed in float64 by far less than 1e-4 of itself; precision
    and recall count images inside k-NN balls, so a rounding difference can move at most an image on the ball's
    edge: one image of the set (1/296, 1/1501). A retrained or changed extractor moves them far more (the CPU-trained
    extractor of an earlier version moved the demo's FIDs by 4-10% between two machines)."""
    test = to_uint8_rgb(digits_split("test", 8)[0])
    train = to_uint8_rgb(digits_split("train", 8)[0])
    rec = M.compute_metrics(test, train, extractor=DIGITS_EXTRACTOR, data_name="digits", split="train",
                            metrics=("fid", "sfid", "prc"), cache=tmp_path)
    got, want = rec["metrics"], SHIPPED_DIGITS_VALUES
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-4)
    assert got["sfid"] == pytest.approx(want["sfid"], rel=1e-4)
    assert abs(got["precision"] - want["precision"]) <= 1 / len(test) + 1e-9
    assert abs(got["recall"] - want["recall"]) <= 1 / len(train) + 1e-9
    assert rec["extractor_info"]["weights_sha256"] == inhouse.spec(DIGITS_EXTRACTOR).weights_sha256
