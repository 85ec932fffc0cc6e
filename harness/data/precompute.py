"""Encode an image folder into SD-VAE latent shards once, so training never runs the VAE.

    python -m harness.data.precompute --src IMAGENET/train --out SHARDS --resolution 256 \
        --vae stabilityai/sd-vae-ft-ema [--val-src IMAGENET/val] [--shard-size 1024] [--batch-size 32] [--device cuda]

--val-src encodes the held-out images (ImageNet's validation set) into SHARDS/val/, a shard folder of its own,
which training finds as the held-out split its validation loss is measured on (harness.heldout).

Each shard keeps the posterior mean and std of every image and of its mirror image (see data.MOMENTS_LAYOUT),
so training still draws a fresh latent sample and a random flip every step, as the paper did.
Under torchrun or srun each process (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) takes shards
rank, rank + world, ... Resumable: a shard is finished when its marker (shard_NNNNN.json) exists and the
checksums in it match the files; finished shards are skipped, anything else is encoded again.
meta.json is written last, by whichever process sees every shard finished.
"""

import json
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from harness.core import cli
from harness.core.distributed import launch_env
from harness.core.runfolder import atomic_open, atomic_write_bytes, file_sha256
from harness.data.codec import VAECodec, encoder_id
from harness.data.datasets import (
    HELDOUT_LATENT_DIR,
    META_FILE,
    MOMENTS_LAYOUT,
    SHARD_FORMAT,
    ImageFolderDataset,
    shard_names,
)

STORE_DTYPES = ("float32", "float16")
# Test hook: after this many shards are written, stop inside the next one and wait to be killed, so a test
# can SIGKILL the process at a known point instead of racing it.
PAUSE_ENV = "HARNESS_PRECOMPUTE_PAUSE_AFTER_SHARDS"


def _write_json(path: str, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _save_npy(path: str, array: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.save(f, array)


def _finished(out: str, k: int, settings: dict) -> dict | None:
    """Returns shard k's marker if the shard is finished with these settings and its checksums hold."""
    moments_name, labels_name, marker_name = shard_names(k)
    marker_path = os.path.join(out, marker_name)
    if not os.path.isfile(marker_path):
        return None
    with open(marker_path) as f:
        marker = json.load(f)
    if marker["settings"] != settings:
        diff = sorted(key for key in settings if marker["settings"].get(key) != settings[key])
        raise ValueError(
            f"{out!r} holds shards from a different precompute (differs in: {', '.join(diff)}); "
            f"use another --out folder or delete this one"
        )
    for name, key in ((moments_name, "sha256"), (labels_name, "labels_sha256")):
        path = os.path.join(out, name)
        if not os.path.isfile(path) or file_sha256(path) != marker[key]:
            return None
    return marker


@torch.no_grad()
def _encode_shard(codec, ds, start: int, stop: int, batch_size: int, num_workers: int, dtype, pbar, pause):
    """Returns (moments (n, 2, 2, C, h, w), labels (n,) int64) of images start..stop-1."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, range(start, stop)), batch_size=batch_size, num_workers=num_workers,
    )
    moments, labels = [], []
    for x, y in loader:
        mean, std = codec.moments(x)
        mean_f, std_f = codec.moments(x.flip(-1))  # the mirror image's own posterior, not a mirrored one
        moments.append(torch.stack([torch.stack([mean, std], 1), torch.stack([mean_f, std_f], 1)], 1).cpu())
        labels.append(y)
        pbar.update(len(y))
        while pause:  # test hook, see PAUSE_ENV
            time.sleep(1)
    return torch.cat(moments).numpy().astype(dtype), torch.cat(labels).numpy().astype(np.int64)


def precompute(src: str, out: str, resolution: int, vae: str, shard_size: int = 1024, batch_size: int = 32,
               device: str = "cpu", store_dtype: str = "float32", num_workers: int = 4,
               rank: int | None = None, world_size: int | None = None) -> dict | None:
    """Encodes this process's shards; returns meta.json's content if every shard is finished, else None."""
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"unknown store dtype {store_dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard size and batch size must be positive, got {shard_size}, {batch_size}")
    if rank is None or world_size is None:
        rank, world_size, _ = launch_env()
    ds = ImageFolderDataset(src, resolution)  # ValueError on a missing or empty folder
    codec = VAECodec(vae, device=device)
    if resolution % codec.downsample:
        raise ValueError(f"resolution {resolution} is not a multiple of VAE downsample {codec.downsample}")
    h = resolution // codec.downsample
    # Everything that changes the bytes of a shard; a resumed run must agree on all of it.
    settings = dict(
        format=SHARD_FORMAT, vae=vae, encoder=encoder_id(vae), resolution=resolution,
        latent_shape=[codec.channels, h, h], dtype=store_dtype, layout=MOMENTS_LAYOUT, shard_size=shard_size,
        count=len(ds), num_classes=ds.num_classes, classes=ds.classes,
        file_list_sha256=ds.file_list_sha256(),
    )
    os.makedirs(out, exist_ok=True)
    num_shards = math.ceil(len(ds) / shard_size)
    mine = list(range(rank, num_shards, world_size))
    todo = [k for k in mine if _finished(out, k, settings) is None]
    count = lambda k: min(shard_size, len(ds) - k * shard_size)  # noqa: E731
    pause_after = int(os.environ.get(PAUSE_ENV, "-1"))

    pbar = tqdm(total=sum(count(k) for k in mine), initial=sum(count(k) for k in mine if k not in todo),
                desc=f"latents rank {rank}/{world_size}", unit="img", dynamic_ncols=True)
    for written, k in enumerate(todo):
        start = k * shard_size
        moments, labels = _encode_shard(codec, ds, start, start + count(k), batch_size, num_workers,
                                        store_dtype, pbar, pause=written == pause_after)
        moments_name, labels_name, marker_name = shard_names(k)
        _save_npy(os.path.join(out, moments_name), moments)
        _save_npy(os.path.join(out, labels_name), labels)
        # The marker goes last: it is what makes the shard count as finished.
        _write_json(os.path.join(out, marker_name), dict(
            settings=settings, shard=k, start=start, count=len(labels),
            sha256=file_sha256(os.path.join(out, moments_name)),
            labels_sha256=file_sha256(os.path.join(out, labels_name)),
        ))
    pbar.close()

    # Every process writes its marker before it looks, so the last one to finish sees them all.
    markers = []
    for k in range(num_shards):
        marker_path = os.path.join(out, shard_names(k)[2])
        if not os.path.isfile(marker_path):
            return None
        with open(marker_path) as f:
            markers.append(json.load(f))
    meta = dict(settings, source=os.path.abspath(src), shards=[
        dict(file=shard_names(m["shard"])[0], labels_file=shard_names(m["shard"])[1], count=m["count"],
             sha256=m["sha256"], labels_sha256=m["labels_sha256"]) for m in markers
    ])
    _write_json(os.path.join(out, META_FILE), meta)
    return meta


@cli.guard
def main(argv=None) -> None:
    """`python -m harness.data.precompute --src IMAGES --out SHARDS`: bad input is one line, exit 2."""
    p = cli.ArgumentParser(prog="python -m harness.data.precompute", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True, help="image folder: SRC/<class>/<image>")
    p.add_argument("--out", required=True, help="shard folder (created; resumable)")
    p.add_argument("--val-src", default=None, help="held-out image folder (ImageNet's val/): written to OUT/val/")
    p.add_argument("--resolution", type=int, default=256, help="pixels; ADM centre crop")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id or local folder")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=STORE_DTYPES, help="float16 halves disk")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    args = p.parse_args(argv)
    for flag, value, least in (("--resolution", args.resolution, 1), ("--shard-size", args.shard_size, 1),
                               ("--batch-size", args.batch_size, 1), ("--num-workers", args.num_workers, 0)):
        if value < least:
            p.error(f"argument {flag}: {value}; allowed: an integer >= {least}")
    if not os.path.isdir(args.src):
        p.error(f"argument --src: {args.src} is not a folder; allowed: an image folder SRC/<class>/<image>")
    if args.val_src is not None and not os.path.isdir(args.val_src):
        p.error(f"argument --val-src: {args.val_src} is not a folder; allowed: an image folder VAL/<class>/<image>")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"argument --out: {args.out} is a file; allowed: a folder (created when missing)")
    sets = [(args.src, args.out)]
    if args.val_src is not None:
        sets.append((args.val_src, os.path.join(args.out, HELDOUT_LATENT_DIR)))
    for src, out in sets:
        meta = precompute(src, out, args.resolution, args.vae, shard_size=args.shard_size,
                          batch_size=args.batch_size, device=args.device, store_dtype=args.dtype,
                          num_workers=args.num_workers)
        if meta is not None:
            print(f"{meta['count']} images in {len(meta['shards'])} shards: {os.path.join(out, META_FILE)}")
        else:
            print(f"{out}: this process is done; meta.json is written by the last process to finish")


if __name__ == "__main__":
    main()
