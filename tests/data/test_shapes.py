"""The procedural shapes: pinned bytes (identical on every machine), determinism whatever the batch, a stream that
never repeats, disjoint held-out and floor streams, balanced and distinct classes, the data kind's registry entry,
its references, its extractor, and the data benchmark."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import cell
from harness.bench import bench_data
from harness.core.config import compose
from harness.data import datasets, shapes
from harness.data.datasets import build_dataset, heldout_dataset, to_uint8_rgb, unique_images, validate_data
from harness.data.shapes import ShapesDataset
from harness.metrics import fidelity, inhouse, references

# sha256 of the uint8 bytes (H, W, 3) of single images, computed once on a 2-core AMD EPYC (numpy 2.4): any machine
# must render the same bytes, since the generator uses only exactly rounded operations.
PINNED = {
    ("train", 0, 16): "0a36035f9a45032878ec1d3c362a869bd5f3c587a63934ac7c48f636f21373b7",
    ("train", 1, 16): "4a20f281e10173678d0a21463f5b898db93ae3d2b949b0d41d3280aeb4b97fae",
    ("train", 7, 16): "c3f171a2d2859ec9bb1c545227ef49aee3ade274bc3259dd9d5f56d04bf1a2b6",
    ("train", 1_000_000, 16): "dece9b955a65b9e79c8864bf55e1073ab18431ed7218684c52413a1cc6c088e2",
    ("train", 2**61, 16): "ac5840b7fc943a0b5791e8810ebe93506f34b599aed122aadb02918624759ca6",
    ("test", 0, 16): "ef4935e0c42040a89d8c231e51eb57e11e10f9b2bbd231193d64afc8a921a2df",
    ("floor", 14_999, 16): "b29f314fee5bbb96618235314646ae361a0c0dbfc86e94466c356844d98d5072",
    ("train", 0, 32): "835f854925f58c4c97e4c4afdcd77998f001c63dd04a02805381bbf1548efb46",
}
PINNED_LABELS = {("train", 0): 0, ("train", 1): 2, ("train", 7): 5, ("test", 0): 1}
# The whole held-out set (2,048 images at 16 x 16): what the FID reference and the validation loss read.
PINNED_TEST_SET = "ae9ca2ae8a688ba513125e0bcc7e80018749da11bccc279b12dfcb5fee3d0839"
STREAM_CHECKED = 100_000


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def train_stream():
    """The first STREAM_CHECKED training images (uint8) and labels."""
    return shapes.render(shapes.SEED, "train", np.arange(STREAM_CHECKED))


# ---- exact and deterministic ----

@pytest.mark.parametrize("key", list(PINNED), ids=lambda k: f"{k[0]}-{k[1]}-{k[2]}px")
def test_images_are_pinned_to_the_byte(key):
    split, index, size = key
    x, y = shapes.render(shapes.SEED, split, [index], size)
    assert x.shape == (1, size, size, 3) and x.dtype == np.uint8
    assert _sha(x[0]) == PINNED[key]
    if (split, index) in PINNED_LABELS:
        assert y[0] == PINNED_LABELS[(split, index)]


def test_the_held_out_set_is_pinned():
    assert _sha(ShapesDataset("test").uint8_images()) == PINNED_TEST_SET


def test_an_image_does_not_depend_on_its_batch():
    """Image i alone, in a batch of others (other classes, across the rendering chunks), and again: the same bytes."""
    idx = np.array([5, 3, 2**40, 0, 77, 1000, 5])
    alone = np.stack([shapes.render(shapes.SEED, "train", [i])[0][0] for i in idx])
    together = shapes.render(shapes.SEED, "train", idx)[0]
    assert np.array_equal(alone, together) and np.array_equal(together[0], together[-1])
    big = np.concatenate([np.arange(600, 1300), idx])  # past the 512-image chunk, so idx lands in a later chunk
    assert np.array_equal(shapes.render(shapes.SEED, "train", big)[0][-len(idx):], alone)
    assert np.array_equal(shapes.render(shapes.SEED, "train", idx)[0], together)  # and across calls


def test_the_labels_need_no_rendering_and_the_seed_matters():
    idx = np.arange(3000)
    assert np.array_equal(shapes.labels_of(shapes.SEED, "train", idx), shapes.render(shapes.SEED, "train", idx)[1])
    other = shapes.render(1, "train", np.arange(50))[0]
    assert not any(np.array_equal(a, b) for a, b in zip(other, shapes.render(shapes.SEED, "train", np.arange(50))[0]))


def test_32_pixels_render_the_same_scene():
    """The parameters are in canvas units: a 2 x 2 box average of the 32 x 32 image is close to the 16 x 16 one."""
    idx = np.arange(200)
    small = shapes.render(shapes.SEED, "test", idx, 16)[0].astype(np.float32)
    big = shapes.render(shapes.SEED, "test", idx, 32)[0].astype(np.float32)
    pooled = big.reshape(200, 16, 2, 16, 2, 3).mean(axis=(2, 4))
    assert np.abs(pooled - small).mean() < 4.0  # out of 255: only the anti-aliased edges differ


# ---- an unlimited stream and its disjoint companions ----

def test_the_training_stream_never_repeats_and_shares_nothing_with_test_and_floor(train_stream):
    x, _ = train_stream
    seen = {row.tobytes() for row in x}
    assert len(seen) == STREAM_CHECKED
    test = ShapesDataset("test").uint8_images()
    floor = ShapesDataset("floor").uint8_images()
    assert (len(test), len(floor)) == (shapes.HELDOUT_COUNT, shapes.FLOOR_COUNT)
    others = [row.tobytes() for row in np.concatenate([test, floor])]
    assert len(set(others)) == len(others)  # test and floor are disjoint and repeat nothing
    assert not seen.intersection(others)


def test_labels_are_balanced_and_every_class_is_drawn_visibly(train_stream):
    x, y = train_stream
    counts = np.bincount(y, minlength=shapes.NUM_CLASSES)
    assert counts.min() > 0.95 * STREAM_CHECKED / 10 and counts.max() < 1.05 * STREAM_CHECKED / 10
    p = shapes.image_params(shapes.SEED, "train", np.arange(2000))
    bg = np.floor(p["bg"] * 255 + 0.5)[:, None, None, :]
    changed = (np.abs(x[:2000].astype(np.float32) - bg).max(axis=-1) > 0).sum(axis=(1, 2))
    for c in range(shapes.NUM_CLASSES):  # every image shows its shape: several pixels off the background
        assert changed[p["label"] == c].min() >= 6, shapes.SHAPE_CLASSES[c]
    contrast = np.abs(p["fg"] - p["bg"]).sum(axis=1)
    assert contrast.min() >= shapes.FG_MIN_CONTRAST - 1e-6


def test_parameters_lie_in_their_ranges():
    p = shapes.image_params(shapes.SEED, "train", np.arange(20_000))
    lo, hi = shapes.SCALE_RANGE
    assert lo <= p["scale"].min() and p["scale"].max() <= hi
    assert (p["cx"] >= p["scale"]).all() and (p["cx"] <= 1 - p["scale"]).all()
    assert (p["cy"] >= p["scale"]).all() and (p["cy"] <= 1 - p["scale"]).all()
    norm = p["cos"].astype(np.float64) ** 2 + p["sin"].astype(np.float64) ** 2
    assert np.abs(norm - 1).max() < 1e-6  # a rotation
    angle = np.degrees(np.arctan2(p["sin"], p["cos"]))  # the check may use libm; the generator does not
    assert angle.min() < -170 and angle.max() > 170  # every direction, through the quarter-turns
    assert all(p[k].dtype == np.float32 for k in ("cos", "sin", "cx", "cy", "scale", "bg", "fg"))


# ---- the data set's surface ----

def test_the_dataset_surface():
    ds = ShapesDataset("train")
    assert unique_images(ds) is None and len(ds) == shapes.STREAM_LENGTH and ds.num_classes == 10
    idx = torch.tensor([3, 2**50, 0])
    x, y = ds.get_batch(idx)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    u8 = shapes.render(shapes.SEED, "train", idx.numpy())[0]
    assert np.array_equal(to_uint8_rgb(x), u8)  # what sampling rounds back is the rendered bytes
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ds.augment(x, g), x) and torch.equal(ds.fixed(x, g), x)
    xi, yi = ds[2**50]
    assert torch.equal(xi, x[1]) and yi == y[1]
    d = ds.describe()
    assert json.loads(json.dumps(d)) == d
    assert (d["name"], d["split"], d["count"], d["resolution"], d["channels"], d["num_classes"]) == \
        ("shapes", "train", None, 16, 3, 10)
    assert d["checksum"] == ShapesDataset("test").describe()["checksum"] != ShapesDataset(image_size=32).describe()[
        "checksum"]
    test = ShapesDataset("test")
    assert unique_images(test) == len(test) == shapes.HELDOUT_COUNT
    with pytest.raises(IndexError, match=r"\[0, 2048\)"):
        test.get_batch(torch.tensor([2048]))


def test_uint8_to_model_and_back_is_exact_for_every_value():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = shapes.to_model(u8)
    assert x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8_rgb(x), u8)


def test_bad_input_gets_one_line_naming_what_is_allowed():
    for call, match in [(lambda: ShapesDataset("val"), "'val'; allowed: train, test, floor"),
                        (lambda: ShapesDataset(image_size=24), r"24 not allowed; allowed: \(16, 32\)"),
                        (lambda: shapes.render(0, "train", [-1]), "non-negative"),
                        (lambda: shapes.stream_key(-3, "train"), "-3")]:
        with pytest.raises(ValueError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


# ---- the data kind ----

def test_the_kind_composes_validates_and_builds():
    cfg = compose(["data=shapes", "eval=shapes"])
    assert (cfg.data.name, cfg.data.image_size, cfg.data.channels, cfg.data.num_classes) == ("shapes", 16, 3, 10)
    assert validate_data(cfg.data) == [] and cell.validate(cfg) == []
    kind = datasets.data_kind("shapes")
    assert kind.extractor == "shapes-cnn" and kind.heldout == "test" and not kind.latent and kind.sizes == (16, 32)
    assert datasets.model_input_shape(cfg.data) == (3, 16)
    assert datasets.build_codec(cfg.data).channels == 3
    assert isinstance(build_dataset(cfg.data), ShapesDataset)
    held, split = heldout_dataset(cfg.data)
    assert split == "test" and len(held) == shapes.HELDOUT_COUNT
    assert validate_data(compose(["data=shapes", "data.image_size=32"]).data) == []


@pytest.mark.parametrize("override,words", [
    ("data.channels=1", ["data.channels=1", "allowed: 3"]),
    ("data.image_size=24", ["24 not allowed", "allowed: (16, 32)"]),
    ("data.num_classes=5", ["data.num_classes=5", "allowed: 10"]),
])
def test_bad_shapes_configs_get_one_line_each(override, words):
    [problem] = validate_data(compose(["data=shapes", override]).data)
    assert all(w in problem for w in words) and "\n" not in problem
    with pytest.raises(ValueError, match="bad data config"):
        build_dataset(compose(["data=shapes", override]).data)


def test_references_are_the_held_out_set_and_the_floor_stream():
    data = compose(["data=shapes"]).data
    ref = references.reference_images(data, "test")
    assert ref.shape == (shapes.HELDOUT_COUNT, 16, 16, 3) and _sha(ref) == PINNED_TEST_SET
    assert references.reference_images(data, "test", max_images=100).shape == (100, 16, 16, 3)
    with pytest.raises(ValueError, match="reference split 'train' not allowed; allowed: 'test'"):
        references.reference_images(data, "train")
    real, split = references.floor_images(data, "test")
    assert split == "floor" and real.shape == (shapes.FLOOR_COUNT, 16, 16, 3)
    assert shapes.FLOOR_COUNT >= 3 * 5000  # three disjoint draws of FID-5K


# ---- its extractor ----

def test_the_shipped_extractor_is_pinned_and_classifies_the_held_out_set():
    info = inhouse.extractor_info("shapes-cnn")
    assert info["weights_sha256"] == inhouse.spec("shapes-cnn").weights_sha256 and info["heldout_accuracy"] >= 0.95
    ckpt = torch.load(info["weights_path"], weights_only=True)
    assert not any(k.startswith("aux.") for k in ckpt["model"])  # the training-only head is not shipped
    net = inhouse.SmallCNN(3, 10)
    net.load_state_dict(ckpt["model"])
    x, y = inhouse._shapes_images("test", 16)
    with torch.no_grad():
        _, logits = net.eval()(inhouse.preprocess(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 16))
    accuracy = float((logits.argmax(1).numpy() == y).mean())
    assert accuracy == pytest.approx(info["heldout_accuracy"]) and accuracy >= 0.95


def test_the_digits_extractor_layout_is_unchanged():
    """The optional auxiliary head leaves SmallCNN's default state dict (the digits weights') as it was."""
    assert set(inhouse.SmallCNN(1, 10).state_dict()) == set(
        torch.load(inhouse.spec("digits-cnn").weights_path, weights_only=True)["model"])
    assert "aux.weight" in inhouse.SmallCNN(3, 10, aux_dim=10).state_dict()


def _blurred(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_fid_in_the_shapes_space_sees_blur_and_wrong_colours(tmp_path):
    data = compose(["data=shapes"]).data
    ref = references.reference_images(data, "test")
    real = references.floor_images(data, "test")[0][:1000]
    grey = np.repeat(np.floor(real.astype(np.float32).mean(-1, keepdims=True) + 0.5).astype(np.uint8), 3, -1)

    def fid(images):
        return fidelity.compute_metrics(images, ref, extractor="shapes-cnn", data_name="shapes", split="test",
                                        metrics=("fid",), cache=tmp_path)["metrics"]["fid"]

    f_real, f_blur, f_grey = fid(real), fid(_blurred(real)), fid(grey)
    assert f_real < 5 and f_blur > 20 * f_real and f_grey > 20 * f_real


# ---- the benchmark and the figure ----

def test_the_data_benchmark_record():
    r = bench_data("shapes", batch=64, steps=2, repeats=2)
    assert r["kind"] == "data" and r["data"] == "shapes" and r["unique_images"] is None and r["complete"]
    assert [s["name"] for s in r["settings"]] == ["get_batch + augment", "render (uint8)"]
    assert all(s["images_per_s"] > 0 and len(s["images_per_s_runs"]) == 2 for s in r["settings"])
    json.dumps(r)
    with pytest.raises(ValueError, match="'imagefolder'.*allowed: digits, shapes, synthetic"):
        bench_data("imagefolder")


def test_the_grid_has_one_row_per_class(tmp_path):
    g = shapes.grid(per_class=3)
    assert g.shape == (10, 3, 16, 16, 3)
    labels = shapes.labels_of(shapes.SEED, "test", np.arange(200))
    firsts = [np.flatnonzero(labels == c)[0] for c in range(10)]
    assert np.array_equal(g[:, 0], shapes.render(shapes.SEED, "test", firsts)[0])
    path = shapes.save_grid(tmp_path / "grid.png", per_class=2, zoom=2, gap=1)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size == (2 * 33 + 1, 10 * 33 + 1)
