"""The sampling benchmark: images/s of harness.sample.generate (as FID sampling runs it: per-sample noise
generators, DDPM, decode, uint8) with and without guidance, and the FID-50K device-hours each implies."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import yaml
from omegaconf import OmegaConf

from harness.bench.common import (
    Cell,
    add_ratios,
    choose_settings,
    default_vae,
    device_peak,
    make_codec,
    peak_mem_gib,
    peak_tflops_for,
    reset_peak_mem,
    sync,
    time_chunks,
    write_progress,
)
from harness.core.config import CONF_DIR, EvalConfig
from harness.data.codec import IdentityCodec
from harness.sample import generate

# The grid's FID-50K protocol (paper section 5): its one home is the schema's evaluation defaults.
FID_NUM_SAMPLES = EvalConfig().num_samples
FID_SAMPLING_STEPS = int(EvalConfig().sampling_steps)
# The paper's best guidance scale (Table 2), whose home is the guided preset.
CFG_SCALE = float(yaml.safe_load((CONF_DIR / "eval" / "fid50k_cfg.yaml").read_text())["cfg_scale"])
FID_LABEL = f"FID-{FID_NUM_SAMPLES // 1000}K ({FID_SAMPLING_STEPS} steps)"
FID_HOURS_KEY = f"fid{FID_NUM_SAMPLES // 1000}k_{FID_SAMPLING_STEPS}_steps_device_hours"  # a sample record's column


@dataclass(frozen=True)
class SampleSetting:
    """One way of sampling: precision (bf16 autocast or fp32), compiled forward, classifier-free guidance."""

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
    the VAE decode seconds per image, and the FID-50K device-hours (250 steps) each setting implies."""
    if batch < 1 or sampling_steps < 1 or repeats < 1:
        raise ValueError(f"batch={batch}, sampling_steps={sampling_steps}, repeats={repeats} must be >= 1")
    chosen = choose_settings(settings, SAMPLE_SETTINGS, device, DEFAULT_SAMPLE_SETTINGS)
    vae = vae or default_vae(device)
    interleave = device.type == "cpu" if interleave is None else interleave
    cost = cell.cost()
    peak = device_peak(device)
    codec = make_codec(vae, device) or IdentityCodec(cell.in_channels)
    shape = (cell.in_channels, cell.input_size, cell.input_size)
    torch.backends.cuda.matmul.allow_tf32 = True
    decode_s = decode_s_per_image(codec, shape, batch, device)
    record = {"kind": "sample", "device": peak, "cell": {"label": cell.label(), **asdict(cell), **cost},
              "batch": batch, "sampling_steps": sampling_steps, "repeats": repeats, "warmup": warmup,
              "vae": vae, "cfg_scale": CFG_SCALE, "decode_s_per_image": decode_s, "interleaved": interleave,
              "settings": [], "complete": False}
    mem: dict = {}

    def runner(s: SampleSetting):
        def make():
            reset_peak_mem(device)
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
                mem[s.name] = peak_mem_gib(device)

            return step, close, device
        return make

    def on_done(name, chunk_s):
        if isinstance(chunk_s, str):
            record["settings"].append({"name": name, "images_per_s": None, "error": chunk_s})
            write_progress(record, progress_path)
            return
        s = SAMPLE_SETTINGS[name]
        images_per_s = statistics.median(batch / c for c in chunk_s)
        s_per_image_step = max(1 / images_per_s - decode_s, 0.0) / sampling_steps
        fid_s = FID_NUM_SAMPLES * (FID_SAMPLING_STEPS * s_per_image_step + decode_s)
        evals = sampling_steps * (2 if s.guidance else 1)  # guidance runs the model on a doubled batch
        tflops = images_per_s * evals * 2 * cost["gflops"] * 1e9 / 1e12
        record["settings"].append({
            "name": name, **{k: v for k, v in asdict(s).items() if k != "name"},
            "images_per_s": images_per_s, "images_per_s_runs": [batch / c for c in chunk_s],
            "tflops": tflops, "mfu": tflops / peak_tflops_for(s.precision, True, device, peak),
            "peak_mem_gib": mem.get(name),
            FID_HOURS_KEY: fid_s / 3600,
        })
        write_progress(record, progress_path)

    time_chunks({s.name: runner(s) for s in chosen}, 1, repeats, warmup, interleave, on_done=on_done)
    add_ratios(record["settings"], "images_per_s")
    record["complete"] = True
    write_progress(record, progress_path)
    return record


def decode_s_per_image(codec, shape: tuple[int, int, int], batch: int, device: torch.device,
                       repeats: int = 3) -> float:
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
