"""The codec between pixels and what the DiT sees: identity for pixel space, the SD VAE for latent space.

DiT trains on Stable Diffusion VAE latents (paper section 4): a 256x256x3 image becomes a 4x32x32 latent,
scaled by LATENT_SCALE so it has roughly unit variance. Everything here talks in pixels in [-1, 1].
"""

import json
import os
import re
import warnings
from typing import Protocol

import torch
from torch import Tensor

from harness.core.cli import MissingWeights

# The one home of the SD VAE latent scale (latent = sample * 0.18215, decode with z / 0.18215).
LATENT_SCALE = 0.18215

# The VAE the paper trained with, and its decoder-only fine-tune used for FID. Both fine-tuned only the
# decoder of the original kl-f8 autoencoder, so their encoders (and latents) are identical.
SD_VAE_IDS = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
DEFAULT_VAE = SD_VAE_IDS[0]
SD_VAE_GEOMETRY = (4, 8)  # (latent channels, downsample factor) of the SD VAE

# A tiny randomly initialised AutoencoderKL, for tests and the CPU demo of the latent path. Downsample 2.
TINY_VAE = "tiny"
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Codec(Protocol):
    """Maps pixels in [-1, 1] (N, 3, H, W) to what the model sees and back."""

    channels: int
    downsample: int

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...


class IdentityCodec:
    """Pixel space (digits) or data that is already latent (synthetic): encode and decode return the input."""

    def __init__(self, channels: int):
        self.channels = channels
        self.downsample = 1

    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Returns x unchanged."""
        return x

    def decode(self, z: Tensor) -> Tensor:
        """Returns z unchanged."""
        return z


def _is_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith(("/", ".", "~")) or not _HUB_ID.match(source)


def _offline_message(source: str) -> str:
    name = source.split("/")[-1]
    return (
        f"VAE {source!r} is not in the local Hugging Face cache and could not be downloaded (offline?). "
        f"On a machine with network access run:\n"
        f"  huggingface-cli download {source} --local-dir /path/to/{name}\n"
        f"copy the folder here, and pass the folder path instead of the id (data.vae=/path/to/{name} "
        f"or --vae /path/to/{name})."
    )


def tiny_vae(seed: int = 0):
    """Returns a tiny AutoencoderKL (4 latent channels, downsample 2) with weights fixed by `seed`."""
    from diffusers import AutoencoderKL  # imported where used (here and below): seconds, and pixel data never needs it

    # fork_rng: building the tiny VAE must not move the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
    return vae.eval()


def load_vae(source: str):
    """Returns an AutoencoderKL (eval mode) from a hub id, a local folder or TINY_VAE; clear error offline."""
    from diffusers import AutoencoderKL  # seconds to import; only the image-space data sets need a VAE

    def from_pretrained(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return AutoencoderKL.from_pretrained(*args, low_cpu_mem_usage=False, **kwargs).eval()

    if source == TINY_VAE:
        return tiny_vae()
    if _is_local(source):
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise ValueError(
                f"VAE folder {source!r} does not exist. Pass a hub id ({', '.join(SD_VAE_IDS)}), "
                f"{TINY_VAE!r}, or a folder holding config.json and the weights."
            )
        # A whole Stable Diffusion pipeline folder keeps its VAE in vae/.
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
        return from_pretrained(path, subfolder=sub)
    # Cache first: no network, no retries. Only then try a download.
    try:
        return from_pretrained(source, local_files_only=True)
    except OSError:
        pass
    from huggingface_hub import constants  # comes with diffusers, imported as late as it

    if constants.HF_HUB_OFFLINE:
        raise MissingWeights(_offline_message(source) + "\n(HF_HUB_OFFLINE is set.)")
    try:
        return from_pretrained(source)
    except OSError as e:
        raise MissingWeights(_offline_message(source)) from e


def vae_geometry(source: str) -> tuple[int, int]:
    """Returns (latent channels, downsample factor) of a VAE without loading its weights."""
    if source in SD_VAE_IDS:
        return SD_VAE_GEOMETRY
    if source == TINY_VAE:
        config = TINY_VAE_CONFIG
    elif _is_local(source):
        path = os.path.expanduser(source)
        for cfg_path in (os.path.join(path, "config.json"), os.path.join(path, "vae", "config.json")):
            if os.path.isfile(cfg_path):
                with open(cfg_path) as f:
                    config = json.load(f)
                break
        else:
            raise ValueError(f"VAE folder {source!r} has no config.json (nor vae/config.json)")
    else:
        from diffusers import AutoencoderKL  # as in load_vae

        try:
            config = AutoencoderKL.load_config(source, local_files_only=True)
        except OSError as e:
            raise MissingWeights(_offline_message(source)) from e
    # Each encoder block but the last halves the resolution.
    return int(config["latent_channels"]), 2 ** (len(config["block_out_channels"]) - 1)


def encoder_id(source: str) -> str:
    """Returns a name for the VAE's encoder: two sources with the same name give the same latents."""
    if source in SD_VAE_IDS:
        return "sd-vae-kl-f8-encoder"  # -ema and -mse share the encoder (decoder-only fine-tunes)
    if source != TINY_VAE and _is_local(source):
        return os.path.realpath(os.path.expanduser(source))
    return source


class VAECodec:
    """SD-VAE latent space: encode draws (or takes the mean of) the posterior and scales by LATENT_SCALE."""

    def __init__(self, source, device="cpu", dtype=torch.float32):
        # source: hub id, local folder, TINY_VAE, or an AutoencoderKL instance (tests).
        vae = load_vae(source) if isinstance(source, str) else source.eval()
        self.source = source if isinstance(source, str) else "<instance>"
        vae = vae.to(device)
        if vae.dtype != dtype:  # only when asked: diffusers warns on any dtype cast after from_pretrained
            vae = vae.to(dtype)
        self.vae = vae.requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the unscaled posterior (mean, std), each (N, C, H/ds, W/ds) float32, of pixels x."""
        dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Returns scaled latents: mean + std * noise drawn from `generator`, or the mean when it is None."""
        mean, std = self.moments(x)
        if generator is None:
            return mean * LATENT_SCALE
        # Noise on the generator's device (CPU generators give reproducible draws on any accelerator).
        noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        return (mean + std * noise) * LATENT_SCALE

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Returns pixels (N, 3, H, W) float32, nominally in [-1, 1], from scaled latents."""
        return self.vae.decode(z.to(self.device, self.dtype) / LATENT_SCALE).sample.float()
