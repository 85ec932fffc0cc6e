"""The training benchmark: images/s, TFLOP/s, MFU and peak memory of the trainer's own step per setting,
the bf16-vs-fp32 agreement check and the host-synchronisation count of that step.

Each setting builds the model with `Cell.build` and steps it with `harness.train.make_stepper` and
`harness.train.train_step`, exactly as the trainer does (EMA, AdamW, gradient-norm, autocast and
torch.compile chosen by `harness.cell.fast_path`), on one fixed batch drawn as the trainer draws a step.
"""

from __future__ import annotations

import statistics
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from harness.bench.common import (
    CLASS_DROPOUT_PROB,
    Cell,
    add_ratios,
    choose_settings,
    default_vae,
    device_peak,
    make_codec,
    peak_mem_gib,
    peak_tflops_for,
    reset_peak_mem,
    time_chunks,
    write_progress,
)
from harness.core.config import TrainConfig
from harness.diffusion import create_diffusion
from harness.train import autocast_for, draw_step, make_stepper, train_step

# bf16 keeps 8 significant bits (relative rounding 2^-9); a deep net under autocast accumulates a few
# of those per layer. Loss and output of bf16 autocast must agree with fp32 to within these.
BF16_LOSS_RTOL = 0.02
BF16_OUTPUT_RTOL = 0.05
# Zero-initialised layers (adaLN-Zero, final linear) make a fresh DiT output exactly zero, which would
# make the bf16 output check vacuous: they are refilled with N(0, this^2) for the check.
PERTURB_STD = 0.02


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
FAST_PATH = "bf16_compiled"  # harness.cell.fast_path's CUDA default; what --record stores
# TF32 is a no-op on the CPU, so the CPU default leaves out the settings that differ only by it.
DEFAULT_TRAIN_SETTINGS = {
    "cuda": ("fp32_eager", "tf32", "bf16", "compiled", "bf16_compiled", "bf16_compiled_ckpt", "bf16_vae_encode"),
    "cpu": ("fp32_eager", "bf16", "compiled", "bf16_compiled", "grad_ckpt", "vae_encode"),
}


def train_config(setting: TrainSetting) -> TrainConfig:
    """Returns the paper's training recipe (harness.core.config.TrainConfig: AdamW 1e-4, no weight decay, EMA
    0.9999, fused AdamW on CUDA) with the setting's precision, compilation and TF32."""
    return replace(TrainConfig(), precision=setting.precision, compile=setting.compile, tf32=setting.tf32)


def fixed_batch(cell: Cell, batch: int, objective, device: torch.device, seed: int = 0) -> dict:
    """Returns a fixed training batch on `device`: latents x, labels y, and the step's timesteps t, noise and
    label drops drawn by harness.train.draw_step (on the CPU, so every device sees the same batch)."""
    g = torch.Generator().manual_seed(seed)
    shape = (cell.in_channels, cell.input_size, cell.input_size)
    x = torch.randn((batch, *shape), generator=g)
    y = torch.randint(cell.num_classes, (batch,), generator=g)
    t, noise, drop = draw_step(objective, g, batch, shape, CLASS_DROPOUT_PROB, torch.device("cpu"))
    return {k: v.to(device) for k, v in dict(x=x, y=y, t=t, noise=noise, drop=drop).items()}


def train_runner(cell: Cell, setting: TrainSetting, batch: int, device: torch.device, vae: str, mem: dict):
    """Returns a factory of (step_fn, close_fn, device) for one setting: harness.train.train_step of a fresh
    Stepper on a fixed batch. close_fn stores the setting's peak GiB in mem[setting.name]."""

    def make():
        reset_peak_mem(device)
        torch.backends.cuda.matmul.allow_tf32 = setting.tf32
        torch.backends.cudnn.allow_tf32 = setting.tf32
        model = cell.build(setting.grad_checkpoint, device).train()
        objective = create_diffusion("").to(device)
        codec = make_codec(vae, device) if setting.encode else None
        stepper = make_stepper(model, objective, train_config(setting), device, world_size=1, micro=batch, accum=1,
                               codec=codec)
        b = fixed_batch(cell, batch, objective, device)
        if codec is not None:  # pixels in: the stepper encodes a fresh posterior sample every step, as the paper
            side = cell.input_size * codec.downsample
            g = torch.Generator().manual_seed(1)
            b["x"] = (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(device)
        encode_generator = torch.Generator(device=device).manual_seed(0)

        def step():
            train_step(stepper, b["x"], b["y"], b["t"], b["noise"], b["drop"], encode_generator)

        def close():
            mem[setting.name] = peak_mem_gib(device)
            nonlocal model, stepper, b, codec
            del model, stepper, b, codec
            reset_peak_mem(device)

        return step, close, device

    return make


def host_syncs_per_step(cell: Cell, batch: int, device: torch.device) -> int | None:
    """Returns how many host-device synchronisations one bf16 harness.train.train_step makes, counted by
    torch.cuda.set_sync_debug_mode (None on the CPU, where there is nothing to count)."""
    if device.type != "cuda":
        return None
    step, close, _ = train_runner(cell, TRAIN_SETTINGS["bf16"], batch, device, "none", {})()
    step()  # the first step allocates the optimizer's state
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
    """Returns loss and output of bf16 autocast against fp32 (TF32 off) on one fixed batch, their relative
    errors, the tolerances and `ok`. The zero-initialised layers are refilled first (see PERTURB_STD)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    model = cell.build(device=device).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * PERTURB_STD)
    diffusion = create_diffusion("").to(device)
    b = fixed_batch(cell, batch, diffusion, device, seed=1)
    out, loss = {}, {}
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            with autocast_for(precision, device):
                x_t = diffusion.q_sample(b["x"], b["t"], noise=b["noise"])
                out[precision] = model(x_t, b["t"], b["y"]).float()
                r = diffusion.training_losses(model, b["x"], b["t"], {"y": b["y"]}, noise=b["noise"])
                loss[precision] = float(r["loss"].float().mean())
    loss_rel = abs(loss["bf16"] - loss["fp32"]) / abs(loss["fp32"])
    out_rel = float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())
    return {"loss_fp32": loss["fp32"], "loss_bf16": loss["bf16"], "loss_rel_err": loss_rel,
            "output_rel_err": out_rel, "loss_rtol": BF16_LOSS_RTOL, "output_rtol": BF16_OUTPUT_RTOL,
            "ok": loss_rel <= BF16_LOSS_RTOL and out_rel <= BF16_OUTPUT_RTOL, "batch": batch}


def bench_train(cell: Cell, batch: int, device: torch.device, settings=None, steps: int = 3, repeats: int = 3,
                warmup: int = 1, vae: str | None = None, interleave: bool | None = None,
                check_bf16: bool = True, progress_path: str | None = None) -> dict:
    """Returns the training record: per setting images/s, TFLOP/s, MFU, peak GiB and the ratio to the first
    setting that ran (fp32 eager by default); the bf16 check and host syncs per step beside them."""
    if batch < 1 or steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"batch={batch}, steps={steps}, repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    chosen = choose_settings(settings, TRAIN_SETTINGS, device, DEFAULT_TRAIN_SETTINGS)
    vae = vae or default_vae(device)
    interleave = device.type == "cpu" if interleave is None else interleave
    cost = cell.cost()
    flops_per_image = 3 * 2 * cost["gflops"] * 1e9  # forward + backward, real FLOPs (2 per multiply-add)
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
                "tflops": tflops, "mfu": tflops / peak_tflops_for(s.precision, s.tf32, device, peak),
                "peak_mem_gib": mem.get(s.name)}

    def on_done(name, chunk_s):
        if isinstance(chunk_s, str):
            record["settings"].append({"name": name, "images_per_s": None, "error": chunk_s})
        else:
            record["settings"].append(row(TRAIN_SETTINGS[name], chunk_s))
        write_progress(record, progress_path)

    runners = {s.name: train_runner(cell, s, batch, device, vae, mem) for s in chosen}
    time_chunks(runners, steps, repeats, warmup, interleave, on_done=on_done)
    add_ratios(record["settings"], "images_per_s")
    record["baseline"] = next((r["name"] for r in record["settings"] if r["images_per_s"]), None)
    if check_bf16:
        record["bf16_check"] = bf16_agreement(cell, min(batch, 8), device)
    record["host_syncs_per_step"] = host_syncs_per_step(cell, batch, device)
    record["complete"] = True
    write_progress(record, progress_path)
    return record


def recorded_setting(record: dict) -> str:
    """Returns the setting of a train record that `--record` stores in conf/throughput.yaml: FAST_PATH when
    it ran, else the fastest; ValueError for a record that is not a complete train record or ran nothing."""
    if record.get("kind") != "train" or not record.get("complete"):
        raise ValueError("only a complete train record can be recorded")
    ran = {r["name"]: r["images_per_s"] for r in record["settings"] if r.get("images_per_s")}
    if not ran:
        raise ValueError("the train record has no setting that ran: nothing to record")
    return FAST_PATH if FAST_PATH in ran else max(ran, key=ran.get)
