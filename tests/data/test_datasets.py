"""Data sets and codecs: digits split, image folders, ADM centre crop, synthetic, identity and VAE codecs."""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import datasets
from harness.data.codec import (
    DEFAULT_VAE,
    LATENT_SCALE,
    TINY_VAE,
    IdentityCodec,
    VAECodec,
    load_vae,
    tiny_vae,
    vae_geometry,
)
from harness.data.datasets import (
    DATASETS,
    DigitsDataset,
    ImageFolderDataset,
    build_codec,
    build_dataset,
    center_crop_arr,
    digits_split,
    model_input_shape,
    validate_data,
)


def cfg(**kw):
    base = dict(name="digits", path=None, image_size=16, num_classes=10, vae=DEFAULT_VAE,
                synthetic_count=64, channels=1)
    return types.SimpleNamespace(**{**base, **kw})


def make_folder(root, classes=("cat", "ant", "bee"), per_class=2, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


# --- digits -----------------------------------------------------------------------------------------------


def test_digits_split_fixed_disjoint_stratified():
    xtr, ytr = digits_split("train", 8)
    xte, yte = digits_split("test", 8)
    assert (len(xtr), len(xte)) == (1501, 296)
    # At size 8 there is no resampling, so the two splits together are exactly the 1,797 images: a partition.
    from sklearn.datasets import load_digits

    full = torch.from_numpy(load_digits().images / 8.0 - 1).float()
    rows = lambda x: sorted(r.tobytes() for r in x.reshape(len(x), -1).numpy())  # noqa: E731
    assert rows(torch.cat([xtr, xte])) == rows(full)
    # Stratified: every class in the test split in proportion (about 1/6).
    counts = torch.bincount(yte, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 31
    x2, y2 = digits_split("test", 8)
    assert torch.equal(x2, xte) and torch.equal(y2, yte)


def test_digits_values_sizes_labels():
    x, y = digits_split("train", 16)
    assert x.shape == (1501, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    with pytest.raises(ValueError, match="'val'.*train, test"):
        digits_split("val", 16)


def test_digits_dataset_batch_augment_describe():
    ds = build_dataset(cfg(image_size=24), "test")
    assert isinstance(ds, DigitsDataset) and len(ds) == 296 and ds.num_classes == 10
    idx = torch.tensor([5, 0, 295])
    x, y = ds.get_batch(idx)
    assert x.shape == (3, 1, 24, 24) and torch.equal(x, ds.get_batch(idx)[0])
    assert torch.equal(ds.augment(x, torch.Generator().manual_seed(0)), x)  # no flips for digits
    d = ds.describe()
    assert json.loads(json.dumps(d)) == d and d["count"] == 296
    assert d["checksum"] == build_dataset(cfg(image_size=24), "test").describe()["checksum"]
    assert d["checksum"] != build_dataset(cfg(image_size=24), "train").describe()["checksum"]


# --- validation -------------------------------------------------------------------------------------------


def test_validate_data_problems(tmp_path):
    assert validate_data(cfg()) == []
    [msg] = validate_data(cfg(name="mnist"))
    assert "'mnist'" in msg and all(n in msg for n in DATASETS)
    assert any("12 not allowed" in p for p in validate_data(cfg(image_size=12)))
    assert any("path is required" in p for p in validate_data(cfg(name="imagefolder", path=None)))
    missing = str(tmp_path / "nope")
    assert any(missing in p for p in validate_data(cfg(name="latents", path=missing)))
    make_folder(tmp_path / "imgs")
    probs = validate_data(cfg(name="imagefolder", path=str(tmp_path / "imgs"), image_size=300, num_classes=3))
    assert len(probs) == 1 and "300 not allowed" in probs[0]
    probs = validate_data(cfg(name="latents", path=str(tmp_path / "imgs"), image_size=256, num_classes=3))
    assert any("meta.json" in p for p in probs)
    with pytest.raises(ValueError, match="bad data config"):
        build_dataset(cfg(image_size=12))


def test_imagefolder_missing_and_empty_raise_naming_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=str(missing)):
        ImageFolderDataset(str(missing), 256)
    with pytest.raises(ValueError, match=str(missing)):
        build_dataset(cfg(name="imagefolder", path=str(missing), image_size=256, num_classes=3))
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    (empty / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"{empty}.*no images"):
        ImageFolderDataset(str(empty), 256)
    with pytest.raises(ValueError, match=f"{empty}.*no images"):
        build_dataset(cfg(name="imagefolder", path=str(empty), image_size=256, num_classes=2))


# --- image folder -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("wh", [(700, 300), (300, 700), (256, 256), (100, 60)])
def test_center_crop_target_size(wh):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    assert center_crop_arr(im, 256).size == (256, 256)


def test_center_crop_is_adm():
    # 1100x600 -> box-halve once (600 >= 2*256) to 550x300 -> bicubic to 469x256 -> centre 256 crop.
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 1100, 3), dtype=np.uint8))
    want = im.resize((550, 300), Image.BOX).resize((469, 256), Image.BICUBIC).crop((106, 0, 362, 256))
    assert np.array_equal(np.asarray(center_crop_arr(im, 256)), np.asarray(want))
    # The centre survives: a red centre stays red.
    arr = np.zeros((300, 900, 3), dtype=np.uint8)
    arr[:, 300:600] = (255, 0, 0)
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 64))
    assert (out[:, 20:44, 0] > 250).all() and (out[:, 20:44, 2] < 5).all()


def test_imagefolder_matches_torchvision_and_flips(tmp_path):
    root = make_folder(tmp_path / "imgs", size=(300, 280))
    ds = build_dataset(cfg(name="imagefolder", path=str(root), image_size=256, num_classes=3, channels=3))
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(str(root))
    assert ds.classes == tv.classes == ["ant", "bee", "cat"]
    assert ds.samples == [(p, y) for p, y in tv.samples]
    x, y = ds.get_batch(torch.arange(len(ds)))
    assert x.shape == (6, 3, 256, 256) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    xs = x.repeat(8, 1, 1, 1)  # 48 samples
    out = ds.augment(xs, torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, a.flip(-1)) for o, a in zip(out, xs)]
    kept = [torch.equal(o, a) for o, a in zip(out, xs)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    assert torch.equal(out, ds.augment(xs, torch.Generator().manual_seed(0)))
    d = ds.describe()
    assert d["count"] == 6 and d["num_classes"] == 3 and json.loads(json.dumps(d)) == d
    assert model_input_shape(cfg(name="imagefolder", path=str(root), image_size=256)) == (4, 32)


# --- synthetic --------------------------------------------------------------------------------------------


def test_synthetic_fixed_latent_shaped():
    c = cfg(name="synthetic", image_size=256, num_classes=1000, synthetic_count=2000, channels=3)
    assert validate_data(c) == [] and model_input_shape(c) == (4, 32)
    a, b = build_dataset(c), build_dataset(c)
    idx = torch.tensor([0, 1999, 1024])
    xa, ya = a.get_batch(idx)
    assert len(a) == 2000 and xa.shape == (3, 4, 32, 32) and ya.max() < 1000
    assert torch.equal(xa, b.get_batch(idx)[0]) and torch.equal(ya, b.get_batch(idx)[1])
    assert not torch.equal(xa, build_dataset(c, "test").get_batch(idx)[0])
    assert torch.equal(a.augment(xa, torch.Generator()), xa)
    assert isinstance(build_codec(c), IdentityCodec) and build_codec(c).channels == 4


# --- codecs -----------------------------------------------------------------------------------------------


def test_identity_codec():
    codec = build_codec(cfg())
    x = torch.randn(2, 1, 16, 16)
    assert (codec.channels, codec.downsample) == (1, 1)
    assert torch.equal(codec.decode(codec.encode(x)), x)


def test_vae_codec_tiny(tmp_path):
    vae = tiny_vae(seed=0)
    vae.save_pretrained(tmp_path / "vae")
    codec = VAECodec(str(tmp_path / "vae"))
    assert (codec.channels, codec.downsample) == (4, 2)  # read from the config, not assumed 8
    assert vae_geometry(str(tmp_path / "vae")) == (4, 2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = codec.moments(x)
    assert mean.shape == std.shape == (2, 4, 16, 16) and (std > 0).all()
    assert torch.allclose(codec.encode(x), mean * LATENT_SCALE)
    z1 = codec.encode(x, torch.Generator().manual_seed(3))
    z2 = codec.encode(x, torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2) and not torch.allclose(z1, mean * LATENT_SCALE)
    assert codec.decode(z1).shape == (2, 3, 32, 32)
    # Same seed, same weights: a tiny VAE from the name equals the one saved to disk.
    codec2 = build_codec(cfg(name="imagefolder", vae=TINY_VAE, channels=3))
    assert torch.allclose(codec2.moments(x)[0], mean, atol=1e-6)


def test_load_vae_offline_message(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir"):
        load_vae("stabilityai/sd-vae-ft-ema")


def test_load_vae_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/none.*does not exist"):
        load_vae(str(tmp_path / "none"))
    assert datasets.validate_data(cfg(name="imagefolder", path=str(tmp_path), image_size=256,
                                  vae=str(tmp_path / "none")))
