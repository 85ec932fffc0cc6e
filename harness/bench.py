"""Throughput of the harness's hot paths: training step, sampling, latent loader, feature extraction.

Every setting of one run is timed in the same process, interleaved round by round on the CPU, so the
ratios to the plain fp32 eager baseline hold on a noisy machine; each figure is the median of `repeats`
timed chunks of `steps` steps after `warmup` untimed ones. Utilisation (MFU) is the model's real FLOPs
(2 per multiply-add of harness.flops, x3 for forward + backward; gradient-checkpoint recompute and the
VAE not counted) over the dense peak of the device for the setting's precision: a table for known GPUs,
a measured matmul for the CPU or an unknown device.

    python -m harness.bench train --model S --patch 8 --batch 32 [--settings fp32_eager,bf16] [--json]
    python -m harness.bench train --model XL --patch 2 --batch 128 --record   # -> conf/throughput.yaml
    python -m harness.bench sample --model S --patch 8 --batch 8 --sampling-steps 10
    python -m harness.bench loader --batch 256 --threads 1,2
    python -m harness.bench features
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

THROUGHPUT_FILE = Path(__file__).resolve().parents[1] / "conf" / "throughput.yaml"

# Dense (no sparsity) peak TFLOP/s of one GPU, from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() by `device_peak`, most specific name first.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

# bf16 keeps 8 significant bits (relative rounding 2^-9); a deep net under autocast accumulates a few
# of those per layer. Loss and output of bf16 autocast must agree with fp32 to within these.
BF16_LOSS_RTOL = 0.02
BF16_OUTPUT_RTOL = 0.05
# Zero-initialised layers (adaLN-Zero, final linear) make a fresh DiT output exactly zero, which would
# make the bf16 output check vacuous: they are refilled with N(0, this^2) for the check.
PERTURB_STD = 0.02

# Issue 3: the latent loader must never starve a GPU; this is the rate it must reach on this CPU.
LOADER_TARGET_IMAGES_PER_S = 20_000
# Sampling reference: the grid's FID-50K (DIT_FACTS.md, Evaluation).
FID_NUM_SAMPLES = 50_000
FID_SAMPLING_STEPS = 250
CFG_SCALE = 1.5  # the paper's best FID-50K guidance scale

# The SD VAE's architecture (stabilityai/sd-vae-ft-ema config.json), built with random weights to time
# encode/decode where the weights cannot be downloaded: cost does not depend on the weight values.
SD_VAE_ARCH = dict(
    in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), sample_size=256,
)
VAES = ("none", "tiny", "sd-arch")


# ---------------------------------------------------------------------------------------------------------
# The device: name, peak, timing


def resolve_device(name: str = "auto") -> torch.device:
    """Returns the torch device for 'auto' (CUDA when present), 'cpu' or 'cuda'; ValueError otherwise."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={name!r}; allowed: auto, cpu, cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """Returns the GPU's name, or the CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def peak_table_entry(name: str) -> str | None:
    """Returns the PEAK_TFLOPS key for a CUDA device name, or None for a device not in the table."""
    if "H200" in name:
        return "H200"
    if "H100" in name:
        if "PCIe" in name:
            return "H100 PCIe"
        return None if "NVL" in name else "H100 SXM"  # the SXM part reports e.g. "H100 80GB HBM3"
    return "A100" if "A100" in name else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                           repeats: int = 8) -> float:
    """Returns the best TFLOP/s of an n x n matmul (2 n^3 FLOPs) in `dtype`: a measured peak."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm up (kernel selection, thread pool)
    best_s = math.inf
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best_s = min(best_s, time.perf_counter() - t0)
    return 2 * n**3 / best_s / 1e12


def device_peak(device: torch.device) -> dict:
    """Returns {"name", "source", "tflops": {"bf16", "tf32", "fp32"}}: the table's dense peaks or measured."""
    name = device_name(device)
    key = peak_table_entry(name) if device.type == "cuda" else None
    if key is not None:
        return {"name": name, "type": device.type, "source": f"data sheet ({key}, dense)",
                "tflops": dict(PEAK_TFLOPS[key])}
    tf32_before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = measured_matmul_tflops(device, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = measured_matmul_tflops(device, torch.float32) if device.type == "cuda" else fp32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_before
    bf16 = measured_matmul_tflops(device, torch.bfloat16)
    return {"name": name, "type": device.type, "source": "measured matmul",
            "tflops": {"bf16": bf16, "tf32": tf32, "fp32": fp32}}


def environment(argv: list[str] | None = None) -> dict:
    """Returns what a benchmark figure needs beside it: machine, versions, load, date, command."""
    return {
        "cpu_model": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": str(torch.__version__),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m harness.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def _time_chunks(runners: dict, steps: int, repeats: int, warmup: int, interleave: bool,
                 on_done=None) -> dict:
    """Returns {name: [seconds of each timed chunk of `steps` calls]}; runners map name -> factory.

    A factory returns (step_fn, close_fn). Interleaved: every runner is built first and the chunks go
    round-robin, so load changes hit every setting alike. Sequential: one runner at a time, freed after.
    """
    times: dict = {name: [] for name in runners}

    def chunk(step_fn, device):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step_fn()
        sync(device)
        return time.perf_counter() - t0

    if interleave:
        built = {name: make() for name, make in runners.items()}
        for step_fn, _, device in built.values():
            for _ in range(warmup):
                step_fn()
            sync(device)
        for _ in range(repeats):
            for name, (step_fn, _, device) in built.items():
                times[name].append(chunk(step_fn, device))
        for name, (_, close, _) in built.items():
            close()
            if on_done:
                on_done(name, times[name])
        return times
    for name, make in runners.items():
        try:
            step_fn, close, device = make()
            for _ in range(warmup):
                step_fn()
            times[name] = [chunk(step_fn, device) for _ in range(repeats)]
            close()
        except torch.OutOfMemoryError as e:  # a setting too big for the card is a result, not a crash
            step_fn = close = None
            gc.collect()
            torch.cuda.empty_cache()
            times[name] = f"out of memory: {str(e).splitlines()[0][:200]}"
        if on_done:
            on_done(name, times[name])
    return times


def _peak_mem_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------------------
# The cell


@dataclass
class Cell:
    """What is benchmarked: a DiT size (S..XL, or an off-paper one with depth/width/heads), patch, cond."""

    model: str = "S"
    patch: int = 8
    cond: str = "adaln_zero"
    input_size: int = 32  # latent side (32: ImageNet 256 through the SD VAE)
    in_channels: int = 4
    num_classes: int = 1000
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None

    def arch(self) -> dict:
        return dict(input_size=self.input_size, in_channels=self.in_channels, num_classes=self.num_classes,
                    depth=self.depth, hidden_size=self.hidden_size, num_heads=self.num_heads)

    def build(self, grad_checkpoint: bool = False, device: torch.device | None = None) -> torch.nn.Module:
        """Returns the DiT (fp32) on `device`, weights fixed by a seed so every setting starts alike.

        Built on the device itself: initialising XL/2 on the CPU takes seconds, a GPU's budget is short.
        """
        from harness import models

        device = device or torch.device("cpu")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)
            return models.build(self.model, self.patch, self.cond, learn_sigma=True, class_dropout_prob=0.1,
                                grad_checkpoint=grad_checkpoint, **self.arch())

    def cost(self) -> dict:
        """Returns dict(params, gflops, tokens) of harness.flops (paper-convention Gflops, one image)."""
        from harness import flops

        return flops.model_cost(self.model, self.patch, self.cond, **self.arch())

    def label(self) -> str:
        return f"DiT-{self.model}/{self.patch}"


def _codec(vae: str, device: torch.device):
    """Returns a VAECodec for 'tiny' or 'sd-arch' (random weights, timing only), None for 'none'."""
    if vae not in VAES:
        raise ValueError(f"vae={vae!r}; allowed: {', '.join(VAES)}")
    if vae == "none":
        return None
    from harness.autoencoder import TINY_VAE, VAECodec

    if vae == "tiny":
        return VAECodec(TINY_VAE, device=device)
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VAECodec(AutoencoderKL(**SD_VAE_ARCH), device=device)


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainSetting:
    """One way of running the training step; `fp32_eager` (TF32 off) is the baseline of every ratio."""

    name: str
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights stay fp32)
    compile: bool = False
    tf32: bool = False
    grad_checkpoint: bool = False
    encode: bool = False  # encode pixels through the VAE every step instead of reading latents


TRAIN_SETTINGS = {s.name: s for s in (
    TrainSetting("fp32_eager"),
    TrainSetting("tf32", tf32=True),
    TrainSetting("bf16", precision="bf16", tf32=True),
    TrainSetting("compiled", compile=True, tf32=True),
    TrainSetting("bf16_compiled", precision="bf16", compile=True, tf32=True),
    TrainSetting("bf16_compiled_ckpt", precision="bf16", compile=True, tf32=True, grad_checkpoint=True),
    TrainSetting("grad_ckpt", grad_checkpoint=True),
    TrainSetting("bf16_vae_encode", precision="bf16", tf32=True, encode=True),
    TrainSetting("vae_encode", encode=True),
)}
BASELINE = "fp32_eager"
FAST_PATH = "bf16_compiled"  # train.fast_path's CUDA default; what --record stores
# TF32 is a no-op on the CPU, so the CPU default leaves out the settings that differ only by it.
DEFAULT_TRAIN_SETTINGS = {
    "cuda": ("fp32_eager", "tf32", "bf16", "compiled", "bf16_compiled", "bf16_compiled_ckpt", "bf16_vae_encode"),
    "cpu": ("fp32_eager", "bf16", "compiled", "bf16_compiled", "grad_ckpt", "vae_encode"),
}


def _settings(names, table: dict, device: torch.device, defaults: dict) -> list:
    names = list(names) if names else list(defaults[device.type])
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; allowed: {', '.join(table)}")
    return [table[n] for n in names]


def _fixed_batch(cell: Cell, batch: int, device: torch.device, seed: int = 0) -> dict:
    """Returns a fixed training batch on `device`: latents x, labels y, timesteps t, noise, label drops."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cell.in_channels, cell.input_size, cell.input_size)
    out = {"x": torch.randn(shape, generator=g), "y": torch.randint(cell.num_classes, (batch,), generator=g),
           "t": torch.randint(0, 1000, (batch,), generator=g), "noise": torch.randn(shape, generator=g),
           "drop": torch.rand(batch, generator=g) < 0.1}
    return {k: v.to(device) for k, v in out.items()}


def _train_runner(cell: Cell, setting: TrainSetting, batch: int, device: torch.device, vae: str,
                  mem: dict):
    """Returns a factory of (step_fn, close_fn, device) for one setting: train.py's step on a fixed batch."""
    from harness.diffusion import create_diffusion
    from harness.train import make_optimizer, update_ema

    def make():
        _reset_peak_mem(device)
        torch.backends.cuda.matmul.allow_tf32 = setting.tf32
        torch.backends.cudnn.allow_tf32 = setting.tf32
        model = cell.build(setting.grad_checkpoint, device).train()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = make_optimizer(model, argparse.Namespace(lr=1e-4, weight_decay=0.0, fused_adam=True), device)
        ema_params, params = list(ema.parameters()), list(model.parameters())
        net = torch.compile(model) if setting.compile else model
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if setting.precision == "bf16" \
            else nullcontext()
        diffusion = create_diffusion("").to(device)
        b = _fixed_batch(cell, batch, device)
        codec = _codec(vae, device) if setting.encode else None
        if codec is not None:
            side = cell.input_size * codec.downsample
            b["pixels"] = torch.rand(batch, 3, side, side, device=device) * 2 - 1
        enc_g = torch.Generator(device=device).manual_seed(0)

        def model_fn(x_t, t, y, drop):
            return net(x_t, t, y, force_drop_ids=drop)

        def step():
            x = b["x"]
            if codec is not None:  # the paper's way: a fresh posterior sample of every image, every step
                with autocast:
                    x = codec.encode(b["pixels"], generator=enc_g)
            with autocast:
                losses = diffusion.training_losses(model_fn, x, b["t"], {"y": b["y"], "drop": b["drop"]},
                                                   noise=b["noise"])
                loss = losses["loss"].float().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema_params, params, 0.9999)

        def close():
            mem[setting.name] = _peak_mem_gib(device)
            nonlocal model, ema, opt, net, b, codec, ema_params, params
            del model, ema, opt, net, b, codec, ema_params, params
            _reset_peak_mem(device)

        return step, close, device

    return make


def host_syncs_per_step(cell: Cell, batch: int, device: torch.device) -> int | None:
    """Returns how many host-device synchronisations one bf16 training step makes (None on the CPU)."""
    if device.type != "cuda":
        return None
    import warnings

    step, close, _ = _train_runner(cell, TRAIN_SETTINGS["bf16"], batch, device, "none", {})()
    step()  # the first step allocates optimizer state
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    close()
    return sum("synchroniz" in str(w.message) for w in caught)


def bf16_agreement(cell: Cell, batch: int, device: torch.device) -> dict:
    """Returns loss and output of bf16 autocast against fp32 on one fixed batch, with relative errors.

    The zero-initialised layers are refilled with N(0, PERTURB_STD^2) first (see PERTURB_STD).
    """
    from harness.diffusion import create_diffusion

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    model = cell.build(device=device).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * PERTURB_STD)
    diffusion = create_diffusion("").to(device)
    b = _fixed_batch(cell, batch, device, seed=1)
    out, loss = {}, {}
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
            with ctx:
                x_t = diffusion.q_sample(b["x"], b["t"], noise=b["noise"])
                out[precision] = model(x_t, b["t"], b["y"]).float()
                r = diffusion.training_losses(model, b["x"], b["t"], {"y": b["y"]}, noise=b["noise"])
                loss[precision] = float(r["loss"].float().mean())
    loss_rel = abs(loss["bf16"] - loss["fp32"]) / abs(loss["fp32"])
    out_rel = float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())
    return {"loss_fp32": loss["fp32"], "loss_bf16": loss["bf16"], "loss_rel_err": loss_rel,
            "output_rel_err": out_rel, "loss_rtol": BF16_LOSS_RTOL, "output_rtol": BF16_OUTPUT_RTOL,
            "ok": loss_rel <= BF16_LOSS_RTOL and out_rel <= BF16_OUTPUT_RTOL, "batch": batch}


def _peak_for(setting_precision: str, tf32: bool, device: torch.device, peak: dict) -> float:
    if setting_precision == "bf16":
        return peak["tflops"]["bf16"]
    return peak["tflops"]["tf32" if tf32 and device.type == "cuda" else "fp32"]


def bench_train(cell: Cell, batch: int, device: torch.device, settings=None, steps: int = 3, repeats: int = 3,
                warmup: int = 1, vae: str | None = None, interleave: bool | None = None,
                check_bf16: bool = True, progress_path: str | None = None) -> dict:
    """Returns the training record: per setting images/s, TFLOP/s, MFU, peak memory and ratio to fp32 eager."""
    if batch < 1 or steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch={batch}, steps={steps}, repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    chosen = _settings(settings, TRAIN_SETTINGS, device, DEFAULT_TRAIN_SETTINGS)
    vae = vae or ("sd-arch" if device.type == "cuda" else "tiny")
    interleave = device.type == "cpu" if interleave is None else interleave
    cost = cell.cost()
    flops_per_image = 3 * 2 * cost["gflops"] * 1e9  # forward + backward, real FLOPs (harness.flops)
    peak = device_peak(device)
    record = {"kind": "train", "device": peak, "cell": {"label": cell.label(), **asdict(cell), **cost},
              "batch": batch, "steps": steps, "repeats": repeats, "warmup": warmup, "vae": vae,
              "interleaved": interleave, "baseline": chosen[0].name, "fast_path": FAST_PATH, "settings": [],
              "complete": False}
    mem: dict = {}

    def row(s: TrainSetting, chunk_s: list) -> dict:
        images_per_s = statistics.median(batch * steps / c for c in chunk_s)
        tflops = images_per_s * flops_per_image / 1e12
        return {"name": s.name, **{k: v for k, v in asdict(s).items() if k != "name"},
                "images_per_s": images_per_s, "images_per_s_runs": [batch * steps / c for c in chunk_s],
                "tflops": tflops, "mfu": tflops / _peak_for(s.precision, s.tf32, device, peak),
                "peak_mem_gib": mem.get(s.name)}

    def on_done(name, chunk_s):
        if isinstance(chunk_s, str):
            record["settings"].append({"name": name, "images_per_s": None, "error": chunk_s})
        else:
            record["settings"].append(row(TRAIN_SETTINGS[name], chunk_s))
        _write_progress(record, progress_path)

    runners = {s.name: _train_runner(cell, s, batch, device, vae, mem) for s in chosen}
    _time_chunks(runners, steps, repeats, warmup, interleave, on_done=on_done)
    _add_ratios(record["settings"], "images_per_s")
    record["baseline"] = next((r["name"] for r in record["settings"] if r["images_per_s"]), None)
    if check_bf16:
        record["bf16_check"] = bf16_agreement(cell, min(batch, 8), device)
    record["host_syncs_per_step"] = host_syncs_per_step(cell, batch, device)
    record["complete"] = True
    _write_progress(record, progress_path)
    return record


def _add_ratios(rows: list, key: str) -> None:
    """Adds ratio_to_baseline = row[key] / baseline row[key] to every row (baseline: the first row that ran)."""
    done = [r for r in rows if r.get(key)]
    for r in rows:
        r["ratio_to_baseline"] = r[key] / done[0][key] if done and r.get(key) else None


def _write_progress(record: dict, path: str | None) -> None:
    """Rewrites the partial record at `path` atomically, so a run killed by a timeout keeps what it did."""
    if path:
        from harness.runfolder import atomic_write_json

        atomic_write_json(path, record)


# ---------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SampleSetting:
    name: str
    precision: str = "fp32"
    compile: bool = False
    guidance: bool = False


SAMPLE_SETTINGS = {s.name: s for s in (
    SampleSetting("fp32"),
    SampleSetting("fp32_cfg", guidance=True),
    SampleSetting("bf16", precision="bf16"),
    SampleSetting("bf16_cfg", precision="bf16", guidance=True),
    SampleSetting("bf16_compiled", precision="bf16", compile=True),
    SampleSetting("bf16_compiled_cfg", precision="bf16", compile=True, guidance=True),
)}
DEFAULT_SAMPLE_SETTINGS = {
    "cuda": ("fp32", "bf16", "bf16_cfg", "bf16_compiled", "bf16_compiled_cfg"),
    "cpu": ("fp32", "fp32_cfg", "bf16", "bf16_cfg"),
}


def bench_sample(cell: Cell, batch: int, device: torch.device, settings=None, sampling_steps: int = 10,
                 repeats: int = 3, warmup: int = 1, vae: str | None = None, interleave: bool | None = None,
                 progress_path: str | None = None) -> dict:
    """Returns the sampling record: images/s of harness.sample.generate (DDPM, decode, uint8) per setting,
    the VAE decode time per image, and the FID-50K GPU-hours (250 steps) each setting implies."""
    from omegaconf import OmegaConf

    from harness.config import EvalConfig
    from harness.sample import generate

    if batch < 1 or sampling_steps < 1 or repeats < 1:
        raise ValueError(f"batch={batch}, sampling_steps={sampling_steps}, repeats={repeats} must be >= 1")
    chosen = _settings(settings, SAMPLE_SETTINGS, device, DEFAULT_SAMPLE_SETTINGS)
    vae = vae or ("sd-arch" if device.type == "cuda" else "tiny")
    interleave = device.type == "cpu" if interleave is None else interleave
    cost = cell.cost()
    peak = device_peak(device)
    codec = _codec(vae, device)
    if codec is None:
        from harness.autoencoder import IdentityCodec

        codec = IdentityCodec(cell.in_channels)
    shape = (cell.in_channels, cell.input_size, cell.input_size)
    torch.backends.cuda.matmul.allow_tf32 = True
    decode_s = _decode_s_per_image(codec, shape, batch, device)
    record = {"kind": "sample", "device": peak, "cell": {"label": cell.label(), **asdict(cell), **cost},
              "batch": batch, "sampling_steps": sampling_steps, "repeats": repeats, "warmup": warmup,
              "vae": vae, "cfg_scale": CFG_SCALE, "decode_s_per_image": decode_s, "interleaved": interleave,
              "settings": [], "complete": False}

    def runner(s: SampleSetting):
        def make():
            _reset_peak_mem(device)
            model = cell.build(device=device).eval()
            if s.compile:  # the instance's forward, so forward_with_cfg's call to it is compiled too
                model.forward = torch.compile(model.forward)
            ecfg = OmegaConf.structured(EvalConfig(sampling_steps=str(sampling_steps),
                                                   cfg_scale=CFG_SCALE if s.guidance else 1.0))
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if s.precision == "bf16" else None
            idx = torch.arange(batch)

            def step():
                generate(model, codec, ecfg, idx, shape, cell.num_classes, device, autocast)

            def close():
                record.setdefault("_mem", {})[s.name] = _peak_mem_gib(device)

            return step, close, device
        return make

    def on_done(name, chunk_s):
        if isinstance(chunk_s, str):
            record["settings"].append({"name": name, "images_per_s": None, "error": chunk_s})
            _write_progress(record, progress_path)
            return
        s = SAMPLE_SETTINGS[name]
        images_per_s = statistics.median(batch / c for c in chunk_s)
        s_per_image_step = max(1 / images_per_s - decode_s, 0.0) / sampling_steps
        fid_s = FID_NUM_SAMPLES * (FID_SAMPLING_STEPS * s_per_image_step + decode_s)
        evals = sampling_steps * (2 if s.guidance else 1)
        tflops = images_per_s * evals * 2 * cost["gflops"] * 1e9 / 1e12
        record["settings"].append({
            "name": name, **{k: v for k, v in asdict(s).items() if k != "name"},
            "images_per_s": images_per_s, "images_per_s_runs": [batch / c for c in chunk_s],
            "tflops": tflops, "mfu": tflops / _peak_for(s.precision, True, device, peak),
            "peak_mem_gib": record.get("_mem", {}).get(name),
            f"fid{FID_NUM_SAMPLES // 1000}k_{FID_SAMPLING_STEPS}_steps_device_hours": fid_s / 3600,
        })
        _write_progress(record, progress_path)

    _time_chunks({s.name: runner(s) for s in chosen}, 1, repeats, warmup, interleave, on_done=on_done)
    record.pop("_mem", None)
    _add_ratios(record["settings"], "images_per_s")
    record["complete"] = True
    _write_progress(record, progress_path)
    return record


def _decode_s_per_image(codec, shape, batch: int, device: torch.device, repeats: int = 3) -> float:
    """Returns the median seconds per image of codec.decode on a batch of latents (after one warm-up)."""
    z = torch.randn(batch, *shape, device=device)
    with torch.no_grad():
        codec.decode(z)
        runs = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            codec.decode(z)
            sync(device)
            runs.append((time.perf_counter() - t0) / batch)
    return statistics.median(runs)


# ---------------------------------------------------------------------------------------------------------
# The latent loader


def write_latent_shards(root: str | Path, count: int, latent_shape=(4, 32, 32), dtype: str = "float16",
                        shard_size: int = 4096, num_classes: int = 1000, seed: int = 0) -> Path:
    """Writes `count` random posterior moments as latent shards (harness.precompute's format); returns root."""
    from harness import data
    from harness.autoencoder import DEFAULT_VAE, encoder_id
    from harness.precompute import STORE_DTYPES, file_sha256

    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    if count < 1 or shard_size < 1:
        raise ValueError(f"count={count} and shard_size={shard_size} must be positive")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for k, start in enumerate(range(0, count, shard_size)):
        n = min(shard_size, count - start)
        moments = rng.standard_normal((n, 2, 2, *latent_shape), dtype=np.float32)
        moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1  # the std rows are positive
        moments_name, labels_name, _ = data.shard_names(k)
        np.save(root / moments_name, moments.astype(dtype))
        np.save(root / labels_name, rng.integers(0, num_classes, n).astype(np.int64))
        shards.append(dict(file=moments_name, labels_file=labels_name, count=n,
                           sha256=file_sha256(str(root / moments_name)),
                           labels_sha256=file_sha256(str(root / labels_name))))
    meta = dict(format=data.SHARD_FORMAT, vae=DEFAULT_VAE, encoder=encoder_id(DEFAULT_VAE),
                resolution=latent_shape[-1] * 8, latent_shape=list(latent_shape), dtype=dtype,
                layout=data.MOMENTS_LAYOUT, shard_size=shard_size, count=count, num_classes=num_classes,
                source="harness.bench (random moments)", shards=shards)
    from harness.runfolder import atomic_write_json

    atomic_write_json(root / data.META_FILE, meta)
    return root


def _loader_rates(ds, batch: int, steps: int, repeats: int, threads: int) -> dict:
    """Returns loader rates measured in a worker thread with `threads` intra-op threads (like a prefetcher).

    OpenMP thread counts are per thread: setting it here leaves the training thread's count alone.
    """
    from harness.train import DataOrder

    out: dict = {}

    def work():
        try:
            torch.set_num_threads(threads)
            order = DataOrder(len(ds), 0, batch)
            g = torch.Generator().manual_seed(0)
            ds.augment(ds.get_batch(order.next_indices())[0], g)  # warm the page cache and allocator
            runs, get_s, aug_s = [], 0.0, 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(steps):
                    a = time.perf_counter()
                    x, _ = ds.get_batch(order.next_indices())
                    b = time.perf_counter()
                    ds.augment(x, g)
                    get_s, aug_s = get_s + b - a, aug_s + time.perf_counter() - b
                runs.append(batch * steps / (time.perf_counter() - t0))
            n = batch * steps * repeats
            out.update(images_per_s=statistics.median(runs), images_per_s_runs=runs,
                       get_batch_images_per_s=n / get_s, augment_images_per_s=n / aug_s)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            out["error"] = e

    t = threading.Thread(target=work, name="bench-loader")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out


def bench_loader(batch: int = 256, count: int = 8192, dtype: str = "float16", threads=(1,), steps: int = 20,
                 repeats: int = 3, root: str | None = None) -> dict:
    """Returns latent images/s of LatentShardDataset.get_batch + augment, per intra-op thread count."""
    from harness.data import LatentShardDataset

    if batch < 1 or count < batch:
        raise ValueError(f"batch={batch} must be >= 1 and count={count} >= batch")
    if any(t < 1 for t in threads):
        raise ValueError(f"threads={list(threads)}: each must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench_latents_", dir=root) as tmp:
        ds = LatentShardDataset(str(write_latent_shards(tmp, count, dtype=dtype)))
        rows = [{"threads": t, **_loader_rates(ds, batch, steps, repeats, t)} for t in threads]
        del ds  # release the memory maps before the folder goes
    for r in rows:
        r["meets_target"] = r["images_per_s"] >= LOADER_TARGET_IMAGES_PER_S
    return {"kind": "loader", "device": {"name": device_name(torch.device("cpu"))}, "batch": batch,
            "count": count, "dtype": dtype, "steps": steps, "repeats": repeats,
            "target_images_per_s": LOADER_TARGET_IMAGES_PER_S, "settings": rows, "complete": True}


# ---------------------------------------------------------------------------------------------------------
# Feature extraction


def bench_features(device: torch.device, batch: int = 256, repeats: int = 3, inception: bool = True) -> dict:
    """Returns images/s of the digits extractor (16x16) and, when its weights are present, of Inception
    (256x256 uint8, torch-fidelity's inception-v3-compat)."""
    from torch_fidelity.utils import create_feature_extractor

    from harness import metrics

    rows = []
    cuda = device.type == "cuda"
    info = metrics.digits_extractor_info()
    candidates = [(metrics.DIGITS_EXTRACTOR, metrics.DIGITS_CNN_SIZE, info["weights_path"])]
    if inception:
        candidates.append((metrics.INCEPTION_EXTRACTOR, 256, None))
    for name, size, weights in candidates:
        if name == metrics.INCEPTION_EXTRACTOR and not metrics.inception_weights_path().exists():
            rows.append({"name": name, "skipped": f"no weights at {metrics.inception_weights_path()}"})
            continue
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        layer = FEATURE_EXTRACTORS_REGISTRY[name].get_default_feature_layer_for_metric("fid")
        fe = create_feature_extractor(name, [layer], cuda=cuda, verbose=False,
                                      feature_extractor_weights_path=weights)
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        with torch.no_grad():
            fe(x)
            runs = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                fe(x)
                sync(device)
                runs.append(batch / (time.perf_counter() - t0))
        rows.append({"name": name, "input_size": size, "images_per_s": statistics.median(runs),
                     "images_per_s_runs": runs})
    return {"kind": "features", "device": {"name": device_name(device)}, "batch": batch, "repeats": repeats,
            "settings": rows, "complete": True}


# ---------------------------------------------------------------------------------------------------------
# conf/throughput.yaml: measured training throughput, read by the sweep's GPU-hour estimates


def read_throughput(path: str | Path = THROUGHPUT_FILE) -> dict:
    """Returns conf/throughput.yaml as a dict ({"plan_device": str|None, "devices": {}} when absent)."""
    import yaml

    path = Path(path)
    if not path.exists():
        return {"plan_device": None, "devices": {}}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.setdefault("plan_device", None)
    data.setdefault("devices", {})
    return data


def recorded_image_gflops_per_s(path: str | Path = THROUGHPUT_FILE) -> float | None:
    """Returns the plan device's training image-Gflops/s per GPU from the throughput file, or None."""
    data = read_throughput(path)
    entry = data["devices"].get(data["plan_device"]) if data["plan_device"] else None
    return float(entry["train_image_gflops_per_s"]) if entry else None


def _sig(x: float, digits: int = 6) -> float:
    """Returns x rounded to `digits` significant digits (a readable YAML file, no false precision)."""
    return float(f"{x:.{digits}g}")


def record_throughput(record: dict, path: str | Path = THROUGHPUT_FILE) -> dict:
    """Adds a train record's fast-path throughput to the throughput file (atomic write); returns the file.

    Per device, each cell's images/s x Gflops is kept; the device's `train_image_gflops_per_s` is that of
    its largest recorded cell (the cells that dominate a grid's cost). A CUDA device becomes plan_device.
    """
    import yaml

    if record.get("kind") != "train" or not record.get("complete"):
        raise ValueError("only a complete train record can be recorded")
    rows = {r["name"]: r for r in record["settings"] if r.get("images_per_s")}
    if not rows:
        raise ValueError("the train record has no setting that ran: nothing to record")
    name = FAST_PATH if FAST_PATH in rows else max(rows, key=lambda n: rows[n]["images_per_s"])
    row, cell = rows[name], record["cell"]
    data = read_throughput(path)
    dev = data["devices"].setdefault(record["device"]["name"], {"cells": {}})
    dev["type"] = record["device"]["type"]
    dev["cells"][cell["label"]] = {
        "gflops": cell["gflops"], "batch": record["batch"], "setting": name,
        "images_per_s": _sig(row["images_per_s"]), "image_gflops_per_s": _sig(row["images_per_s"] * cell["gflops"]),
        "mfu": _sig(row["mfu"]),
        "date": record["env"]["date"] if "env" in record else None, "torch": str(torch.__version__),
    }
    biggest = max(dev["cells"].values(), key=lambda c: c["gflops"])
    dev["train_image_gflops_per_s"] = biggest["image_gflops_per_s"]
    if dev["type"] == "cuda":
        data["plan_device"] = record["device"]["name"]
    header = ("# Measured training throughput per device: written by `python -m harness.bench train --record`,\n"
              "# read by harness.sweep for its GPU-hour estimates (plan_device's train_image_gflops_per_s).\n")
    body = header + yaml.safe_dump(data, sort_keys=False)
    from harness.runfolder import atomic_write_bytes

    atomic_write_bytes(path, body.encode())
    return data


# ---------------------------------------------------------------------------------------------------------
# Output and CLI


def format_table(record: dict) -> str:
    """Returns the record's settings as an aligned text table with a header line."""
    rows = record["settings"]
    skip = {"images_per_s_runs"}
    columns = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in skip]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    dev = record.get("device", {})
    head = f"{record['kind']} on {dev.get('name', '?')}"
    if "cell" in record:
        head += f", {record['cell']['label']} ({record['cell']['gflops']:.3f} Gflops), batch {record['batch']}"
    lines = [head, "  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    if "bf16_check" in record:
        c = record["bf16_check"]
        lines.append(f"bf16 vs fp32: loss rel err {c['loss_rel_err']:.2e} (tol {c['loss_rtol']}), output rel err "
                     f"{c['output_rel_err']:.2e} (tol {c['output_rtol']}): {'ok' if c['ok'] else 'FAIL'}")
    return "\n".join(lines)


def summarize(out_dir: str | Path) -> dict:
    """Merges the records (*.json) and phase log (phases.tsv) of a GPU check folder into gpu_check.json and
    gpu_check.md (one table row per measured setting); returns the merged dict."""
    from harness.runfolder import atomic_write_bytes, atomic_write_json

    out_dir = Path(out_dir)
    records = {}
    for path in sorted(out_dir.glob("*.json")):
        if path.name != "gpu_check.json":
            try:
                records[path.stem] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                records[path.stem] = {"error": f"unreadable: {e}"}
    phases = []
    if (out_dir / "phases.tsv").exists():
        for line in (out_dir / "phases.tsv").read_text().splitlines():
            name, status, rc, wall_s = (line.split("\t") + ["", "", "", ""])[:4]
            phases.append({"phase": name, "status": status, "rc": rc, "wall_s": wall_s})
    merged = {"phases": phases, "records": records, "env": environment([])}
    atomic_write_json(out_dir / "gpu_check.json", merged)
    lines = ["# GPU check", "", f"Date {merged['env']['date']}, torch {merged['env']['torch']}, "
             f"CUDA {merged['env']['cuda']}.", "", "| phase | status | rc | wall s |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['status']} | {p['rc']} | {p['wall_s']} |" for p in phases]
    lines += ["", "| record | device | cell | batch | setting | images/s | TFLOP/s | MFU | peak GiB | "
              "x baseline | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stem, r in records.items():
        dev = r.get("device", {}).get("name", "-")
        cell = r.get("cell", {}).get("label", "-")

        def num(v, f="{:.4g}"):
            return "-" if v is None else f.format(v)
        for row in r.get("settings", []):
            note = row.get("error") or row.get("skipped") or ""
            if "fid50k_250_steps_device_hours" in row:
                note = f"FID-50K (250 steps) {row['fid50k_250_steps_device_hours']:.2f} device-h"
            lines.append(f"| {stem} | {dev} | {cell} | {r.get('batch', '-')} | {row.get('name', row.get('threads'))} "
                         f"| {num(row.get('images_per_s'), '{:.1f}')} | {num(row.get('tflops'), '{:.1f}')} "
                         f"| {num(row.get('mfu'), '{:.1%}')} | {num(row.get('peak_mem_gib'), '{:.1f}')} "
                         f"| {num(row.get('ratio_to_baseline'), '{:.2f}')} | {note} |")
        if "bf16_check" in r:
            c = r["bf16_check"]
            lines.append(f"| {stem} | {dev} | {cell} | {c['batch']} | bf16 vs fp32 | | | | | | loss rel err "
                         f"{c['loss_rel_err']:.1e}, output rel err {c['output_rel_err']:.1e}: "
                         f"{'ok' if c['ok'] else 'FAIL'} |")
        if r.get("host_syncs_per_step") is not None:
            lines.append(f"| {stem} | {dev} | {cell} | {r['batch']} | host syncs per bf16 step | "
                         f"{r['host_syncs_per_step']} | | | | | |")
    atomic_write_bytes(out_dir / "gpu_check.md", ("\n".join(lines) + "\n").encode())
    return merged


def _cell_args(p: argparse.ArgumentParser) -> None:
    from harness.models import CONDS, PATCH_SIZES

    p.add_argument("--model", default="S", help="S, B, L, XL, or an off-paper name with --depth/--hidden/--heads")
    p.add_argument("--patch", type=int, default=8, choices=PATCH_SIZES)
    p.add_argument("--cond", default="adaln_zero", choices=CONDS)
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 for 256x256 images)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--depth", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--settings", help="comma-separated setting names (default: all for the device)")
    p.add_argument("--vae", choices=VAES, help="codec: tiny (CPU default), sd-arch (GPU default), none")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the record as JSON instead of a table")
    p.add_argument("--json-out", help="also write the record to this file (rewritten as settings finish)")
    p.add_argument("--threads", help="torch intra-op threads (loader: a comma-separated list to compare)")


def _cell(a) -> Cell:
    return Cell(a.model, a.patch, a.cond, a.input_size, num_classes=a.num_classes, depth=a.depth,
                hidden_size=a.hidden, num_heads=a.heads)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("train", help="training step images/s, MFU, memory; ratios to fp32 eager")
    _cell_args(t)
    _common_args(t)
    t.add_argument("--steps", type=int, default=3, help="training steps per timed chunk")
    t.add_argument("--no-bf16-check", action="store_true")
    t.add_argument("--record", action="store_true", help=f"store the fast path's throughput in {THROUGHPUT_FILE}")
    t.add_argument("--throughput-file", default=str(THROUGHPUT_FILE))
    s = sub.add_parser("sample", help="sampling images/s with and without guidance; FID-50K device-hours")
    _cell_args(s)
    _common_args(s)
    s.add_argument("--sampling-steps", type=int, default=10)
    ld = sub.add_parser("loader", help="latent loader images/s (get_batch + augment) from temporary shards")
    _common_args(ld)
    ld.add_argument("--batch", type=int, default=256)
    ld.add_argument("--count", type=int, default=8192, help="latent images written to the temporary shards")
    ld.add_argument("--dtype", default="float16", help="stored dtype: float16 or float32")
    ld.add_argument("--steps", type=int, default=20)
    f = sub.add_parser("features", help="feature extraction images/s (digits CNN; Inception if present)")
    _common_args(f)
    f.add_argument("--batch", type=int, default=256)
    sm = sub.add_parser("summarize", help="merge a GPU check folder into gpu_check.json and gpu_check.md")
    sm.add_argument("out_dir")
    a = p.parse_args(argv)
    if a.kind == "summarize":
        merged = summarize(a.out_dir)
        print((Path(a.out_dir) / "gpu_check.md").read_text(), flush=True)
        return merged

    if a.threads and a.kind != "loader":
        torch.set_num_threads(int(a.threads))
    if a.kind == "train":
        record = bench_train(_cell(a), a.batch, resolve_device(a.device), _split(a.settings), a.steps, a.repeats,
                             a.warmup, a.vae, check_bf16=not a.no_bf16_check, progress_path=a.json_out)
    elif a.kind == "sample":
        record = bench_sample(_cell(a), a.batch, resolve_device(a.device), _split(a.settings), a.sampling_steps,
                              a.repeats, a.warmup, a.vae, progress_path=a.json_out)
    elif a.kind == "loader":
        threads = [int(x) for x in _split(a.threads)] if a.threads else [1, torch.get_num_threads()]
        record = bench_loader(a.batch, a.count, a.dtype, tuple(dict.fromkeys(threads)), a.steps, a.repeats)
    else:
        record = bench_features(resolve_device(a.device), a.batch, a.repeats)
    record["env"] = environment(argv)
    _write_progress(record, a.json_out)
    if a.kind == "train" and a.record:
        record_throughput(record, a.throughput_file)
    print(json.dumps(record, indent=1, default=str) if a.json else format_table(record), flush=True)
    return record


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


if __name__ == "__main__":
    main()
