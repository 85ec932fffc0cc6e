"""Train one cell: `train(cfg) -> result`, resumable bit for bit after any kill.

The paper's recipe is the default (DIT_FACTS.md, Training recipe): AdamW 1e-4, no weight decay, global
batch 256, EMA 0.9999 from an exact copy, label dropout 0.1, t uniform over 0..999.

Determinism is what makes resume exact and the global batch the experimental variable: the data order
is a permutation fixed by (seed, epoch), and the diffusion timesteps, noise and label dropout of step s
are drawn for the whole global batch from a generator seeded by (seed, s). Each process takes its own
slice. So the same cell gives the same parameters after a kill and resume, and (up to reduction order)
whatever the number of processes.

    python -m harness.train model=S patch=4 data=digits train=demo train.steps=200
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP

from harness import checkpoint, distributed
from harness.config import cell_id, config_hash, eval_steps, validate
from harness.runfolder import append_jsonl, atomic_write_json, read_json, read_status, update_status

log = logging.getLogger(__name__)

VAL_SEED = 20_231_212  # the fixed validation batch draws from its own stream, identical for every cell


class TrainingFailed(RuntimeError):
    """A cell stopped for a reason recorded in its status.json (NaN loss, bad input found late)."""


class Preempted(RuntimeError):
    """The job was asked to stop (USR2 from SLURM/submitit); a checkpoint has been written."""


# ---- the shape of a cell ----

def batch_plan(global_batch: int, world_size: int, batch_per_gpu: int | None) -> tuple[int, int]:
    """(micro-batch per process, gradient-accumulation steps) for a global batch; asserted exact."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} processes")
    per_rank = global_batch // world_size
    micro = batch_per_gpu or per_rank
    if per_rank % micro:
        raise ValueError(f"batch_per_gpu={micro} does not divide the per-process batch {per_rank}")
    accum = per_rank // micro
    assert micro * accum * world_size == global_batch
    return micro, accum


def build_model(cfg: Any):
    """The cell's DiT, sized from its config and its data set's model-input shape."""
    from harness import data, models

    in_channels, input_size = data.model_input_shape(cfg.data)
    return models.build(
        cfg.model.name, cfg.patch, cfg.cond,
        input_size=input_size, in_channels=in_channels, num_classes=cfg.data.num_classes,
        learn_sigma=True, class_dropout_prob=cfg.train.class_dropout_prob,
        depth=cfg.model.depth, hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads,
        grad_checkpoint=cfg.model.grad_checkpoint,
    )


def run_dir_for(cfg: Any) -> Path:
    return Path(cfg.out_dir) / cell_id(cfg)


def cell_facts(cfg: Any) -> dict:
    """cell.json: what the analysis needs to place a cell, computed once."""
    from harness import data, flops

    in_channels, input_size = data.model_input_shape(cfg.data)
    cost = flops.model_cost(
        cfg.model.name, cfg.patch, cfg.cond, input_size=input_size, in_channels=in_channels,
        num_classes=cfg.data.num_classes, depth=cfg.model.depth, hidden_size=cfg.model.hidden_size,
        num_heads=cfg.model.num_heads,
    )
    return {
        "cell_id": cell_id(cfg), "config_hash": config_hash(cfg),
        "model": cfg.model.name, "patch": cfg.patch, "cond": cfg.cond, "data": cfg.data.name,
        "seed": cfg.seed, "input_size": input_size, "in_channels": in_channels,
        "tokens": cost["tokens"], "params": cost["params"], "gflops": cost["gflops"],
        "global_batch": cfg.train.global_batch, "steps": cfg.train.steps,
        "off_paper": bool(cfg.model.off_paper), "depth": cfg.model.depth,
        "hidden_size": cfg.model.hidden_size, "num_heads": cfg.model.num_heads,
    }


def prepare_run_dir(cfg: Any) -> Path:
    """Create (or re-open) the run folder; refuse one written by a different config."""
    run_dir = run_dir_for(cfg)
    facts = read_json(run_dir / "cell.json")
    if facts is not None and facts.get("config_hash") != config_hash(cfg):
        raise ValueError(
            f"{run_dir} holds a run of another config (hash {facts.get('config_hash', '?')[:12]}, "
            f"this config {config_hash(cfg)[:12]}); it is left untouched"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    if facts is None:
        OmegaConf.save(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)), run_dir / "config.yaml")
        atomic_write_json(run_dir / "cell.json", cell_facts(cfg))
    return run_dir


# ---- randomness as a pure function of (seed, step) ----

def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step `step`: timesteps, noise and label dropout of the whole global batch."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))


class DataOrder:
    """Global sample order, epoch by epoch; `next_indices` takes one global batch. State: (epoch, pos)."""

    def __init__(self, n: int, seed: int, global_batch: int, epoch: int = 0, pos: int = 0):
        if n < global_batch:
            raise ValueError(f"the data set has {n} items, fewer than the global batch {global_batch}")
        self.n, self.seed, self.global_batch = n, seed, global_batch
        self.epoch, self.pos = epoch, pos
        self._perm = epoch_order(n, seed, epoch)

    def next_indices(self) -> torch.Tensor:
        if self.pos + self.global_batch > self.n:  # drop the ragged tail, as drop_last does
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = epoch_order(self.n, self.seed, self.epoch)
        idx = self._perm[self.pos : self.pos + self.global_batch]
        self.pos += self.global_batch
        return idx

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


class Prefetcher:
    """Loads the batches of the next steps in a thread while the current step computes."""

    def __init__(self, load_fn, depth: int):
        self.load_fn = load_fn
        self.pool = ThreadPoolExecutor(max_workers=1) if depth > 0 else None
        self.depth = depth
        self.queue: list = []

    def push(self, key) -> None:
        self.queue.append(self.pool.submit(self.load_fn, key) if self.pool else key)

    def pop(self):
        item = self.queue.pop(0)
        return item.result() if self.pool else self.load_fn(item)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ---- preemption: USR2 asks for a checkpoint at the next step boundary ----

class StopFlag:
    """Set by SIGUSR2 (SLURM time limit or preemption, via submitit). The handler found installed
    (submitit's requeue) is chained after our checkpoint is on disk."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR2"):
            self.previous = signal.signal(signal.SIGUSR2, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %s: checkpointing at the next step", signum)
        self.requested = True
        self._frame = frame

    def hand_over(self) -> None:
        """Restore and call the previous handler (submitit requeues the job and exits)."""
        if self.previous is None:
            return
        signal.signal(signal.SIGUSR2, self.previous)
        if callable(self.previous) and self.previous not in (signal.SIG_DFL, signal.SIG_IGN):
            self.previous(signal.SIGUSR2, getattr(self, "_frame", None))

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGUSR2, self.previous)


# ---- the loop ----

@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in one fused call over all tensors (no Python loop)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def fast_path(tcfg: Any, device: torch.device) -> tuple[str, bool]:
    """(precision, compile) with the per-device defaults: bf16 and torch.compile on CUDA, fp32 eager on CPU."""
    precision = tcfg.precision if tcfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    compile_model = tcfg.compile if tcfg.compile is not None else device.type == "cuda"
    return precision, bool(compile_model)


def make_optimizer(model: torch.nn.Module, tcfg: Any, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay}
    if device.type == "cuda" and tcfg.fused_adam:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(model.parameters(), **kwargs)


def train(cfg: Any) -> dict:
    """Train (or resume) one cell to cfg.train.steps; returns {"run_dir", "step", "state", ...}.

    Raises ValueError for bad input before any work; records `failed` with the reason on NaN/inf loss.
    """
    from harness import data as data_mod
    from harness.autoencoder import build_codec
    from harness.diffusion import create_diffusion

    problems = validate(cfg)
    if problems:
        raise ValueError("bad cell config:\n  - " + "\n  - ".join(problems))
    env = distributed.init(cfg.device)
    tcfg = cfg.train
    micro, accum = batch_plan(tcfg.global_batch, env.world_size, tcfg.batch_per_gpu)
    per_rank = micro * accum

    if env.is_main:
        run_dir = prepare_run_dir(cfg)
    distributed.barrier()
    run_dir = run_dir_for(cfg)
    ckpt_dir = run_dir / "checkpoints"
    keep_steps = set(eval_steps(cfg))

    torch.backends.cuda.matmul.allow_tf32 = bool(tcfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(tcfg.tf32)

    dataset = data_mod.build_dataset(cfg.data, "train")
    # Pixel images of an ImageNet folder are encoded every step (the paper's way); other data sets are
    # already in the model's space (digits pixels, precomputed latents, synthetic tensors).
    codec = build_codec(cfg.data, device=env.device) if cfg.data.name == "imagefolder" else None
    diffusion = create_diffusion("").to(env.device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(env.device)
    ema = copy.deepcopy(model).requires_grad_(False)  # the paper's EMA starts as an exact copy
    opt = make_optimizer(model, tcfg, env.device)

    order = DataOrder(len(dataset), cfg.seed, tcfg.global_batch)
    step, images_seen, wall_s_before = 0, 0, 0.0
    state = checkpoint.load_latest(ckpt_dir, map_location="cpu")
    if state is not None:
        if state.get("config_hash") != config_hash(cfg):
            raise ValueError(f"checkpoint in {ckpt_dir} belongs to another config; refusing to resume")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        checkpoint.set_rng_state(state["rng"])
        step, images_seen = state["step"], state["images_seen"]
        order = DataOrder(len(dataset), cfg.seed, tcfg.global_batch, **state["data"])
        wall_s_before = state.get("wall_s", 0.0)
        log.info("resumed %s from %s", run_dir.name, checkpoint.describe_state(state))

    if env.is_main:
        status = read_status(run_dir)
        update_status(
            run_dir, state="running", reason=None, attempts=status.get("attempts", 0) + 1,
            step=step, total_steps=tcfg.steps, started=status.get("started") or time.time(),
        )
        if state is not None or status.get("attempts"):
            append_jsonl(run_dir / "metrics.jsonl", {"event": "resume", "step": step})
    if step >= tcfg.steps:
        return _finish(cfg, env, run_dir, step, images_seen, wall_s_before, note="already trained")

    train_model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.world_size > 1 else model
    precision, compile_model = fast_path(tcfg, env.device)
    if compile_model:
        train_model = torch.compile(train_model)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    val = _fixed_val_batch(cfg, dataset, codec, env)

    def model_fn(x_t, t, y, drop):
        return train_model(x_t, t, y, force_drop_ids=drop)

    # Each rank loads its slice of the global batch; the loader runs one step ahead in a thread.
    lo, hi = env.rank * per_rank, (env.rank + 1) * per_rank

    def load(key: tuple[int, torch.Tensor]):
        """This rank's slice of a step's global batch, augmented (flips, latent draws) and pinned."""
        step_k, indices = key
        x, y = dataset.get_batch(indices[lo:hi])
        aug_g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step_k + 104_729 * env.rank)
        x = dataset.augment(x, aug_g)
        if env.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, aug_g

    prefetch = Prefetcher(load, depth=tcfg.num_workers)
    prefetch.push((step, order.next_indices()))
    stop = StopFlag()
    ema_params, params = list(ema.parameters()), list(model.parameters())
    model.train()
    loss_sum = torch.zeros((), device=env.device)
    grad_norm = torch.zeros((), device=env.device)
    t_log, images_at_log, steps_since_log = time.perf_counter(), images_seen, 0
    t_start = time.perf_counter()
    progress = _progress(env, step, tcfg.steps)
    run = _wandb_run(cfg, env, run_dir)
    try:
        while step < tcfg.steps:
            x_all, y_all, aug_g = prefetch.pop()
            data_state = order.state()  # position after the batch being trained now was taken
            if step + 1 < tcfg.steps:
                prefetch.push((step + 1, order.next_indices()))
            # Drawn on the device itself: no host-to-device copy (and no sync) in the step.
            g = step_generator(cfg.seed, step, env.device)
            shape = (tcfg.global_batch, *val["x"].shape[1:])
            t_glob = torch.randint(0, diffusion.num_timesteps, (tcfg.global_batch,), generator=g, device=env.device)
            noise_glob = torch.randn(shape, generator=g, device=env.device)
            drop_glob = torch.rand(tcfg.global_batch, generator=g, device=env.device) < tcfg.class_dropout_prob
            opt.zero_grad(set_to_none=True)
            for k in range(accum):
                sl = slice(k * micro, (k + 1) * micro)
                gsl = slice(lo + k * micro, lo + (k + 1) * micro)
                x = x_all[sl].to(env.device, non_blocking=True)
                y = y_all[sl].to(env.device, non_blocking=True)
                if codec is not None:  # a fresh posterior sample every step, as the paper did
                    with torch.no_grad():
                        x = codec.encode(x, generator=aug_g)
                drop, t, noise = drop_glob[gsl], t_glob[gsl], noise_glob[gsl]
                sync = nullcontext() if (k == accum - 1 or env.world_size == 1) else train_model.no_sync()
                with sync, autocast:
                    # which labels are dropped is drawn above from the step's generator (reproducible,
                    # independent of the world size); the model's label embedder applies the rule
                    losses = diffusion.training_losses(model_fn, x, t, {"y": y, "drop": drop}, noise=noise)
                    loss = losses["loss"].float().mean() / accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            opt.step()
            update_ema(ema_params, params, tcfg.ema_decay)
            step += 1
            steps_since_log += 1
            images_seen += tcfg.global_batch
            progress.update(1)

            is_ckpt = step % tcfg.ckpt_every == 0 or step in keep_steps or step == tcfg.steps
            if step % tcfg.log_every == 0 or is_ckpt or stop.requested:
                loss_mean = distributed.all_reduce_mean(loss_sum.clone()) / max(1, steps_since_log)
                loss_value = float(loss_mean)
                if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
                    raise TrainingFailed(f"non-finite loss {loss_value} at step {step}; stopped, not saved")
                now = time.perf_counter()
                rec = {
                    "step": step, "images_seen": images_seen, "loss": loss_value,
                    "grad_norm": float(grad_norm), "lr": opt.param_groups[0]["lr"],
                    "images_per_s": (images_seen - images_at_log) / max(now - t_log, 1e-9),
                    "wall_s": wall_s_before + now - t_start,
                }
                t_log, images_at_log, steps_since_log = now, images_seen, 0
                loss_sum.zero_()
                if env.is_main:
                    append_jsonl(run_dir / "metrics.jsonl", rec)
                    progress.set_postfix(loss=f"{loss_value:.4f}")
                    if run is not None:
                        run.log(rec, step=step)
            if step % tcfg.val_every == 0 or step == tcfg.steps:
                val_loss, val_loss_ema = _val_loss(model, ema, diffusion, val, autocast)
                if env.is_main:
                    rec = {"step": step, "images_seen": images_seen, "val_loss": val_loss,
                           "val_loss_ema": val_loss_ema}
                    append_jsonl(run_dir / "metrics.jsonl", rec)
                    if run is not None:
                        run.log(rec, step=step)
            if is_ckpt or stop.requested:
                wall_s = wall_s_before + time.perf_counter() - t_start
                _save(cfg, env, ckpt_dir, step, images_seen, model, ema, opt, data_state, wall_s, keep_steps)
                if env.is_main:
                    update_status(run_dir, step=step, wall_s=wall_s, gpu_hours=_gpu_hours(env, wall_s))
            if stop.requested:
                raise Preempted(f"stopped at step {step} on request; checkpoint written")
    except TrainingFailed as e:
        if env.is_main:
            update_status(run_dir, state="failed", reason=str(e), step=step)
        raise
    except Preempted:
        if env.is_main:
            update_status(run_dir, state="interrupted", reason="preempted (USR2): checkpointed, requeued")
        prefetch.close()
        stop.hand_over()
        raise
    finally:
        prefetch.close()
        stop.restore()
        progress.close()
        if run is not None:
            run.finish()
    return _finish(cfg, env, run_dir, step, images_seen, wall_s_before + time.perf_counter() - t_start)


def _finish(cfg, env, run_dir, step, images_seen, wall_s, note=None) -> dict:
    if env.is_main:
        update_status(run_dir, state="finished", reason=note, step=step, wall_s=wall_s,
                      gpu_hours=_gpu_hours(env, wall_s))
    return {"run_dir": str(run_dir), "step": step, "images_seen": images_seen, "state": "finished",
            "wall_s": wall_s}


def _gpu_hours(env: distributed.DistEnv, wall_s: float) -> float:
    """GPU-hours spent (0 on the CPU): wall time times the number of GPU processes."""
    return wall_s / 3600.0 * env.world_size if env.device.type == "cuda" else 0.0


def _save(cfg, env, ckpt_dir, step, images_seen, model, ema, opt, data_state, wall_s, keep_steps) -> None:
    if env.is_main:
        state = {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "step": step, "images_seen": images_seen, "rng": checkpoint.rng_state(),
            "data": data_state, "config": OmegaConf.to_container(cfg, resolve=True),
            "config_hash": config_hash(cfg), "git_commit": checkpoint.git_commit(), "wall_s": wall_s,
        }
        checkpoint.save(ckpt_dir, step, state)
        checkpoint.prune(ckpt_dir, cfg.train.keep_last, keep_steps)
    distributed.barrier()


def _fixed_val_batch(cfg, dataset, codec, env) -> dict:
    """Fixed images, timesteps and noise, identical across steps, restarts and cells of one data set."""
    g = torch.Generator().manual_seed(VAL_SEED)
    n = min(cfg.train.val_batch, len(dataset))
    idx = torch.randperm(len(dataset), generator=g)[:n]
    x, y = dataset.get_batch(idx)
    x = dataset.augment(x, g)
    if codec is not None:
        with torch.no_grad():
            x = codec.encode(x.to(env.device), generator=g).cpu()
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return {"x": x, "y": y, "t": t, "noise": noise}


@torch.no_grad()
def _val_loss(model, ema, diffusion, val, autocast) -> tuple[float, float]:
    """Diffusion loss of the model and of its EMA on the fixed validation batch (labels not dropped)."""
    out = []
    for net in (model, ema):
        was_training = net.training
        net.eval()
        dev = next(net.parameters()).device
        losses = []
        for i in range(0, len(val["x"]), 64):
            sl = slice(i, i + 64)
            with autocast:
                r = diffusion.training_losses(
                    net, val["x"][sl].to(dev), val["t"][sl].to(dev), {"y": val["y"][sl].to(dev)},
                    noise=val["noise"][sl].to(dev),
                )
            losses.append(r["loss"].float())
        net.train(was_training)
        out.append(float(distributed.all_reduce_mean(torch.cat(losses).mean())))
    return out[0], out[1]


def _progress(env, step, total):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=step, disable=not env.is_main or bool(os.environ.get("HARNESS_NO_BAR")),
                desc="train", unit="step", dynamic_ncols=True)


def _wandb_run(cfg, env, run_dir):
    if cfg.train.wandb == "disabled" or not env.is_main:
        return None
    import wandb

    return wandb.init(
        project="harness", name=run_dir.name, id=run_dir.name, resume="allow", dir=str(run_dir),
        mode=cfg.train.wandb, config=OmegaConf.to_container(cfg, resolve=True),
    )


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _main() -> None:
    import hydra

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def main(cfg) -> None:
        result = train(cfg)
        print(f"trained {result['run_dir']} to step {result['step']} ({result['images_seen']} images)")

    main()


if __name__ == "__main__":
    _main()
