"""Deterministic, sharded, resumable sampling from a checkpoint (EMA weights by default).

Sample i is a pure function of (seed, i): its label and every noise draw of the sampler come from a
generator seeded by the pair. So the same N images come out whatever the number of processes and the
batch size, and a killed run resumes shard by shard without changing a pixel.

    python -m harness.sample --run-dir outputs/demo/DiT-demo-S-2_... --step 300 --num-samples 500
    python -m harness.sample --ckpt DiT-XL-2-256x256.pt --model XL --patch 2 --image-size 256 \\
        --num-samples 50000 --cfg-scale 1.5 --out samples/xl2
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness import distributed
from harness.metrics import to_uint8_rgb
from harness.runfolder import atomic_write_bytes

log = logging.getLogger(__name__)

SAMPLE_SEED_STRIDE = 1_000_003  # sample i of seed s uses generator seed s * STRIDE + i
LABEL_STREAM = 0x5EED


def sample_seed(seed: int, index: int) -> int:
    return seed * SAMPLE_SEED_STRIDE + index


def sample_labels(indices: torch.Tensor, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Class label of each sample index: uniform at random per sample (the paper) or class-balanced."""
    if mode == "uniform":
        # the label has its own stream (seed ^ LABEL_STREAM), so it does not shift the sampler's noise
        gens = (torch.Generator().manual_seed(sample_seed(seed, int(i)) ^ LABEL_STREAM) for i in indices)
        return torch.tensor([int(torch.randint(num_classes, (1,), generator=g)) for g in gens], dtype=torch.long)
    if mode == "balanced":
        return indices.long() % num_classes
    raise ValueError(f"label sampling {mode!r} is not one of ['uniform', 'balanced']")


def model_fn_for(model, cfg_scale: float, cfg_channels: int | None):
    """The function the sampler calls: plain, or classifier-free guided in one doubled batch."""
    if cfg_scale == 1.0:
        return lambda x, t, y: model(x, t, y)
    from harness.diffusion import guided_model_fn

    return guided_model_fn(model, cfg_scale, cfg_channels, model.null_label)


@torch.no_grad()
def generate(model, codec, ecfg: Any, indices: torch.Tensor, shape: tuple[int, int, int],
             num_classes: int, device: torch.device, autocast=None) -> np.ndarray:
    """uint8 images (len(indices), H, W, 3) for these sample indices."""
    from harness.diffusion import create_diffusion

    diffusion = create_diffusion(str(ecfg.sampling_steps))
    gens = [torch.Generator().manual_seed(sample_seed(ecfg.seed, int(i))) for i in indices]
    y = sample_labels(indices, num_classes, ecfg.label_sampling, ecfg.seed).to(device)
    fn = model_fn_for(model, ecfg.cfg_scale, ecfg.cfg_channels)
    loop = diffusion.p_sample_loop if ecfg.sampler == "ddpm" else diffusion.ddim_sample_loop
    ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        z = loop(fn, (len(indices), *shape), model_kwargs={"y": y}, device=device, generators=gens)
        x = codec.decode(z.float())
    return to_uint8_rgb(x.cpu())


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_size, num_samples)) for a in range(0, num_samples, shard_size)]


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"shard_{k:05d}.npz"


def _read_shard(path: Path, lo: int, hi: int) -> np.ndarray | None:
    """The shard's images when it is complete and covers exactly [lo, hi), else None."""
    try:
        with np.load(path) as f:
            idx, arr = f["indices"], f["arr_0"]
    except Exception:  # noqa: BLE001 - missing or torn: redo it
        return None
    if len(idx) != hi - lo or idx[0] != lo or idx[-1] != hi - 1:
        return None
    return arr


def sample_to_npz(model, codec, ecfg: Any, out_dir: str | Path, shape: tuple[int, int, int], num_classes: int,
                  env: distributed.DistEnv, autocast=None) -> Path:
    """Write `out_dir/samples.npz` (arr_0: N x H x W x 3 uint8, labels) shard by shard; returns its path.

    Each process takes shards k = rank, rank + world, ...; finished shards are kept and skipped.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    final = out_dir / "samples.npz"
    if final.exists():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(ecfg.num_samples, ecfg.shard_size)
    mine = [k for k in range(len(ranges)) if k % env.world_size == env.rank]
    model.eval()
    for k in tqdm(mine, desc=f"sample r{env.rank}", unit="shard", disable=not env.is_main):
        lo, hi = ranges[k]
        if _read_shard(_shard_path(out_dir, k), lo, hi) is not None:
            continue
        parts = []
        for a in range(lo, hi, ecfg.batch_size):
            idx = torch.arange(a, min(a + ecfg.batch_size, hi))
            parts.append(generate(model, codec, ecfg, idx, shape, num_classes, env.device, autocast))
        arr = np.concatenate(parts)
        buf = io.BytesIO()
        labels = sample_labels(torch.arange(lo, hi), num_classes, ecfg.label_sampling, ecfg.seed).numpy()
        np.savez(buf, arr_0=arr, labels=labels, indices=np.arange(lo, hi))
        atomic_write_bytes(_shard_path(out_dir, k), buf.getvalue())
    distributed.barrier()
    if env.is_main:
        arrays, labels = [], []
        for k, (lo, hi) in enumerate(ranges):
            arr = _read_shard(_shard_path(out_dir, k), lo, hi)
            if arr is None:
                raise RuntimeError(f"shard {k} of {out_dir} is missing or incomplete after sampling")
            arrays.append(arr)
            labels.append(np.load(_shard_path(out_dir, k))["labels"])
        buf = io.BytesIO()
        np.savez(buf, arr_0=np.concatenate(arrays), labels=np.concatenate(labels))
        atomic_write_bytes(final, buf.getvalue())
        for k in range(len(ranges)):
            _shard_path(out_dir, k).unlink(missing_ok=True)
    distributed.barrier()
    return final


def save_pngs(npz_path: str | Path, out_dir: str | Path, limit: int | None = None) -> int:
    from PIL import Image

    arr = np.load(npz_path)["arr_0"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(arr) if limit is None else min(limit, len(arr))
    for i in range(n):
        Image.fromarray(arr[i]).save(out_dir / f"{i:06d}.png")
    return n


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    from harness import models
    from harness.config import EvalConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a cell's run folder (its config.yaml decides the model)")
    p.add_argument("--step", type=int, help="checkpoint step of --run-dir")
    p.add_argument("--ckpt", help="a checkpoint file, e.g. the released DiT-XL-2-256x256.pt")
    p.add_argument("--model", default="XL", help=f"size for --ckpt: {list(models.MODEL_SIZES)}")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--cond", default="adaln_zero")
    p.add_argument("--image-size", type=int, default=256, help="pixel resolution for --ckpt (256 or 512)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                   help="decoder for --ckpt (the paper's FID used ft-MSE)")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--sampling-steps", default="250")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-channels", type=int, default=None)
    p.add_argument("--label-sampling", default="uniform", choices=["uniform", "balanced"])
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", type=int, default=0, help="also write the first N samples as PNG files")
    p.add_argument("--out", help="output folder (default: <run-dir>/samples/step_N_manual)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    ecfg = OmegaConf.structured(EvalConfig(
        num_samples=a.num_samples, batch_size=a.batch_size, shard_size=a.shard_size, sampler=a.sampler,
        sampling_steps=a.sampling_steps, cfg_scale=a.cfg_scale, cfg_channels=a.cfg_channels,
        label_sampling=a.label_sampling, weights=a.weights, seed=a.seed,
    ))
    env = distributed.init(a.device)
    if a.run_dir:
        from harness.evaluate import load_cell_model

        cfg = OmegaConf.load(Path(a.run_dir) / "config.yaml")
        model, codec, shape = load_cell_model(cfg, Path(a.run_dir), a.step, a.weights, env.device)
        num_classes = cfg.data.num_classes
        out = Path(a.out or Path(a.run_dir) / "samples" / f"step_{a.step}_manual")
    elif a.ckpt:
        from harness.autoencoder import VAECodec

        latent = a.image_size // 8
        model = models.build(a.model, a.patch, a.cond, input_size=latent, in_channels=4, num_classes=a.num_classes)
        models.load_checkpoint(a.ckpt, model, key=a.weights)
        model.to(env.device)
        codec = VAECodec(a.vae, device=env.device)
        shape, num_classes = (4, latent, latent), a.num_classes
        out = Path(a.out or "samples")
    else:
        p.error("give --run-dir and --step, or --ckpt")
    path = sample_to_npz(model, codec, ecfg, out, shape, num_classes, env)
    if env.is_main:
        if a.png:
            save_pngs(path, out / "png", a.png)
        print(f"samples: {path}")


if __name__ == "__main__":
    main()
