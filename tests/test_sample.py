"""Sampling's contract: the same N images whatever the process count and batch size, resumable shards,
the paper's label and uint8 rules, guidance and DDIM options, and released-style checkpoints through a VAE."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_thread_env
from omegaconf import OmegaConf

from harness import sample
from harness.cell import build_model, config_hash, load_cell_model, load_run_config, prepare_run_dir
from harness.core import checkpoint, distributed
from harness.core.config import Config, EvalConfig
from harness.data.codec import IdentityCodec, VAECodec
from harness.data.datasets import to_uint8_rgb
from harness.model import dit

TINY_ARCH = dict(depth=1, hidden_size=32, num_heads=2)
STEP = 2
CPU = torch.device("cpu")


# in-process sampling on one thread too, so it matches the subprocesses bit for bit
pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Return model with small seeded noise on every weight: a fresh adaLN-Zero DiT outputs zeros, and
    samples that ignore the network would prove nothing about batching."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A digits run folder (8x8 pixels, patch 4) with a checkpoint at STEP written by checkpoint.save."""
    out = tmp_path_factory.mktemp("sample_runs")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "model": {"name": "demo-S", "off_paper": True, **TINY_ARCH}, "patch": 4,
        "data": {"name": "digits", "image_size": 8}, "train": {"steps": STEP}, "device": "cpu",
        "out_dir": str(out),
    })
    run = prepare_run_dir(cfg)
    torch.manual_seed(0)
    model, ema = _perturb(build_model(cfg), 1), _perturb(build_model(cfg), 2)
    checkpoint.save(run / "checkpoints", STEP, {
        "model": model.state_dict(), "ema": ema.state_dict(), "step": STEP, "images_seen": STEP * 16,
        "config": OmegaConf.to_container(cfg, resolve=True), "config_hash": config_hash(cfg),
    })
    return run


def _sample_args(run: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["--run-dir", str(run), "--step", str(STEP), "--num-samples", "14", "--shard-size", "4",
            "--batch-size", str(batch_size), "--sampling-steps", "10", "--cfg-scale", "2.0",
            "--device", "cpu", "--out", str(out), *extra]


def _free_port() -> int:
    """Return a TCP port free right now (other test sessions on this machine run torchrun too)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.process
def test_same_samples_for_one_or_two_processes_and_any_batch_size(run_dir, tmp_path):
    # 14 samples in shards of 4: four shards, the last one short, split unevenly over two ranks
    sample.main(_sample_args(run_dir, tmp_path / "b3", 3, "--png", "5"))
    sample.main(_sample_args(run_dir, tmp_path / "b8", 8))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={_free_port()}", "-m", "harness.sample",
                *_sample_args(run_dir, tmp_path / "ddp", 5)]
    r = subprocess.run(torchrun, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampled on rank 1" in r.stderr  # the second process really took shards

    outs = [np.load(tmp_path / name / "samples.npz") for name in ("b3", "b8", "ddp")]
    ref = outs[0]["arr_0"]
    assert ref.shape == (14, 8, 8, 3) and ref.dtype == np.uint8
    assert len(np.unique(ref.reshape(14, -1), axis=0)) == 14  # 14 different images, not one repeated
    for o in outs[1:]:
        # Not bitwise: batches of 3, 8 and 5 run the network on other shapes, and whether they round alike
        # depends on the CPU; a float difference of ~1e-6 can move a pixel across a rounding boundary of the
        # uint8 images. Wrong noise or labels would change every image wholesale.
        diff = np.abs(o["arr_0"].astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        assert np.array_equal(o["labels"], outs[0]["labels"])  # integers drawn per sample: exact
    assert sorted(p.name for p in (tmp_path / "b3" / "png").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert not list((tmp_path / "ddp").glob("shard_*"))  # shards are merged away


def _ecfg(**kw) -> OmegaConf:
    base = dict(num_samples=12, shard_size=4, batch_size=4, sampling_steps="10")
    return OmegaConf.structured(EvalConfig(**{**base, **kw}))


def _digits_model(run: Path, weights: str = "ema") -> torch.nn.Module:
    model, _, _ = load_cell_model(load_run_config(run, []), run, STEP, weights, CPU)
    return model


def test_finished_shards_are_kept_and_torn_ones_redone(run_dir, tmp_path, caplog):
    model, codec, env = _digits_model(run_dir), IdentityCodec(1), distributed.DistEnv()
    ref = np.load(sample.sample_to_npz(model, codec, _ecfg(), tmp_path / "ref", (1, 8, 8), 10, env))

    out = tmp_path / "resumed"
    out.mkdir()
    # shard 1 "finished" with a marker no sampler makes; shard 2 torn as by a kill mid-write
    marker = np.full((4, 8, 8, 3), 7, dtype=np.uint8)
    np.savez(out / "shard_00001.npz", arr_0=marker, labels=np.zeros(4, np.int64), indices=np.arange(4, 8))
    np.savez(out / "shard_00002.npz", arr_0=ref["arr_0"][8:12], labels=ref["labels"][8:12],
             indices=np.arange(8, 12))
    torn = (out / "shard_00002.npz").read_bytes()
    (out / "shard_00002.npz").write_bytes(torn[: len(torn) // 2])
    (out / ".shard_00000.npz.abc.tmp").write_bytes(b"left by a killed writer")

    with caplog.at_level(logging.INFO, logger="harness.sample"):
        got = np.load(sample.sample_to_npz(model, codec, _ecfg(), out, (1, 8, 8), 10, env))
    assert np.array_equal(got["arr_0"][4:8], marker)  # kept, not sampled again
    assert np.array_equal(got["arr_0"][:4], ref["arr_0"][:4])
    assert np.array_equal(got["arr_0"][8:], ref["arr_0"][8:])  # the torn shard was redone
    assert "shard 1 [4, 8) kept" in caplog.text and "shard 2 [8, 12) sampled" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "sampling.json"]


def test_folder_of_other_settings_is_refused_and_kept(run_dir, tmp_path):
    model, codec, env = _digits_model(run_dir), IdentityCodec(1), distributed.DistEnv()
    path = sample.sample_to_npz(model, codec, _ecfg(), tmp_path, (1, 8, 8), 10, env)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"other settings.*seed 0 there vs 1 now"):
        sample.sample_to_npz(model, codec, _ecfg(seed=1), tmp_path, (1, 8, 8), 10, env)
    # batch and shard size do not change the pixels: same folder accepted, result untouched
    assert sample.sample_to_npz(model, codec, _ecfg(batch_size=2), tmp_path, (1, 8, 8), 10, env) == path
    assert path.read_bytes() == before


def test_labels_uniform_per_sample_or_class_balanced():
    idx = torch.arange(1000)
    uniform = sample.sample_labels(idx, 10, "uniform", seed=0)
    # a sample's label depends on its index only, not on the batch it is drawn in
    assert torch.equal(sample.sample_labels(idx[537:600], 10, "uniform", 0), uniform[537:600])
    counts = torch.bincount(uniform, minlength=10)
    assert counts.min() > 50 and counts.max() < 150, counts  # Binomial(1000, 0.1): sd 9.5
    assert not torch.equal(sample.sample_labels(idx, 10, "uniform", seed=1), uniform)
    balanced = sample.sample_labels(idx, 10, "balanced", seed=0)
    assert torch.equal(torch.bincount(balanced, minlength=10), torch.full((10,), 100))
    with pytest.raises(ValueError, match=r"'stratified'.*\['uniform', 'balanced'\]"):
        sample.sample_labels(idx, 10, "stratified", seed=0)


def test_uint8_rule_is_clamp_127_5_x_plus_128():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 8)
    got = to_uint8_rgb(x)
    assert got.shape == (1, 1, 8, 3)
    assert got[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 255, 255, 255]  # truncation, as DiT's sample_ddp


def _latent_model(seed: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _perturb(dit.build("demo", 2, input_size=4, in_channels=4, num_classes=10, **TINY_ARCH), seed)


def test_sampler_and_guidance_options_change_samples_deterministically():
    model, idx = _latent_model(), torch.arange(6)

    def run(**kw):
        # 3 of the 4 latent channels as pixels, squeezed into [-1, 1] so uint8 does not saturate
        class ThreeChannels(IdentityCodec):
            def decode(self, z):
                return torch.tanh(z[:, :3] / z.std())

        return sample.generate(model, ThreeChannels(4), _ecfg(**kw), idx, (4, 4, 4), 10, CPU)

    base = run()
    variants = {"ddim": dict(sampler="ddim"), "cfg4": dict(cfg_scale=4.0),
                "cfg4_3ch": dict(cfg_scale=4.0, cfg_channels=3), "balanced": dict(label_sampling="balanced"),
                "seed1": dict(seed=1), "steps5": dict(sampling_steps="5")}
    outs = {k: run(**kw) for k, kw in variants.items()}
    for k, out in outs.items():
        assert not np.array_equal(out, base), f"{k} gave the default samples"
        assert np.array_equal(out, run(**variants[k])), f"{k} is not deterministic"
    assert not np.array_equal(outs["cfg4"], outs["cfg4_3ch"])  # guiding 3 of 4 channels differs
    assert not np.array_equal(outs["cfg4_3ch"][..., :3], base[..., :3])
    with pytest.raises(ValueError, match=r"'euler'.*\['ddpm', 'ddim'\]"):
        run(sampler="euler")
    with pytest.raises(ValueError, match="cfg_scale=0.5"):
        run(cfg_scale=0.5)


def _released_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--model", "demo", "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
            "--patch", "2", "--image-size", "8", "--vae", "tiny", "--num-classes", "10", "--num-samples", "4",
            "--batch-size", "4", "--shard-size", "4", "--sampling-steps", "5", "--device", "cpu",
            "--out", str(out), *extra]


def test_released_state_dict_samples_through_the_tiny_vae(tmp_path):
    model = _latent_model()
    ckpt = tmp_path / "DiT-demo-2-8x8.pt"
    torch.save(model.state_dict(), ckpt)  # bare EMA state dict, as DiT-XL-2-256x256.pt
    sample.main(_released_args(ckpt, tmp_path / "out", "--png", "2"))
    arr = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    # 4x4x4 latents decoded by the tiny VAE (downsample 2) into 8x8 RGB
    assert arr.shape == (4, 8, 8, 3) and arr.dtype == np.uint8 and arr.std() > 0
    assert len(list((tmp_path / "out" / "png").glob("*.png"))) == 2

    # the same latents decoded by hand give the same pixels: the CLI really decodes through the VAE
    ecfg = _ecfg(num_samples=4, sampling_steps="5")
    direct = sample.generate(model, VAECodec("tiny"), ecfg, torch.arange(4), (4, 4, 4), 10, CPU)
    assert np.array_equal(direct, arr)


def _one_line_exit(capsys, argv) -> str:
    """Runs sample.main(argv); asserts it exits 2 with one `error:` line on stderr and returns that line."""
    with pytest.raises(SystemExit) as exit_:
        sample.main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_released_checkpoint_bad_input_is_clear(tmp_path, capsys):
    line = _one_line_exit(capsys, _released_args(tmp_path / "no-such.pt", tmp_path / "a"))
    assert re.search(r"no-such\.pt does not exist.*dl\.fbaipublicfiles\.com/DiT", line)
    ckpt = tmp_path / "other.pt"
    torch.save(_latent_model().state_dict(), ckpt)
    line = _one_line_exit(capsys, _released_args(ckpt, tmp_path / "b", "--hidden-size", "64"))
    assert re.search(r"does not match the model architecture.*shape mismatch", line)
    assert "--step" in _one_line_exit(capsys, ["--run-dir", str(tmp_path)])  # --run-dir without --step
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
