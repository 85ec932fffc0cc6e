"""Train one cell: `train(cfg) -> result`, resumable bit for bit after any kill.

The paper's recipe is the default (section 4): AdamW 1e-4, no weight decay, global batch 256, EMA 0.9999
from an exact copy, label dropout 0.1, t uniform over 0..999 (or over [0, 1] for a flow objective).

Determinism is what makes resume exact and the global batch the experimental variable: the data order
is a permutation fixed by (seed, epoch), and the timesteps, noise and label dropout of step s are drawn
for the whole global batch from a generator seeded by (seed, s). Each process takes its own slice. So the
same cell gives the same parameters after a kill and resume, and (up to reduction order) whatever the
number of processes.

    python -m harness.train model=S patch=4 data=digits train=demo train.steps=200
"""

from __future__ import annotations

# --help answers before anything heavy is imported (torch, Hydra's loader): in well under a second.
from harness.core.help import exit_with_help_if_asked

exit_with_help_if_asked("train", __name__)

import copy
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from harness import heldout, tracking
from harness.cell import (
    autocast_for,
    build_model,
    build_objective,
    cell_id,
    config_hash,
    fast_path,
    hold,
    prepare_run_dir,
    run_dir_for,
    validate,
)
from harness.core import checkpoint, cli, distributed, lease, runfolder
from harness.core.config import compose, eval_steps
from harness.core.runfolder import append_jsonl, read_status, update_status
from harness.data.datasets import build_codec, build_dataset, data_kind, unique_images
from harness.model import mup

log = logging.getLogger(__name__)

STEP_SEED_STRIDE = 1_000_003  # step s of seed k draws from generator seed k * STRIDE + s
AUG_RANK_STRIDE = 104_729  # each rank augments its slice from its own stream
EPOCH_SEED_STRIDE = 7_919  # the data order of epoch e of seed k is a permutation seeded by k * STRIDE + e


class TrainingFailed(RuntimeError):
    """A cell stopped for a reason recorded in its status.json (non-finite loss, a failed write)."""


class Preempted(RuntimeError):
    """The job was asked to stop (USR2 from SLURM/submitit); a checkpoint has been written."""


#################################################################################
#                      The shape of a cell and its randomness                   #
#################################################################################


def batch_plan(global_batch: int, world_size: int, batch_per_gpu: int | None) -> tuple[int, int]:
    """Returns (micro-batch per process, gradient-accumulation steps) for a global batch; asserted exact."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by the {world_size} processes")
    per_rank = global_batch // world_size
    micro = batch_per_gpu or per_rank
    if per_rank % micro:
        raise ValueError(f"batch_per_gpu={micro} does not divide the per-process batch {per_rank}")
    accum = per_rank // micro
    assert micro * accum * world_size == global_batch
    return micro, accum


def step_seed(seed: int, step: int) -> int:
    """Returns the generator seed of training step `step` of a cell seeded `seed`."""
    return seed * STEP_SEED_STRIDE + step


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Returns the generator of step `step`: timesteps, noise and label dropout of the whole global batch."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step))


def draw_step(objective, generator: torch.Generator, global_batch: int, shape: tuple[int, ...],
              class_dropout_prob: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Returns (t, noise, drop) of one step for the whole global batch, drawn on `device` from `generator`
    in a fixed order (so a resumed run, or any number of processes, sees the same draws)."""
    t = objective.sample_t(global_batch, generator, device)
    noise = torch.randn((global_batch, *shape), generator=generator, device=device)
    drop = torch.rand(global_batch, generator=generator, device=device) < class_dropout_prob
    return t, noise, drop


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Returns the permutation of the n items for `epoch`."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch))


class DataOrder:
    """Global sample order, epoch by epoch; `next_indices` takes one global batch. State: (epoch, pos).

    n=None is a stream that never repeats (a procedural data set): batch k holds items k*B .. k*B + B - 1, the
    epoch stays 0, and no item is ever seen twice."""

    def __init__(self, n: int | None, seed: int, global_batch: int, epoch: int = 0, pos: int = 0):
        if n is not None and n < global_batch:
            raise ValueError(f"the data set has {n} items, fewer than the global batch {global_batch}")
        self.n, self.seed, self.global_batch = n, seed, global_batch
        self.epoch, self.pos = epoch, pos
        self._perm = epoch_order(n, seed, epoch) if n is not None else None

    def next_indices(self) -> torch.Tensor:
        if self.n is None:
            idx = torch.arange(self.pos, self.pos + self.global_batch, dtype=torch.int64)
            self.pos += self.global_batch
            return idx
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
        self.queue: list = []

    def push(self, key) -> None:
        self.queue.append(self.pool.submit(self.load_fn, key) if self.pool else key)

    def pop(self):
        item = self.queue.pop(0)
        return item.result() if self.pool else self.load_fn(item)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


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


#################################################################################
#                   One training step (the trainer's and the bench's)           #
#################################################################################


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in one fused call over all tensors (no Python loop)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def make_optimizer(model: torch.nn.Module, tcfg: Any, device: torch.device) -> torch.optim.Optimizer:
    """Returns AdamW over the model's parameter groups (one group under sp; per-layer rates under muP)."""
    kwargs = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay}
    if device.type == "cuda" and tcfg.fused_adam:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(mup.param_groups(model, tcfg.lr, tcfg.weight_decay), **kwargs)


@dataclass
class Stepper:
    """What one optimisation step touches, built once (`make_stepper`); the trainer and the benchmarks
    step the same object, so the benchmarks time, and the GPU checks inspect, the trainer's own step."""

    model: torch.nn.Module  # the parameters (and the EMA's source)
    net: Callable  # what runs the forward: the model, DDP-wrapped and/or compiled
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    objective: Any  # harness.diffusion: GaussianDiffusion or Flow (training_losses, sample_t)
    precision: str
    ema_decay: float
    micro: int  # per-process micro-batch
    accum: int  # micro-batches per step
    distributed: bool
    codec: Any = None  # encodes pixels every step (the paper's ImageNet path); None: inputs are final
    ema_params: list = field(default_factory=list)
    params: list = field(default_factory=list)

    def __post_init__(self):
        self.ema_params, self.params = list(self.ema.parameters()), list(self.model.parameters())
        self.autocast = autocast_for(self.precision, next(self.model.parameters()).device)


def make_stepper(model: torch.nn.Module, objective, tcfg: Any, device: torch.device, *, world_size: int = 1,
                 micro: int, accum: int = 1, codec=None) -> Stepper:
    """Returns the Stepper of a model: EMA (an exact copy, as the paper's), AdamW, DDP when world_size > 1,
    and the precision and compilation of `harness.cell.fast_path`."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, tcfg, device)
    net = model
    if world_size > 1:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    precision, compile_model = fast_path(tcfg, device)
    if compile_model:
        net = torch.compile(net)
    return Stepper(model=model, net=net, ema=ema, opt=opt, objective=objective, precision=precision,
                   ema_decay=tcfg.ema_decay, micro=micro, accum=accum, distributed=world_size > 1, codec=codec)


def train_step(s: Stepper, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
               drop: torch.Tensor, encode_generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """One optimisation step on this process's slice (micro x accum items): forward and backward of each
    micro-batch, AdamW, EMA. Returns (summed mean loss of the micro-batches / accum, gradient norm), both
    device tensors: no host-device synchronisation in the step."""

    def model_fn(x_t, t_, y, drop):
        return s.net(x_t, t_, y, force_drop_ids=drop)

    s.opt.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=t.device)
    device = t.device
    for k in range(s.accum):
        sl = slice(k * s.micro, (k + 1) * s.micro)
        xk = x[sl].to(device, non_blocking=True)
        yk = y[sl].to(device, non_blocking=True)
        if s.codec is not None:  # a fresh posterior sample every step, as the paper did
            with torch.no_grad(), s.autocast:
                xk = s.codec.encode(xk, generator=encode_generator)
        sync = s.net.no_sync() if (s.distributed and k < s.accum - 1) else nullcontext()
        with sync, s.autocast:
            # which labels are dropped was drawn with the step's generator (reproducible, independent of the
            # world size); the model's label embedder applies it
            losses = s.objective.training_losses(model_fn, xk, t[sl], {"y": yk, "drop": drop[sl]},
                                                 noise=noise[sl])
            loss = losses["loss"].float().mean() / s.accum
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(s.params, float("inf"))
    s.opt.step()
    update_ema(s.ema_params, s.params, s.ema_decay)
    return loss_sum, grad_norm


#################################################################################
#                                  The loop                                     #
#################################################################################


@dataclass
class Progress:
    """Where a cell's training stands; checkpointed with the weights."""

    step: int = 0
    images_seen: int = 0
    unique_images: int | None = None  # distinct training images (None: a stream that never repeats)
    wall_s_before: float = 0.0  # wall time of earlier attempts
    t_start: float = field(default_factory=time.perf_counter)

    def wall_s(self) -> float:
        return self.wall_s_before + time.perf_counter() - self.t_start


@dataclass
class LogWindow:
    """Training-loss sums since the last log line (device tensors: read only when a line is written)."""

    loss_sum: torch.Tensor
    grad_norm: torch.Tensor
    steps: int = 0
    images_at_start: int = 0
    t_start: float = field(default_factory=time.perf_counter)


def train(cfg: Any) -> dict:
    """Train (or resume) one cell to cfg.train.steps; returns {"run_dir", "step", "state", ...}.

    Raises cli.BadInput for a bad config before any work; records `failed` with the reason (and raises
    TrainingFailed) on a non-finite loss or a failed write; never leaves status.json `running` on error.
    """
    problems = validate(cfg)
    if problems:
        raise cli.BadInput(f"bad cell config: {'; '.join(problems)}")
    env = distributed.init(cfg.device)
    micro, accum = batch_plan(cfg.train.global_batch, env.world_size, cfg.train.batch_per_gpu)
    if env.is_main:
        prepare_run_dir(cfg)
    distributed.barrier()
    run_dir = run_dir_for(cfg)
    with hold(run_dir, "train", env, cfg.lock_wait_s) as held:
        if env.is_main:
            runfolder.remove_temp_files(run_dir)  # torn writes of killed attempts (we hold the folder now)
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.train.tf32)
        dataset = build_dataset(cfg.data, "train")
        codec = build_codec(cfg.data, device=env.device) if data_kind(cfg.data.name).encode_every_step else None
        objective = build_objective(cfg).to(env.device)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(env.device)
        stepper = make_stepper(model, objective, cfg.train, env.device, world_size=env.world_size, micro=micro,
                               accum=accum, codec=codec)
        progress, order = _resume(cfg, env, run_dir, stepper, unique_images(dataset))  # marks the cell running
        try:
            if progress.step >= cfg.train.steps:
                return _finish(cfg, env, run_dir, progress, note="already trained")
            return _loop(cfg, env, run_dir, stepper, progress, order, dataset, codec, held)
        except Preempted:
            raise
        except BaseException as e:  # whatever stopped it, status.json must not say `running`...
            # ...unless the folder is another process's now (not ours to write), or the stop was a preemption
            # handed to submitit, whose handler requeues the job and exits (status says `interrupted`).
            requeued = isinstance(e, SystemExit) and isinstance(e.__context__, Preempted)
            if env.is_main and not held.lost and not requeued:
                _record_failure(run_dir, progress.step, e)
            raise


def _loop(cfg, env, run_dir: Path, stepper: Stepper, progress: Progress, order: DataOrder, dataset, codec,
          held) -> dict:
    """Steps, logs, validates and checkpoints from `progress` to cfg.train.steps; returns the result."""
    tcfg, objective = cfg.train, stepper.objective
    ckpt_dir = run_dir / "checkpoints"
    micro, accum = stepper.micro, stepper.accum
    vs = heldout.validation_set(cfg, objective, codec, env.device, train_dataset=dataset)
    # At the last step the same estimator also reads as many training images: the gap between the two losses is
    # what the model memorised (once per cell: it costs as much as a validation).
    seen = heldout.validation_set(cfg, objective, codec, env.device, train_dataset=dataset, training_images=True,
                                  num_images=vs.x.shape[0]) if vs.heldout else None
    progress.unique_images = unique_images(dataset)
    per_rank = micro * accum
    lo = env.rank * per_rank

    def load(key: tuple[int, torch.Tensor]):
        """This rank's slice of a step's global batch, augmented (flips, latent draws) and pinned."""
        step_k, indices = key
        x, y = dataset.get_batch(indices[lo:lo + per_rank])
        aug_g = torch.Generator().manual_seed(step_seed(cfg.seed, step_k) + AUG_RANK_STRIDE * env.rank)
        x = dataset.augment(x, aug_g)
        if env.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, aug_g

    keep_steps = set(eval_steps(cfg))
    val_steps = keep_steps | set(tcfg.val_at_steps)
    prefetch = Prefetcher(load, depth=tcfg.num_workers)
    prefetch.push((progress.step, order.next_indices()))
    stop = StopFlag()
    stepper.model.train()
    window = LogWindow(torch.zeros((), device=env.device), torch.zeros((), device=env.device),
                       images_at_start=progress.images_seen)
    bar = tqdm(total=tcfg.steps, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not env.is_main or bool(os.environ.get("HARNESS_NO_BAR")))
    run = tracking.open_run(cfg, run_dir, "train") if env.is_main else None
    step = progress.step
    try:
        while progress.step < tcfg.steps:
            x, y, aug_g = prefetch.pop()
            data_state = order.state()  # position after the batch being trained now was taken
            step = progress.step
            if step + 1 < tcfg.steps:
                prefetch.push((step + 1, order.next_indices()))
            g = step_generator(cfg.seed, step, env.device)  # on the device: no host copy, no sync
            t, noise, drop = draw_step(objective, g, tcfg.global_batch, tuple(vs.x.shape[1:]),
                                       tcfg.class_dropout_prob, env.device)
            mine = slice(lo, lo + per_rank)
            loss, window.grad_norm = train_step(stepper, x, y, t[mine], noise[mine], drop[mine], aug_g)
            window.loss_sum += loss
            window.steps += 1
            progress.step = step = step + 1
            progress.images_seen += tcfg.global_batch
            bar.update(1)
            is_ckpt = step % tcfg.ckpt_every == 0 or step in keep_steps or step == tcfg.steps
            is_log = step % tcfg.log_every == 0 or is_ckpt
            stopping = _should_stop(env, stop, held, at_log_step=is_log)
            if is_log or stopping:
                _log(run_dir, env, progress, window, stepper.opt, bar, run)
            if step % tcfg.val_every == 0 or step in val_steps or step == tcfg.steps:
                _validate(run_dir, env, progress, stepper, objective, vs, run, seen if step == tcfg.steps else None)
            if is_ckpt or stopping:
                _save(cfg, env, ckpt_dir, progress, stepper, data_state, keep_steps)
                if env.is_main:
                    update_status(run_dir, step=step, wall_s=progress.wall_s(),
                                  gpu_hours=_gpu_hours(env, progress.wall_s()))
            if stopping:
                raise Preempted(f"stopped at step {step} on request; checkpoint written")
    except Preempted:
        if env.is_main:
            update_status(run_dir, state="interrupted", reason="preempted (USR2): checkpointed, requeued")
        prefetch.close()
        stop.hand_over()
        raise
    except lease.LeaseLost as e:  # the folder is someone else's now: write nothing more
        raise TrainingFailed(f"{e}") from e
    finally:
        prefetch.close()
        stop.restore()
        bar.close()
        tracking.close_run(run)
    return _finish(cfg, env, run_dir, progress)


def _should_stop(env, stop: StopFlag, held, at_log_step: bool) -> bool:
    """Whether to checkpoint and stop after this step (USR2); raises lease.LeaseLost when the folder was taken
    over (our heartbeat stalled), so that nothing more is written. One process acts at the next step. In a
    process group every rank must stop at the same step (a collective entered by one rank alone hangs), and
    SLURM's signal reaches the ranks at different steps: the ranks agree at log steps (an all-reduce there,
    never between them: the step itself stays free of host syncs)."""
    if env.world_size == 1:
        held.check()
        return stop.requested
    if not at_log_step:
        return False
    lost_here = None
    try:
        held.check()  # rank 0 holds the folder; the other ranks' check never raises
    except lease.LeaseLost as e:
        lost_here = e
    requested, lost = distributed.any_rank([stop.requested, lost_here is not None], env.device)
    if lost_here is not None:
        raise lost_here
    if lost:
        raise lease.LeaseLost("rank 0 lost the run folder's lease: stopping without writing")
    return requested


def _record_failure(run_dir: Path, step: int, e: BaseException) -> None:
    """Marks the cell failed (or interrupted, for ^C) with the error in one line; never raises."""
    state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
    if isinstance(e, TrainingFailed):
        reason = str(e)
    else:
        reason = f"{type(e).__name__} at step {step}: {cli.one_line(e)}"
    try:
        update_status(run_dir, state=state, reason=reason, step=step)
    except OSError as write_error:  # the disk that failed the run may fail this too: say it where we can
        log.error("could not record the failure of %s in its status.json (%s): %s", run_dir, write_error, reason)


def _resume(cfg, env, run_dir: Path, s: Stepper, n_items: int | None) -> tuple[Progress, DataOrder]:
    """Loads the newest usable checkpoint into the stepper; returns where training stands. Marks the run
    started in status.json (rank 0). Refuses to train again from step 0 a cell whose log shows it trained
    further, unless train.restart is set (then the restart is marked and the old results set aside)."""
    ckpt_dir = run_dir / "checkpoints"
    state = checkpoint.load_latest(ckpt_dir, map_location="cpu")
    progress, order = Progress(), DataOrder(n_items, cfg.seed, cfg.train.global_batch)
    if state is not None:
        if state.get("config_hash") != config_hash(cfg):
            raise ValueError(f"checkpoint in {ckpt_dir} belongs to another config; refusing to resume")
        s.model.load_state_dict(state["model"])
        s.ema.load_state_dict(state["ema"])
        s.opt.load_state_dict(state["opt"])
        checkpoint.set_rng_state(state["rng"])
        progress = Progress(step=state["step"], images_seen=state["images_seen"],
                            wall_s_before=state.get("wall_s", 0.0))
        order = DataOrder(n_items, cfg.seed, cfg.train.global_batch, **state["data"])
        log.info("resumed %s from %s", run_dir.name, checkpoint.describe_state(state))
    # A log that went past a checkpoint step with no usable checkpoint left means the checkpoints were deleted
    # (or all are corrupt): training again from step 0 would silently redo (and double-log) that work. A log
    # that reaches the first checkpoint step only is a kill while that checkpoint was written: train again.
    logged = runfolder.logged_step(run_dir / "metrics.jsonl")
    first_ckpt = min(cfg.train.ckpt_every, *eval_steps(cfg))
    lost = state is None and logged > first_ckpt
    if lost and not cfg.train.restart:
        raise cli.BadInput(
            f"{run_dir.name}: metrics.jsonl reaches step {logged} but there is no usable checkpoint (deleted?); "
            "not training again from step 0. Pass train.restart=true to start over (the log marks the restart "
            "and the results read only the new run)"
        )
    if env.is_main:
        try:
            _mark_started(cfg, run_dir, progress.step, lost, logged, resumed=state is not None)
        except BaseException as e:  # a full disk, say: the status must not stay `running`
            _record_failure(run_dir, progress.step, e)
            raise
    distributed.barrier()
    return progress, order


def _mark_started(cfg, run_dir: Path, step: int, lost: bool, logged: int, resumed: bool) -> None:
    """Marks the attempt in status.json and the log (a resume or a restart that sets the old results aside)."""
    status = read_status(run_dir)
    update_status(run_dir, state="running", reason=None, attempts=status.get("attempts", 0) + 1,
                  step=step, total_steps=cfg.train.steps, started=status.get("started") or time.time(),
                  torch_threads=torch.get_num_threads())  # CPU float sums depend on it
    if lost:
        archive = runfolder.set_aside_results(run_dir)
        append_jsonl(run_dir / "metrics.jsonl", {"event": "restart", "step": step, "from_step": logged,
                                                 "results_set_aside": archive})
        log.warning("%s: restarting at step %d (log reached %d); old results moved to %s", run_dir.name, step,
                    logged, archive)
    elif resumed or status.get("attempts"):
        append_jsonl(run_dir / "metrics.jsonl", {"event": "resume", "step": step})


def _log(run_dir, env, progress: Progress, w: LogWindow, opt, bar, run) -> None:
    """Writes one training line (mean loss since the last line); raises TrainingFailed on a non-finite loss."""
    loss_value = float(distributed.all_reduce_mean(w.loss_sum.clone()) / max(1, w.steps))
    grad_norm = float(w.grad_norm)
    if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
        raise TrainingFailed(f"non-finite loss {loss_value} at step {progress.step}; stopped, not saved")
    now = time.perf_counter()
    rec = {"step": progress.step, "images_seen": progress.images_seen,
           "epochs": epochs(progress.images_seen, progress.unique_images), "loss": loss_value, "grad_norm": grad_norm,
           "lr": opt.param_groups[0]["lr"],
           "images_per_s": (progress.images_seen - w.images_at_start) / max(now - w.t_start, 1e-9),
           "wall_s": progress.wall_s()}
    w.loss_sum.zero_()
    w.steps, w.images_at_start, w.t_start = 0, progress.images_seen, now
    if env.is_main:
        append_jsonl(run_dir / "metrics.jsonl", rec)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        tracking.log_line(run, rec, "train")


def epochs(images_seen: int, unique: int | None) -> float | None:
    """Returns how many times the training set was gone through: images seen / distinct training images (None for
    a stream that never repeats). Past about 4, repeated images are worth less than fresh ones (Muennighoff et al.
    2023)."""
    return None if not unique else images_seen / unique


def _validate(run_dir, env, progress: Progress, s: Stepper, objective, vs: heldout.ValidationSet, run,
              seen: heldout.ValidationSet | None = None) -> None:
    """Writes the validation line: the loss of the model and of its EMA on the fixed held-out set, with standard
    errors (harness.heldout), the epochs the step is at, and with `seen` the same on a fixed training batch."""
    t0 = time.perf_counter()
    rec = {"step": progress.step, "images_seen": progress.images_seen,
           "epochs": epochs(progress.images_seen, progress.unique_images),
           "unique_train_images": progress.unique_images,
           **heldout.validation_record(s.model, s.ema, objective, vs, s.autocast)}
    if seen is not None:
        on_training = heldout.validation_record(s.model, s.ema, objective, seen, s.autocast)
        rec.update({k: v for k, v in on_training.items() if k != "validation"},
                   train_batch_validation=on_training["validation"])
    rec["val_wall_s"] = time.perf_counter() - t0  # what validating cost: its share of the cell's wall time
    if env.is_main:
        append_jsonl(run_dir / "metrics.jsonl", rec)
        tracking.log_line(run, rec, "val")


def _finish(cfg, env, run_dir, progress: Progress, note=None) -> dict:
    wall_s = progress.wall_s()
    if env.is_main:
        runfolder.remove_temp_files(run_dir)
        update_status(run_dir, state="finished", reason=note, step=progress.step, wall_s=wall_s,
                      gpu_hours=_gpu_hours(env, wall_s))
    return {"run_dir": str(run_dir), "step": progress.step, "images_seen": progress.images_seen,
            "state": "finished", "wall_s": wall_s}


def _gpu_hours(env: distributed.DistEnv, wall_s: float) -> float:
    """Returns GPU-hours spent (0 on the CPU): wall time times the number of GPU processes."""
    return wall_s / 3600.0 * env.world_size if env.device.type == "cuda" else 0.0


def _save(cfg, env, ckpt_dir, progress: Progress, s: Stepper, data_state, keep_steps) -> None:
    if env.is_main:
        state = {
            "model": s.model.state_dict(), "ema": s.ema.state_dict(), "opt": s.opt.state_dict(),
            "step": progress.step, "images_seen": progress.images_seen, "rng": checkpoint.rng_state(),
            "unique_train_images": progress.unique_images,
            "data": data_state, "config": OmegaConf.to_container(cfg, resolve=True),
            "config_hash": config_hash(cfg), "git_commit": checkpoint.git_commit(), "wall_s": progress.wall_s(),
        }
        checkpoint.save(ckpt_dir, progress.step, state)
        checkpoint.prune(ckpt_dir, cfg.train.keep_last, keep_steps)
    distributed.barrier()


#################################################################################
#                                    The CLI                                    #
#################################################################################


@cli.guard
def main(argv: list[str] | None = None) -> dict:
    """`python -m harness.train KEY=VALUE ...`: compose the cell's config (conf/), train it."""
    cfg = compose_cli_config(argv)
    try:
        result = train(cfg)
    except cli.MissingWeights:
        raise  # what to fetch and where: said by cli.guard like bad input
    except (TrainingFailed, OSError) as e:  # the run failed (its status.json says why): one line, exit 1
        if cli.debug():
            raise
        cli.fail(f"{cell_id(cfg)} failed: {read_status(run_dir_for(cfg)).get('reason') or e}", code=cli.FAILED_EXIT)
    print(f"trained {result['run_dir']} to step {result['step']} ({result['images_seen']} images)")
    return result


def compose_cli_config(argv: list[str] | None = None):
    """Returns the config composed from conf/ with the command line's overrides (cli.BadInput naming a bad
    override, before anything is created)."""
    return compose(list(argv) if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
