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
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from harness.cell import load_cell_model, load_run_config, sampler_problems
from harness.core import cli, distributed
from harness.core.checkpoint import checkpoint_source
from harness.core.config import DDPM_SAMPLERS, LABEL_SAMPLINGS, SAMPLERS, EvalConfig
from harness.core.runfolder import atomic_open, atomic_write_bytes, atomic_write_json, read_json
from harness.data.codec import VAECodec, vae_geometry
from harness.data.datasets import to_uint8_rgb
from harness.diffusion import create_diffusion, create_flow, guided_model_fn
from harness.model import dit

log = logging.getLogger(__name__)

SAMPLE_SEED_STRIDE = 1_000_003  # sample i of seed s uses generator seed s * STRIDE + i
LABEL_STREAM = 0x5EED
# The eval settings that change the pixels of the samples (batch, shard and world size do not).
SAMPLE_KEYS = ("num_samples", "sampler", "sampling_steps", "cfg_scale", "cfg_channels", "label_sampling",
               "weights", "seed")
SETTINGS_FILE = "sampling.json"  # beside the shards: what made them, so other settings never mix in
RELEASED_URL = "https://dl.fbaipublicfiles.com/DiT/models/"  # DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt


def sample_seed(seed: int, index: int) -> int:
    """Return the generator seed of sample `index` (its noise; its label uses seed ^ LABEL_STREAM)."""
    return seed * SAMPLE_SEED_STRIDE + index


def check_settings(ecfg: Any, objective: str = "ddpm") -> None:
    """Raise ValueError naming the bad value and the allowed ones when a sampling setting is unusable for a
    model trained with `objective`."""
    if ecfg.sampler not in SAMPLERS:
        raise ValueError(f"sampler {ecfg.sampler!r} is not one of {list(SAMPLERS)}")
    problems = sampler_problems(objective, ecfg.sampler, ecfg.sampling_steps)
    if problems:
        raise ValueError(problems[0])
    if ecfg.label_sampling not in LABEL_SAMPLINGS:
        raise ValueError(f"label sampling {ecfg.label_sampling!r} is not one of {list(LABEL_SAMPLINGS)}")
    for key in ("num_samples", "batch_size", "shard_size"):
        if int(getattr(ecfg, key)) <= 0:
            raise ValueError(f"{key}={getattr(ecfg, key)} must be positive")
    if ecfg.cfg_scale < 1.0:
        raise ValueError(f"cfg_scale={ecfg.cfg_scale} must be >= 1 (1 means no guidance)")


def sample_labels(indices: torch.Tensor, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """Class label of each sample index: uniform at random per sample (the paper) or class-balanced."""
    if mode == "uniform":
        # the label has its own stream (seed ^ LABEL_STREAM), so it does not shift the sampler's noise
        gens = (torch.Generator().manual_seed(sample_seed(seed, int(i)) ^ LABEL_STREAM) for i in indices)
        labels = [int(torch.randint(num_classes, (1,), generator=g)) for g in gens]
        return torch.tensor(labels, dtype=torch.long)
    if mode == "balanced":
        return indices.long() % num_classes
    raise ValueError(f"label sampling {mode!r} is not one of ['uniform', 'balanced']")


def model_fn_for(model, cfg_scale: float, cfg_channels: int | None):
    """The function the sampler calls: plain, or classifier-free guided in one doubled batch."""
    if cfg_scale == 1.0:
        return lambda x, t, y: model(x, t, y)
    return guided_model_fn(model, cfg_scale, cfg_channels, model.null_label)


def sampling_loop(ecfg: Any, objective: str, device: torch.device):
    """Returns loop(model_fn, shape, model_kwargs, generators) -> latents of the configured sampler: the
    respaced DDPM / DDIM loops of the paper's diffusion, or a flow's ODE (Euler, Heun) / SDE sampler."""
    check_settings(ecfg, objective)
    if objective == "flow":
        flow = create_flow()

        def flow_loop(fn, shape, model_kwargs, generators):
            return flow.sample_loop(fn, shape, sampler=ecfg.sampler, num_steps=int(ecfg.sampling_steps),
                                    model_kwargs=model_kwargs, device=device, generators=generators)

        return flow_loop
    diffusion = create_diffusion(str(ecfg.sampling_steps)).to(device)
    loop = diffusion.p_sample_loop if ecfg.sampler == "ddpm" else diffusion.ddim_sample_loop

    def ddpm_loop(fn, shape, model_kwargs, generators):
        return loop(fn, shape, model_kwargs=model_kwargs, device=device, generators=generators)

    return ddpm_loop


@torch.no_grad()
def generate(model, codec, ecfg: Any, indices: torch.Tensor, shape: tuple[int, int, int],
             num_classes: int, device: torch.device, autocast=None, objective: str = "ddpm") -> np.ndarray:
    """Returns uint8 images (len(indices), H, W, 3) for these sample indices."""
    loop = sampling_loop(ecfg, objective, device)
    gens = [torch.Generator().manual_seed(sample_seed(ecfg.seed, int(i))) for i in indices]
    y = sample_labels(indices, num_classes, ecfg.label_sampling, ecfg.seed).to(device)
    fn = model_fn_for(model, ecfg.cfg_scale, ecfg.cfg_channels)
    ctx = autocast if autocast is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        z = loop(fn, (len(indices), *shape), {"y": y}, gens)
        x = codec.decode(z.float())
    return to_uint8_rgb(x.cpu())


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Return the [lo, hi) sample-index range of every shard."""
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


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.savez(f, **arrays)  # streamed to disk: 50K ImageNet samples are not copied into a buffer


def sampling_settings(ecfg: Any, shape: tuple[int, int, int], num_classes: int, source: dict | None) -> dict:
    """Return what decides the samples' pixels: the SAMPLE_KEYS, latent shape, classes and model source."""
    settings = {k: getattr(ecfg, k) for k in SAMPLE_KEYS}
    return {**settings, "shape": list(shape), "num_classes": int(num_classes), **(source or {})}


def _claim_folder(out_dir: Path, settings: dict) -> None:
    """Record the settings of out_dir's samples; refuse a folder holding samples made with other settings."""
    path = out_dir / SETTINGS_FILE
    old = read_json(path)
    if old is not None and old != settings:
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ValueError(
            f"{out_dir} holds samples made with other settings (differing: "
            + ", ".join(f"{k} {old.get(k)!r} there vs {settings.get(k)!r} now" for k in diff)
            + "); choose another output folder or delete that one"
        )
    if old is None:
        atomic_write_json(path, settings)


def sample_to_npz(model, codec, ecfg: Any, out_dir: str | Path, shape: tuple[int, int, int], num_classes: int,
                  env: distributed.DistEnv, autocast=None, source: dict | None = None,
                  objective: str = "ddpm") -> Path:
    """Write `out_dir/samples.npz` (arr_0: N x H x W x 3 uint8, labels) shard by shard; returns its path.

    Each process takes shards k = rank, rank + world, ...; finished shards are kept and skipped, so a killed
    run resumes where it stopped. `source` (e.g. the checkpoint path) is recorded with the settings in
    out_dir/sampling.json; a folder made with other settings or another source is refused.
    """
    check_settings(ecfg, objective)
    out_dir = Path(out_dir)
    final = out_dir / "samples.npz"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _claim_folder(out_dir, sampling_settings(ecfg, shape, num_classes, source))
    distributed.barrier()
    if final.exists():
        return final
    ranges = shard_ranges(ecfg.num_samples, ecfg.shard_size)
    mine = [k for k in range(len(ranges)) if k % env.world_size == env.rank]
    model.eval()
    no_bar = not env.is_main or bool(os.environ.get("HARNESS_NO_BAR"))
    for k in tqdm(mine, desc=f"sample r{env.rank}", unit="shard", disable=no_bar):
        lo, hi = ranges[k]
        if _read_shard(_shard_path(out_dir, k), lo, hi) is not None:
            log.info("shard %d [%d, %d) kept: already sampled", k, lo, hi)
            continue
        parts = []
        for a in range(lo, hi, ecfg.batch_size):
            idx = torch.arange(a, min(a + ecfg.batch_size, hi))
            parts.append(generate(model, codec, ecfg, idx, shape, num_classes, env.device, autocast, objective))
        arr = np.concatenate(parts)
        labels = sample_labels(torch.arange(lo, hi), num_classes, ecfg.label_sampling, ecfg.seed).numpy()
        _atomic_savez(_shard_path(out_dir, k), arr_0=arr, labels=labels, indices=np.arange(lo, hi))
        log.info("shard %d [%d, %d) sampled on rank %d", k, lo, hi, env.rank)
    distributed.barrier()
    if env.is_main:
        arrays, labels = None, np.empty(ecfg.num_samples, dtype=np.int64)
        for k, (lo, hi) in enumerate(ranges):
            arr = _read_shard(_shard_path(out_dir, k), lo, hi)
            if arr is None:
                raise RuntimeError(f"shard {k} of {out_dir} is missing or incomplete after sampling")
            if arrays is None:  # filled in place: no second copy of all samples
                arrays = np.empty((ecfg.num_samples, *arr.shape[1:]), dtype=arr.dtype)
            arrays[lo:hi] = arr
            with np.load(_shard_path(out_dir, k)) as f:
                labels[lo:hi] = f["labels"]
        _atomic_savez(final, arr_0=arrays, labels=labels)
        for k in range(len(ranges)):
            _shard_path(out_dir, k).unlink(missing_ok=True)
        for tmp in out_dir.glob(".shard_*.tmp"):  # torn writes of a killed run
            tmp.unlink(missing_ok=True)
        log.info("merged %d shards into %s", len(ranges), final)
    distributed.barrier()
    return final


def save_pngs(npz_path: str | Path, out_dir: str | Path, limit: int | None = None) -> int:
    """Write the first `limit` samples of an npz as out_dir/000000.png ...; return how many were written."""
    with np.load(npz_path) as f:
        arr = f["arr_0"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(arr) if limit is None else min(limit, len(arr))
    for i in range(n):
        Image.fromarray(arr[i]).save(out_dir / f"{i:06d}.png")
    return n


GRID_SAMPLES = 64  # the first samples of an evaluation drawn as its grid (labels and noise fixed by eval.seed)
GRID_PER_ROW = 8
GRID_MIN_PIXELS = 64  # small images are scaled up (nearest neighbour) to at least this many pixels a side


def save_grid(npz_path: str | Path, path: str | Path, n: int = GRID_SAMPLES, per_row: int = GRID_PER_ROW) -> Path:
    """Writes the first `n` samples of an npz as one PNG grid (`per_row` a row, 2-pixel gaps, small images scaled
    up by an integer factor) atomically; returns its path. Sample i of every cell of a sweep has the same label and
    initial noise (both drawn from (eval.seed, i)), so two cells' grids compare image by image."""
    with np.load(npz_path) as f:
        arr = f["arr_0"][:n]
    k, h, w, _ = arr.shape
    scale = max(1, -(-GRID_MIN_PIXELS // max(h, w)))
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    rows, gap = -(-k // per_row), 2
    ch, cw = arr.shape[1] + gap, arr.shape[2] + gap
    canvas = np.full((rows * ch + gap, min(k, per_row) * cw + gap, 3), 255, dtype=np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, per_row)
        canvas[gap + r * ch: gap + r * ch + img.shape[0], gap + c * cw: gap + c * cw + img.shape[1]] = img
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_released(path: str | Path, args: argparse.Namespace, device: torch.device):
    """Return (model with the checkpoint's weights, VAE codec, latent shape) for a released-style checkpoint.

    The latent geometry comes from the VAE (SD VAE: 4 channels, downsample 8; `tiny`: downsample 2).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; the released DiT checkpoints (DiT-XL-2-256x256.pt, "
            f"DiT-XL-2-512x512.pt) are at {RELEASED_URL}<name>: download one and pass its path to --ckpt"
        )
    channels, downsample = vae_geometry(args.vae)
    if args.image_size % downsample:
        raise ValueError(f"--image-size {args.image_size} is not divisible by the VAE's downsample factor "
                         f"{downsample} ({args.vae})")
    latent = args.image_size // downsample
    model = dit.build(args.model, args.patch, args.cond, input_size=latent, in_channels=channels,
                         num_classes=args.num_classes, depth=args.depth, hidden_size=args.hidden_size,
                         num_heads=args.num_heads)
    try:
        dit.load_checkpoint(str(path), model, key=args.weights)
    except ValueError as e:
        built = f"{args.model}/{args.patch} {args.cond}, input {channels}x{latent}x{latent}"
        raise ValueError(f"{path}: {e} (built {built}; check --model, --depth, --hidden-size, --num-heads, "
                         "--patch, --image-size, --vae, --num-classes)") from e
    return model.to(device).eval(), VAECodec(args.vae, device=device), (channels, latent, latent)


@cli.guard
def main(argv: list[str] | None = None) -> None:
    """`python -m harness.sample`: samples of a cell's checkpoint or of a released checkpoint, as an npz."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    p = cli.ArgumentParser(prog="python -m harness.sample", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a cell's run folder (its config.yaml decides the model)")
    p.add_argument("--step", type=int, help="checkpoint step of --run-dir")
    p.add_argument("--ckpt", help="a checkpoint file, e.g. the released DiT-XL-2-256x256.pt")
    p.add_argument("--model", default="XL", help=f"size for --ckpt: {list(dit.MODEL_SIZES)}, or any "
                   "off-paper name with --depth, --hidden-size and --num-heads")
    p.add_argument("--depth", type=int, default=None, help="override the size's depth (--ckpt)")
    p.add_argument("--hidden-size", type=int, default=None, help="override the size's width (--ckpt)")
    p.add_argument("--num-heads", type=int, default=None, help="override the size's heads (--ckpt)")
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--cond", default="adaln_zero")
    p.add_argument("--image-size", type=int, default=256, help="pixel resolution for --ckpt (256 or 512)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-mse",
                   help="decoder for --ckpt (the paper's FID used ft-MSE); a local folder; 'tiny' for tests")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS),
                   help=f"{list(DDPM_SAMPLERS)} for the paper's diffusion; euler, heun, sde for a flow cell")
    p.add_argument("--sampling-steps", default="250")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first N channels (3 reproduces the public code); default all")
    p.add_argument("--label-sampling", default="uniform", choices=list(LABEL_SAMPLINGS))
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", type=int, default=0, help="also write the first N samples as PNG files")
    p.add_argument("--out", help="output folder (default: <run-dir>/samples/step_N_manual, or "
                   "samples/<checkpoint name> for --ckpt)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a = p.parse_args(argv)
    if bool(a.run_dir) == bool(a.ckpt) or (a.run_dir and a.step is None):
        p.error("give --run-dir and --step, or --ckpt")
    at_least = {"--num-samples": 1, "--batch-size": 1, "--shard-size": 1, "--png": 0, "--seed": 0}
    if a.ckpt:
        at_least.update({"--image-size": 1, "--num-classes": 1, "--patch": 1})
    for flag, least in at_least.items():
        value = getattr(a, flag[2:].replace("-", "_"))
        if value < least:
            p.error(f"argument {flag}: {value}; allowed: an integer >= {least}")
    if a.cfg_scale < 1.0:
        p.error(f"argument --cfg-scale: {a.cfg_scale}; allowed: >= 1 (1 means no guidance)")
    if a.cfg_channels is not None and a.cfg_channels < 1:
        p.error(f"argument --cfg-channels: {a.cfg_channels}; allowed: a positive number of channels")
    if a.step is not None and a.step < 0:
        p.error(f"argument --step: {a.step}; allowed: a checkpoint step (>= 0)")
    if a.out is not None and Path(a.out).exists() and not Path(a.out).is_dir():
        p.error(f"argument --out: {a.out} is a file; allowed: a folder (created when missing)")

    ecfg = OmegaConf.structured(EvalConfig(
        num_samples=a.num_samples, batch_size=a.batch_size, shard_size=a.shard_size, sampler=a.sampler,
        sampling_steps=a.sampling_steps, cfg_scale=a.cfg_scale, cfg_channels=a.cfg_channels,
        label_sampling=a.label_sampling, weights=a.weights, seed=a.seed,
    ))
    if a.run_dir:
        run_dir = Path(a.run_dir)
        cfg = load_run_config(run_dir, [])
        objective = cfg.objective.name
        sampling_loop(ecfg, objective, torch.device("cpu"))  # every sampling setting checked before any loading
        env = distributed.init(a.device)
        model, codec, shape = load_cell_model(cfg, run_dir, a.step, a.weights, env.device)
        num_classes = cfg.data.num_classes
        source = checkpoint_source(run_dir / "checkpoints", a.step)
        out = Path(a.out or run_dir / "samples" / f"step_{a.step}_manual")
    else:
        objective = "ddpm"  # the released checkpoints are the paper's
        sampling_loop(ecfg, objective, torch.device("cpu"))
        env = distributed.init(a.device)
        model, codec, shape = load_released(a.ckpt, a, env.device)
        num_classes = a.num_classes
        source = {"checkpoint": str(Path(a.ckpt).resolve())}
        out = Path(a.out or Path("samples") / Path(a.ckpt).stem)
    path = sample_to_npz(model, codec, ecfg, out, shape, num_classes, env, source=source, objective=objective)
    if env.is_main:
        if a.png:
            save_pngs(path, out / "png", a.png)
        print(f"samples: {path}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
