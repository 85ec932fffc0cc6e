"""sFID: ADM's spatial feature from torch-fidelity's Inception, the digits CNN's analogue, caching and cost."""

import shutil
import time
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fixtures_metrics import TestExtractor
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from harness.core.vocabulary import DIGITS_EXTRACTOR, INCEPTION_EXTRACTOR, INCEPTION_SPATIAL_EXTRACTOR, SPATIAL_FEATURE
from harness.metrics import fidelity as M
from harness.metrics import frechet, inception, inhouse, references

POINTWISE = "test-pointwise-spatial"
INCEPTION_SFID_DIM = 17 * 17 * frechet.SFID_CHANNELS  # ADM: mixed_6/conv is 17 x 17 at 299 x 299


class PointwiseExtractor(TestExtractor):
    """A fixed random per-pixel network (two 1x1 convolutions) over a map (N, 8, H, W).

    Its FID feature is the map's global average, sFID's the map's SPATIAL_FEATURE: spatially rearranged images
    keep their FID features (a mean ignores order) and change only their spatial ones.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(16, 3, generator=g, dtype=torch.float64)
        self.w2 = torch.randn(8, 16, generator=g, dtype=torch.float64) / 4

    @staticmethod
    def get_provided_features_list():
        return "pooled", SPATIAL_FEATURE

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return SPATIAL_FEATURE if metric == "sfid" else "pooled"

    def forward(self, x):
        h = F.relu(torch.einsum("oc,nchw->nohw", self.w1, x.to(torch.float64) / 255))
        fmap = torch.einsum("oc,nchw->nohw", self.w2, h)
        # float64 means, rounded to float32: a permuted summation order leaves the same float32 bits
        features = {"pooled": fmap.mean(dim=(2, 3)).to(torch.float32),
                    SPATIAL_FEATURE: frechet.spatial_feature(fmap.permute(0, 2, 3, 1))}
        return tuple(features[f] for f in self.features_list)


if POINTWISE not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(POINTWISE, PointwiseExtractor)


def bright_top(rng, n: int, top: float) -> np.ndarray:
    """Return n uint8 images (n, 4, 4, 3): noisy bright upper half (mean `top`), noisy dark lower half."""
    x = np.empty((n, 4, 4, 3))
    x[:, :2] = rng.normal(top, 30, (n, 2, 4, 3))
    x[:, 2:] = rng.normal(40, 20, (n, 2, 4, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def exact_moments(rng, n: int, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Return n points whose sample mean is exactly mu and sample covariance (ddof 1) exactly diag(var)."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance I
    return z * np.sqrt(var) + mu



@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """Path of random weights for torch-fidelity's Inception port (He-initialised, so activations neither vanish
    nor explode through 11 blocks): the real weights are a download."""

    class RandomInit(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            return None  # keep the random initialisation

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pt")
    torch.manual_seed(0)
    net = RandomInit(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(folder / "empty.pt"))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.save(net.state_dict(), folder / "random.pth")
    return folder / "random.pth"


# ---- the Frechet distance on sFID's 2,023 dimensions ----

@pytest.mark.slow
def test_frechet_of_feature_statistics_matches_closed_form_in_2023_dims():
    rng = np.random.default_rng(0)
    d = INCEPTION_SFID_DIM
    var1, var2 = rng.uniform(0.5, 4, d), rng.uniform(0.5, 4, d)
    mu1, mu2 = rng.normal(0, 1, d), rng.normal(0, 1, d)
    x1, x2 = exact_moments(rng, d + 150, mu1, var1), exact_moments(rng, d + 100, mu2, var2)
    (m1, s1), (m2, s2) = frechet.feature_statistics(x1), frechet.feature_statistics(x2)
    np.testing.assert_allclose(m1, mu1, atol=1e-10)
    np.testing.assert_allclose(s2, np.diag(var2), atol=1e-9)
    # Diagonal, so commuting, covariances: tr((S1 S2)^(1/2)) = sum sqrt(v1 v2), the trace term sum (s1 - s2)^2.
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet.frechet_distance(m1, s1, m2, s2) == pytest.approx(closed, rel=1e-8)


# ---- where the spatial definition matters ----

def test_rearranged_images_keep_fid_and_change_sfid(tmp_path):
    rng = np.random.default_rng(0)
    reference, fresh = bright_top(rng, 300, top=200), bright_top(rng, 300, top=200)
    samples = bright_top(rng, 300, top=185)  # a little too dark on top
    upside_down = np.ascontiguousarray(samples[:, ::-1])  # the same pixels per image, bright half at the bottom
    kw = dict(extractor=POINTWISE, data_name="synthetic", metrics=("fid", "sfid"), cache=tmp_path)
    floor = M.compute_metrics(fresh, reference, **kw)  # what sampling noise alone gives
    rec = M.compute_metrics(samples, reference, **kw)
    flipped = M.compute_metrics(upside_down, reference, **kw)
    assert rec["feature_spaces"]["sfid"]["feature_dim"] == 4 * 4 * frechet.SFID_CHANNELS
    assert rec["metrics"]["fid"] > 20 * floor["metrics"]["fid"]  # the pooled features see the darker top
    assert flipped["metrics"]["fid"] == pytest.approx(rec["metrics"]["fid"], rel=1e-9)
    assert flipped["metrics"]["sfid"] > 20 * rec["metrics"]["sfid"]
    # sFID sees layout relative to the reference: flipping both sets restores it (one permutation of coordinates).
    both = M.compute_metrics(upside_down, np.ascontiguousarray(reference[:, ::-1]), **kw)
    assert both["metrics"]["sfid"] == pytest.approx(rec["metrics"]["sfid"], rel=1e-6)


# ---- Inception: the tensor ADM reads ----

def test_inception_spatial_feature_is_mixed_6_conv_flattened_hwc(random_inception):
    fe = create_feature_extractor(INCEPTION_SPATIAL_EXTRACTOR, [SPATIAL_FEATURE, "2048"], cuda=False,
                                  verbose=False, feature_extractor_weights_path=str(random_inception))
    saved = torch.load(random_inception, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in fe.inception.state_dict().items())
    block = {}
    fe.inception.Mixed_6d.register_forward_hook(lambda mod, inp, out: block.setdefault("out", out.clone()))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 299, 299), dtype=np.uint8))
    with torch.no_grad():
        spatial, pooled = fe(x)
        nhwc = fe.mixed_6_conv(x)
    assert nhwc.shape == (2, 17, 17, 192) and spatial.shape == (2, INCEPTION_SFID_DIM) and pooled.shape == (2, 2048)
    # Mixed_6d's 1x1 branch: InceptionC concatenates it first, so it is the block output's first 192 channels.
    assert torch.equal(nhwc, block["out"][:, :192].permute(0, 2, 3, 1))
    assert nhwc.min() == 0 and (nhwc > 0).float().mean() > 0.2  # after the ReLU, and not dead
    # ADM's order: [..., :7] of NHWC, then reshape: (H, W, channel), not (channel, H, W).
    assert torch.equal(spatial, nhwc[..., :7].reshape(2, -1))
    assert not torch.equal(spatial, nhwc[..., :7].permute(0, 3, 1, 2).reshape(2, -1))


@pytest.mark.slow
def test_inception_sfid_through_compute_metrics_offline(random_inception, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(str(getattr(url, "full_url", url)))
        raise URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(inception.MissingWeightsError) as err:
        M.preflight(("sfid",), INCEPTION_EXTRACTOR, cuda=False, cache=tmp_path)
    assert str(inception.inception_weights_path()) in str(err.value) and URL_INCEPTION_V3 in str(err.value)
    # The weights FID uses, where torch-fidelity looks for them: sFID needs nothing else.
    inception.inception_weights_path().parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(random_inception, inception.inception_weights_path())
    calls.clear()
    spaces = M.preflight(("fid", "sfid"), INCEPTION_EXTRACTOR, cuda=False, cache=tmp_path)
    assert spaces == {"fid": {"extractor": INCEPTION_EXTRACTOR, "layer": "2048", "feature_dim": 2048},
                      "sfid": {"extractor": INCEPTION_SPATIAL_EXTRACTOR, "layer": SPATIAL_FEATURE,
                               "feature_dim": INCEPTION_SFID_DIM}}
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    reference = np.repeat(np.repeat(rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), 4, 1), 4, 2)
    with pytest.warns(UserWarning, match="sFID from fewer images than feature dimensions"):
        rec = M.compute_metrics(samples, reference, extractor=INCEPTION_EXTRACTOR, data_name="synthetic",
                                metrics=("sfid",), cache=tmp_path)
    assert calls == []  # nothing was downloaded
    space = rec["feature_spaces"]["sfid"]
    assert space["extractor"] == INCEPTION_SPATIAL_EXTRACTOR and space["feature_dim"] == INCEPTION_SFID_DIM
    assert space["reference_stats_id"].startswith("synthetic_test_16_inception-v3-compat-spatial_")
    assert "mixed_6/conv" in space["source"] and rec["metric_labels"] == {"sfid": "sFID"}
    assert rec["metrics"]["sfid"] > 0 and np.isfinite(rec["metrics"]["sfid"])
    stats = tmp_path / "fidelity" / INCEPTION_SPATIAL_EXTRACTOR / f"{space['reference_stats_id']}-spatial-stats.npz"
    with np.load(stats) as z:
        assert z["mu"].shape == (INCEPTION_SFID_DIM,) and int(z["num_images"]) == 6


# ---- the digits extractor ----

def test_digits_spatial_feature_adds_an_output_without_changing_the_others(digits_sets):
    info = inhouse.extractor_info("digits-cnn")
    net = inhouse.SmallCNN()
    net.load_state_dict(torch.load(info["weights_path"], weights_only=True)["model"])
    x = inhouse.preprocess(torch.from_numpy(digits_sets[0][:32]).permute(0, 3, 1, 2), 1, 16)
    with torch.no_grad():
        mid, feat, logits = net.features(x)
        feat_fwd, logits_fwd = net(x)
    assert torch.equal(feat, feat_fwd) and torch.equal(logits, logits_fwd)
    assert mid.shape == (32, 32, 4, 4) and mid.min() >= 0  # the middle conv's ReLU, max-pooled
    fe = create_feature_extractor(DIGITS_EXTRACTOR, [SPATIAL_FEATURE], cuda=False, verbose=False,
                                  feature_extractor_weights_path=info["weights_path"])
    with torch.no_grad():
        (spatial,) = fe(torch.from_numpy(digits_sets[0][:32]).permute(0, 3, 1, 2))
    assert torch.equal(spatial, mid[:, :7].permute(0, 2, 3, 1).reshape(32, -1))


def blurred(images: np.ndarray) -> np.ndarray:
    """Return uint8 images (N, H, W, 3) under a 5x5 binomial blur."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_digits_sfid_orders_real_blurred_noise(digits_sets):
    test, train = digits_sets
    kw = dict(extractor=DIGITS_EXTRACTOR, data_name="digits", split="test")
    real = M.compute_metrics(train, test, metrics=("fid", "sfid"), **kw)
    blur = M.compute_metrics(blurred(test), test, metrics=("sfid",), **kw)
    noise_images = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
    noise = M.compute_metrics(noise_images, test, metrics=("sfid",), **kw)
    sfid_real, sfid_blur, sfid_noise = (r["metrics"]["sfid"] for r in (real, blur, noise))
    assert sfid_real < 0.2 * sfid_blur and sfid_blur < sfid_noise
    fid_only = M.compute_metrics(train, test, metrics=("fid",), **kw)
    assert real["metrics"]["fid"] == fid_only["metrics"]["fid"]  # asking for sFID changes no other metric
    assert real["metric_labels"] == {"fid": "FID (digits extractor)", "sfid": "sFID (digits extractor)"}
    assert real["feature_spaces"]["sfid"] == {
        "extractor": DIGITS_EXTRACTOR, "layer": SPATIAL_FEATURE, "feature_dim": 4 * 4 * frechet.SFID_CHANNELS,
        "reference_stats_id": real["reference_stats_id"], "source": inhouse.InHouseFeatureExtractor.SPATIAL_SOURCE}
    assert real["feature_spaces"]["fid"]["feature_dim"] == inhouse.FEATURE_DIM
    assert real["warnings"] == []  # 112 features from 299 reference images: no singular covariance


def test_sfid_reference_statistics_are_keyed_by_content(digits_sets, monkeypatch):
    test, train = digits_sets
    reference = test[50:]  # a set no other test caches
    changed = reference.copy()
    changed[0] = 255 - changed[0]
    extracted = []
    real_extract = M._extract_features

    def counting(fe, images, *args):
        extracted.append(len(images))
        return real_extract(fe, images, *args)

    monkeypatch.setattr(M, "_extract_features", counting)
    kw = dict(extractor=DIGITS_EXTRACTOR, data_name="digits", metrics=("sfid",))
    first = M.compute_metrics(train[:400], reference, **kw)
    again = M.compute_metrics(train[:400], reference, **kw)
    other = M.compute_metrics(train[:400], changed, **kw)
    assert extracted == [len(reference), 400, 400, len(reference), 400]  # the second call read the reference's
    assert again["metrics"]["sfid"] == first["metrics"]["sfid"]
    assert other["reference_stats_id"] != first["reference_stats_id"]
    assert other["metrics"]["sfid"] != pytest.approx(first["metrics"]["sfid"], rel=1e-6)
    weights = inhouse.extractor_info("digits-cnn")["weights_sha256"][:12]
    folder = references.cache_dir() / "fidelity" / f"{DIGITS_EXTRACTOR}_{weights}"
    for rec in (first, other):
        assert (folder / f"{rec['reference_stats_id']}-spatial-stats.npz").is_file()


@pytest.mark.slow
def test_report_the_time_sfid_adds_to_a_500_sample_digits_evaluation(digits_sets, capsys):
    test, train = digits_sets
    samples = train[:500]
    base = ("fid", "kid", "prc")
    kw = dict(extractor=DIGITS_EXTRACTOR, data_name="digits", split="test")
    M.compute_metrics(samples, test, metrics=base, **kw)  # warm: digits CNN loaded, torch-fidelity cache written

    def timed(metrics):
        t0 = time.perf_counter()
        rec = M.compute_metrics(samples, test, metrics=metrics, **kw)
        return time.perf_counter() - t0, rec

    t_base, _ = timed(base)
    for stale in references.cache_dir().glob("fidelity/*/*-spatial-stats.npz"):
        stale.unlink()  # sFID's reference statistics computed afresh
    t_cold, cold = timed((*base, "sfid"))
    t_warm, warm = timed((*base, "sfid"))
    assert np.isfinite(cold["metrics"]["sfid"]) and warm["metrics"]["sfid"] == cold["metrics"]["sfid"]
    with capsys.disabled():
        print(f"\nsFID on a 500-sample digits evaluation (FID, KID, precision/recall: {t_base:.2f} s): "
              f"+{t_cold - t_base:.2f} s with the reference statistics computed "
              f"(sFID pass {cold['metric_wall_s']['sfid']:.2f} s), "
              f"+{t_warm - t_base:.2f} s with them cached (sFID pass {warm['metric_wall_s']['sfid']:.2f} s)")
