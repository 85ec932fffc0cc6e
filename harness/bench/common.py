"""What every benchmark shares: the device and its peak, the timing loop, the environment a figure is
measured in, the benchmarked cell and its codec."""

from __future__ import annotations

import datetime
import functools
import gc
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.core import throughput
from harness.core.config import TrainConfig
from harness.core.runfolder import atomic_write_json
from harness.data.codec import TINY_VAE, VAECodec
from harness.model import dit, flops

# Dense (no sparsity) peak TFLOP/s of one GPU, from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() by `peak_table_entry`, most specific name first.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}

IMAGENET_CLASSES = 1000  # the grid's classes (conf/data/latents256.yaml): the label table of a benchmarked DiT
# The paper's label dropout (section 4), whose one home is the training recipe's schema.
CLASS_DROPOUT_PROB = TrainConfig().class_dropout_prob

# The SD VAE's architecture (stabilityai/sd-vae-ft-ema config.json), built with random weights to time
# encode/decode where the weights cannot be downloaded: cost does not depend on the weight values.
SD_VAE_ARCH = dict(
    in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), sample_size=256,
)
VAES = ("none", "tiny", "sd-arch")


# ---------------------------------------------------------------------------------------------------------
# The device: name, peak, memory


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
    """Returns the GPU's name, or the CPU model (harness.core.throughput.cpu_name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return throughput.cpu_name()


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
    """Waits for the device's queued work (a no-op on the CPU, which computes synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# A CPU peak is measured on a matrix this large and for about this long: big enough for the blocked kernels, small
# enough that a CPU without bf16 units (0.6 bf16 GFLOP/s seen on a 2-core EPYC without AVX-512, where 2048 x 2048
# took 28 s a product) measures in a second or two rather than minutes.
CPU_MATMUL_N = 512
MATMUL_BUDGET_S = 1.0


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                           repeats: int = 8, budget_s: float = MATMUL_BUDGET_S) -> float:
    """Returns the best TFLOP/s of an n x n matmul (2 n^3 FLOPs) in `dtype`: a measured peak, from at most
    `repeats` timed products and at least two, stopping once `budget_s` seconds were spent timing."""
    n = n or (8192 if device.type == "cuda" else CPU_MATMUL_N)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm up (kernel selection, thread pool)
    best_s, spent_s = math.inf, 0.0
    for k in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        elapsed = time.perf_counter() - t0
        best_s, spent_s = min(best_s, elapsed), spent_s + elapsed
        if k >= 1 and spent_s > budget_s:
            break
    return 2 * n**3 / best_s / 1e12


@functools.cache
def _device_peak(device: str) -> dict:
    return _measure_device_peak(torch.device(device))


def device_peak(device: torch.device) -> dict:
    """Returns {"name", "type", "source", "tflops": {"bf16", "tf32", "fp32"}}: dense peak TFLOP/s from the
    data-sheet table for a known GPU, else measured with a matmul (once per device and process)."""
    return dict(_device_peak(str(device)), tflops=dict(_device_peak(str(device))["tflops"]))


def _measure_device_peak(device: torch.device) -> dict:
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


def peak_tflops_for(precision: str, tf32: bool, device: torch.device, peak: dict) -> float:
    """Returns the dense peak TFLOP/s a setting is measured against: bf16, TF32 (CUDA only) or fp32."""
    if precision == "bf16":
        return peak["tflops"]["bf16"]
    return peak["tflops"]["tf32" if tf32 and device.type == "cuda" else "fp32"]


def peak_mem_gib(device: torch.device) -> float | None:
    """Returns the peak GiB allocated on a CUDA device since the last reset; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_mem(device: torch.device) -> None:
    """Frees the cached CUDA blocks and restarts the peak-memory count (nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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


# ---------------------------------------------------------------------------------------------------------
# Timing and the record


def time_chunks(runners: dict, steps: int, repeats: int, warmup: int, interleave: bool,
                on_done: Callable | None = None) -> dict:
    """Returns {name: [seconds of each timed chunk of `steps` calls]} (or {name: "out of memory: ..."});
    runners map name -> factory, and a factory returns (step_fn, close_fn, device).

    Interleaved: every runner is built first and the chunks go round-robin, so load changes hit every
    setting alike. Sequential: one runner at a time, freed after (what a GPU's memory needs).
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


def choose_settings(names, table: dict, device: torch.device, defaults: dict) -> list:
    """Returns the settings of `table` named in `names` (the device's defaults when empty); ValueError
    naming an unknown one."""
    names = list(names) if names else list(defaults[device.type])
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"unknown setting(s) {bad}; allowed: {', '.join(table)}")
    return [table[n] for n in names]


def add_ratios(rows: list, key: str) -> None:
    """Adds ratio_to_baseline = row[key] / baseline row[key] to every row (baseline: the first row that ran)."""
    done = [r for r in rows if r.get(key)]
    for r in rows:
        r["ratio_to_baseline"] = r[key] / done[0][key] if done and r.get(key) else None


def write_progress(record: dict, path: str | Path | None) -> None:
    """Rewrites the partial record at `path` atomically, so a run killed by a timeout keeps what it did."""
    if path:
        atomic_write_json(path, record)


# ---------------------------------------------------------------------------------------------------------
# The cell and its codec


@dataclass
class Cell:
    """What is benchmarked: a DiT size (S..XL, or an off-paper one with depth/width/heads), patch, cond."""

    model: str = "S"
    patch: int = 8
    cond: str = "adaln_zero"
    input_size: int = 32  # latent side (32: ImageNet 256 through the SD VAE)
    in_channels: int = 4
    num_classes: int = IMAGENET_CLASSES
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
        device = device or torch.device("cpu")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(0)
            return dit.build(self.model, self.patch, self.cond, learn_sigma=True,
                                class_dropout_prob=CLASS_DROPOUT_PROB, grad_checkpoint=grad_checkpoint,
                                **self.arch())

    def cost(self) -> dict:
        """Returns dict(params, gflops, tokens) of harness.model.flops (paper-convention Gflops: multiply-adds of
        one forward pass of one image, counted by fvcore)."""
        return flops.model_cost(self.model, self.patch, self.cond, **self.arch())

    def label(self) -> str:
        return f"DiT-{self.model}/{self.patch}"


def make_codec(vae: str, device: torch.device):
    """Returns a VAECodec for 'tiny' or 'sd-arch' (random weights, timing only), None for 'none'."""
    if vae not in VAES:
        raise ValueError(f"vae={vae!r}; allowed: {', '.join(VAES)}")
    if vae == "none":
        return None
    if vae == "tiny":
        return VAECodec(TINY_VAE, device=device)
    from diffusers import AutoencoderKL  # here: seconds to import, and only the sd-arch codec needs it

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VAECodec(AutoencoderKL(**SD_VAE_ARCH), device=device)


def default_vae(device: torch.device) -> str:
    """Returns the codec a benchmark uses unless told: the SD VAE's architecture on CUDA, the tiny VAE on
    the CPU (the SD VAE would take most of a CPU step)."""
    return "sd-arch" if device.type == "cuda" else "tiny"
