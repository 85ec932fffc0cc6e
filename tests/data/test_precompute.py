"""Latent precompute: resumable after SIGKILL, multi-process, exact moments, refused when mismatched."""

import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from harness.core.distributed import launch_env
from harness.data import precompute
from harness.data.codec import LATENT_SCALE, VAECodec, tiny_vae
from harness.data.datasets import (
    META_FILE,
    ImageFolderDataset,
    LatentShardDataset,
    build_dataset,
    heldout_dataset,
    model_input_shape,
    shard_names,
    validate_data,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES = 32


@pytest.fixture(scope="module")
def src_vae(tmp_path_factory):
    """12 PNGs of assorted sizes in 3 class folders, and a tiny VAE saved as a local folder."""
    tmp = tmp_path_factory.mktemp("pre")
    rng = np.random.default_rng(0)
    for c in ("c0", "c1", "c2"):
        (tmp / "src" / c).mkdir(parents=True)
        for i in range(4):
            w, h = rng.integers(32, 80, 2)
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp / "src" / c / f"{i}.png")
    tiny_vae(seed=0).save_pretrained(tmp / "vae")
    return str(tmp / "src"), str(tmp / "vae")


def args(src, vae, out, *extra):
    return ["--src", src, "--out", out, "--resolution", str(RES), "--vae", vae, "--shard-size", "2",
            "--batch-size", "2", "--device", "cpu", "--num-workers", "0", *extra]


@pytest.fixture(scope="module")
def shards(src_vae, tmp_path_factory):
    """A finished precompute of the 12 images in shards of 5 (5, 5, 2)."""
    src, vae = src_vae
    out = str(tmp_path_factory.mktemp("shards") / "out")
    precompute.precompute(src, out, RES, vae, shard_size=5, batch_size=6, num_workers=0)
    return out


def stats(out, k):
    return [(os.stat(os.path.join(out, n)).st_ino, os.stat(os.path.join(out, n)).st_mtime_ns)
            for n in shard_names(k)]


def latents_cfg(out, vae, **kw):
    base = dict(name="latents", path=out, image_size=RES, num_classes=3, vae=vae, synthetic_count=64,
                channels=3)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.process
def test_resume_after_sigkill_and_exact_moments(src_vae, tmp_path):
    src, vae = src_vae
    out = str(tmp_path / "shards")
    env = dict(os.environ, PYTHONPATH=ROOT, **{precompute.PAUSE_ENV: "2"})
    proc = subprocess.Popen([sys.executable, "-m", "harness.data.precompute", *args(src, vae, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The hook holds the process inside shard 2 once shards 0 and 1 are finished: kill it there.
    marker = os.path.join(out, shard_names(1)[2])
    deadline = time.monotonic() + 300  # a failsafe only; the test does not depend on speed
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "precompute never finished a shard"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, META_FILE))
    assert not os.path.exists(os.path.join(out, shard_names(2)[2]))
    before = {k: stats(out, k) for k in (0, 1)}

    precompute.main(args(src, vae, out))  # resume, in-process
    assert {k: stats(out, k) for k in (0, 1)} == before  # finished shards kept, not rewritten
    ds = LatentShardDataset(out, vae=vae, resolution=RES)
    assert len(ds) == 12 and ds.num_classes == 3 and len(ds.meta["shards"]) == 6
    assert ds.meta["classes"] == ["c0", "c1", "c2"] and ds.latent_shape == (4, RES // 2, RES // 2)

    # The shards hold the posterior of a direct encode of the same images and of their mirror images.
    x, y = ImageFolderDataset(src, RES).get_batch(torch.arange(12))
    codec = VAECodec(vae)
    mean, std = codec.moments(x)
    mean_f, std_f = codec.moments(x.flip(-1))
    m, labels = ds.get_batch(torch.arange(12))
    assert torch.equal(labels, y)
    for got, want in ((m[:, 0, 0], mean), (m[:, 0, 1], std), (m[:, 1, 0], mean_f), (m[:, 1, 1], std_f)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(mean_f, mean.flip(-1), atol=1e-3)  # the mirror was really encoded again
    # A permuted batch reads the same items.
    perm = torch.tensor([11, 0, 5, 6, 5])
    assert torch.equal(ds.get_batch(perm)[0], m[perm])

    # A corrupted finished shard fails its checksum and is encoded again; the others stay untouched.
    path3 = os.path.join(out, shard_names(3)[0])
    good3 = np.load(path3)
    with open(path3, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x00\x80\x7f")
    kept = {k: stats(out, k) for k in (0, 1, 2, 4, 5)}
    precompute.main(args(src, vae, out))
    assert {k: stats(out, k) for k in (0, 1, 2, 4, 5)} == kept
    assert np.array_equal(np.load(path3), good3)


def test_augment_draws_flip_and_sample(src_vae, shards):
    _, vae = src_vae
    out = shards
    ds = build_dataset(latents_cfg(out, vae))
    m, _ = ds.get_batch(torch.arange(12).repeat(4))  # 48 samples
    z = ds.augment(m, torch.Generator().manual_seed(0))
    assert z.shape == (48, 4, RES // 2, RES // 2)
    assert torch.equal(z, ds.augment(m, torch.Generator().manual_seed(0)))
    # Each sample used the moments of one orientation; both orientations occur; the noise is N(0, 1).
    noise = [(z / LATENT_SCALE - m[:, f, 0]) / m[:, f, 1] for f in (0, 1)]
    # With std set to zero the output is exactly one of the two scaled means.
    m0 = m.clone()
    m0[:, :, 1] = 0
    z0 = ds.augment(m0, torch.Generator().manual_seed(0))
    used_flip = torch.tensor([torch.allclose(a, b * LATENT_SCALE) for a, b in zip(z0, m0[:, 1, 0])])
    used_orig = torch.tensor([torch.allclose(a, b * LATENT_SCALE) for a, b in zip(z0, m0[:, 0, 0])])
    assert (used_flip ^ used_orig).all() and used_flip.any() and used_orig.any()
    eps = torch.where(used_flip.view(-1, 1, 1, 1), noise[1], noise[0])
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05


def test_refuses_other_vae_or_resolution(src_vae, shards):
    src, vae = src_vae
    out = shards
    assert validate_data(latents_cfg(out, vae)) == []
    assert model_input_shape(latents_cfg(out, vae)) == (4, RES // 2)
    with pytest.raises(ValueError, match="encoded with VAE.*asks for 'stabilityai/sd-vae-ft-ema'"):
        LatentShardDataset(out, vae="stabilityai/sd-vae-ft-ema", resolution=RES)
    with pytest.raises(ValueError, match=f"resolution {RES} but the config asks for 64"):
        LatentShardDataset(out, vae=vae, resolution=64)
    probs = validate_data(latents_cfg(out, "stabilityai/sd-vae-ft-mse", image_size=64))
    assert len(probs) == 2 and "VAE" in probs[0] and "resolution" in probs[1]
    with pytest.raises(ValueError, match="bad data config.*resolution"):
        build_dataset(latents_cfg(out, vae, image_size=64))
    # Resuming into the same folder with other settings is refused, not mixed.
    with pytest.raises(ValueError, match="different precompute.*resolution"):
        precompute.precompute(src, out, 2 * RES, vae, shard_size=5, batch_size=6, num_workers=0)


def test_two_processes_split_the_shards(src_vae, tmp_path, monkeypatch):
    src, vae = src_vae
    out = str(tmp_path / "shards")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("RANK", raising=False)
    assert launch_env()[:2] == (1, 2)
    kw = dict(shard_size=4, batch_size=4, num_workers=0)
    assert precompute.precompute(src, out, RES, vae, **kw) is None  # rank 1 of 2: shard 1 only, no meta
    assert sorted(f for f in os.listdir(out) if f.endswith(".json")) == ["shard_00001.json"]
    meta = precompute.precompute(src, out, RES, vae, rank=0, world_size=2, **kw)  # last one writes meta
    assert meta["count"] == 12 and [s["count"] for s in meta["shards"]] == [4, 4, 4]
    assert LatentShardDataset(out, vae=vae, resolution=RES).describe()["count"] == 12


def test_the_held_out_images_become_the_latent_folders_val_split(src_vae, tmp_path):
    """--val-src writes OUT/val/, a shard folder of its own, which training finds as its held-out split; the fixed
    view a validation reads is the unflipped image's posterior mean plus std times noise from the given generator."""
    src, vae = src_vae
    out = tmp_path / "shards"
    precompute.main(args(src, vae, str(out), "--val-src", src))
    cfg = latents_cfg(str(out), vae, val_path=None)
    found, split = heldout_dataset(cfg)
    assert split == "val" and found.path == str(out / "val") and len(found) == 12
    x, _ = found.get_batch(torch.arange(3))
    fixed = found.fixed(x, torch.Generator().manual_seed(5))
    noise = torch.randn(fixed.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(fixed, (x[:, 0, 0] + x[:, 0, 1] * noise) * LATENT_SCALE)
    assert heldout_dataset(latents_cfg(str(out / "val"), vae, val_path=None)) is None  # no val/ inside val/
