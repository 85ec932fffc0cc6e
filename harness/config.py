"""Typed configuration of one cell, registered with Hydra's ConfigStore.

Every component receives only its own sub-config. The schema is structured (dataclasses), so a typo in a
key or a wrong type is an error at composition time, never a silent default. `validate(cfg)` adds the
checks a type cannot express (allowed values, divisibility, paths) and returns every problem at once,
so the sweep can report a whole grid's bad values before anything is submitted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

PRECISIONS = ("auto", "fp32", "bf16")
SAMPLERS = ("ddpm", "ddim")
LABEL_SAMPLINGS = ("uniform", "balanced")
WEIGHTS = ("ema", "model")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    """Transformer size; patch and conditioning are swept keys of the cell, not of the size."""

    name: str = MISSING  # S, B, L, XL, or an off-paper label such as "demo-2x64"
    depth: int = MISSING
    hidden_size: int = MISSING
    num_heads: int = MISSING
    off_paper: bool = False  # true for sizes the paper never trained (CPU demo): labelled in every table
    grad_checkpoint: bool = False


@dataclass
class DataConfig:
    name: str = "digits"  # digits | imagefolder | latents | synthetic
    path: str | None = None  # image folder root or latent shard folder
    image_size: int = 16  # pixel resolution (digits are resized to it; ImageNet 256 or 512)
    num_classes: int = 10
    channels: int = 1  # pixel channels of the data set (digits 1, ImageNet 3)
    vae: str = "stabilityai/sd-vae-ft-ema"  # hub id or local folder; unused in pixel space
    synthetic_count: int = 4096


@dataclass
class TrainConfig:
    """The paper's recipe (section 4 and DIT_FACTS.md) is the default; the global batch is the variable."""

    steps: int = 400_000
    global_batch: int = 256
    batch_per_gpu: int | None = None  # micro-batch per process; None: global_batch / world_size
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    class_dropout_prob: float = 0.1
    log_every: int = 100
    val_every: int = 1000
    val_batch: int = 256  # size of the fixed validation batch (fixed images, timesteps and noise)
    ckpt_every: int = 50_000
    keep_last: int = 2  # newest checkpoints kept besides those at evaluation steps
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; master weights stay fp32). auto: bf16 on CUDA
    tf32: bool = True
    compile: bool | None = None  # torch.compile the model; None: on CUDA only
    fused_adam: bool = True  # fused AdamW on CUDA, foreach on the CPU
    num_workers: int = 2  # loader threads (prefetch); 0 loads in the training thread
    wandb: str = "offline"  # offline | online | disabled


@dataclass
class EvalConfig:
    """How a checkpoint becomes a metric record (DIT_FACTS.md, Evaluation). Default: the grid's FID-50K."""

    preset: str = "fid50k"
    num_samples: int = 50_000
    sampler: str = "ddpm"  # ddpm | ddim
    sampling_steps: str = "250"  # respacing string; "ddim50" style for DDIM
    cfg_scale: float = 1.0  # 1.0: no guidance (the grid's protocol)
    cfg_channels: int | None = None  # None: guide every channel; 3 reproduces the public code
    label_sampling: str = "uniform"  # uniform | balanced
    weights: str = "ema"  # ema | model
    every_steps: int = 50_000  # evaluate checkpoints at multiples of this (paper Fig 6)
    at_steps: list[int] = field(default_factory=list)  # explicit steps; overrides every_steps when set
    batch_size: int = 125
    shard_size: int = 1000  # samples per resumable shard (independent of batch size and world size)
    extractor: str | None = None  # None: digits-cnn for digits, inception-v3-compat otherwise
    metrics: list[str] = field(default_factory=lambda: ["fid", "isc", "kid", "prc"])
    reference_split: str = "test"
    # ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz, arr_0 N x H x W x 3 uint8): the paper's
    # ImageNet statistics, without reading 1.28M images. None: the data set's own `reference_split`.
    reference_npz: str | None = None
    save_png: bool = False
    seed: int = 0  # sample i uses seed (seed, i): the same images whatever the world size or batch


@dataclass
class ResourcesConfig:
    """What one cell asks of the cluster. The rule in `harness.sweep.cell_resources` scales it by cost."""

    gpus_per_node: int = 1
    nodes: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 64
    timeout_min: int = 60 * 24
    gpu_hours_per_gpu_job_max: float = 24.0  # a cell needing more than this many hours per GPU gets more GPUs
    max_gpus: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: int = 2
    cond: str = "adaln_zero"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0
    sweep_name: str = "default"
    out_dir: str = "outputs/${sweep_name}"  # the sweep folder; each cell writes <out_dir>/<cell_id>/
    device: str = "auto"
    plan: bool = False  # print the plan of the grid and exit
    stage: str = "all"  # all | train | eval
    report: bool = True  # write the sweep report when the last cell finishes


def register_configs() -> None:
    """Register the schema so conf/config.yaml composes onto typed nodes."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


register_configs()


# ---- validation: every problem at once, before any work ----

def unknown_keys(cfg: Any, schema: type = None, prefix: str = "") -> list[str]:
    """Keys present in `cfg` that the schema does not define (Hydra's `+key=value` can add them)."""
    import dataclasses

    schema = schema or Config
    known = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            out.append(f"unknown key {prefix}{key!s}; allowed: {', '.join(known)}")
            continue
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(cfg[key], DictConfig):
            out += unknown_keys(cfg[key], sub, f"{prefix}{key}.")
    return out


def validate(cfg: Any) -> list[str]:
    """Return every problem with one cell's config as readable strings (empty when it is fine)."""
    from harness import data, models

    problems: list[str] = unknown_keys(cfg) if isinstance(cfg, DictConfig) else []
    problems += data.validate_data(cfg.data)
    try:
        _, input_size = data.model_input_shape(cfg.data)
    except ValueError:  # unknown data set: already reported above
        input_size = None
    problems += models.validate_arch(
        cfg.model.name, cfg.patch, cfg.cond, input_size,
        hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads,
    )
    t = cfg.train
    for key in ("steps", "global_batch", "log_every", "val_every", "val_batch", "ckpt_every"):
        if getattr(t, key) <= 0:
            problems.append(f"train.{key}={getattr(t, key)} must be positive")
    if t.keep_last < 1:
        problems.append(f"train.keep_last={t.keep_last} must be at least 1")
    if t.lr <= 0:
        problems.append(f"train.lr={t.lr} must be positive")
    if not 0.0 <= t.ema_decay < 1.0:
        problems.append(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if not 0.0 <= t.class_dropout_prob < 1.0:
        problems.append(f"train.class_dropout_prob={t.class_dropout_prob} must be in [0, 1)")
    if t.precision not in PRECISIONS:
        problems.append(f"train.precision={t.precision!r} is not one of {list(PRECISIONS)}")
    if t.wandb not in WANDB_MODES:
        problems.append(f"train.wandb={t.wandb!r} is not one of {list(WANDB_MODES)}")
    for key in ("gpus_per_node", "nodes", "cpus_per_task", "max_gpus"):
        if getattr(cfg.resources, key) < 1:
            problems.append(f"resources.{key}={getattr(cfg.resources, key)} must be at least 1 "
                            "(a cell is one process per GPU; on one machine the value is not used)")
    world = cfg.resources.gpus_per_node * cfg.resources.nodes
    if t.global_batch > 0 and world > 0 and t.global_batch % world:
        problems.append(
            f"train.global_batch={t.global_batch} is not divisible by the {world} GPUs "
            f"(resources.gpus_per_node={cfg.resources.gpus_per_node} x nodes={cfg.resources.nodes})"
        )
    if t.batch_per_gpu is not None and t.global_batch > 0 and world > 0:
        per_rank = t.global_batch // max(world, 1)
        if t.batch_per_gpu <= 0 or per_rank % t.batch_per_gpu:
            problems.append(
                f"train.batch_per_gpu={t.batch_per_gpu} does not divide the per-GPU batch {per_rank}"
            )
    e = cfg.eval
    if e.sampler not in SAMPLERS:
        problems.append(f"eval.sampler={e.sampler!r} is not one of {list(SAMPLERS)}")
    if e.label_sampling not in LABEL_SAMPLINGS:
        problems.append(f"eval.label_sampling={e.label_sampling!r} is not one of {list(LABEL_SAMPLINGS)}")
    if e.weights not in WEIGHTS:
        problems.append(f"eval.weights={e.weights!r} is not one of {list(WEIGHTS)}")
    if e.num_samples <= 0:
        problems.append(f"eval.num_samples={e.num_samples} must be positive")
    if e.batch_size <= 0 or e.shard_size <= 0:
        problems.append(f"eval.batch_size={e.batch_size} and eval.shard_size={e.shard_size} must be positive")
    if e.cfg_scale < 1.0:
        problems.append(f"eval.cfg_scale={e.cfg_scale} must be >= 1 (1 means no guidance)")
    if e.every_steps <= 0:
        problems.append(f"eval.every_steps={e.every_steps} must be positive")
    for s in e.at_steps:
        if s <= 0 or (t.steps > 0 and s > t.steps):
            problems.append(f"eval.at_steps contains {s}: evaluation steps must lie in 1..train.steps={t.steps}")
    if cfg.device not in DEVICES:
        problems.append(f"device={cfg.device!r} is not one of {list(DEVICES)}")
    if cfg.stage not in ("all", "train", "eval"):
        problems.append(f"stage={cfg.stage!r} is not one of ['all', 'train', 'eval']")
    if cfg.seed < 0:
        problems.append(f"seed={cfg.seed} must be non-negative")
    return problems


def eval_steps(cfg: Any) -> list[int]:
    """Training steps whose checkpoints are evaluated (always including the last one)."""
    if cfg.eval.at_steps:
        steps = set(cfg.eval.at_steps)
    else:
        steps = set(range(cfg.eval.every_steps, cfg.train.steps + 1, cfg.eval.every_steps))
    steps.add(cfg.train.steps)
    return sorted(steps)


# ---- identity: run folders are named from their config ----

# The parts of a cell config that change what is trained. Evaluation, resources and bookkeeping settings
# are left out on purpose: re-evaluating a cell with another preset, or giving it more GPUs, is the same
# cell (the global batch, not the GPU count, is the experimental variable).
IDENTITY_KEYS = ("model", "patch", "cond", "data", "train", "seed")
TRAIN_KEYS_NOT_IDENTITY = (
    "log_every", "val_every", "ckpt_every", "keep_last", "compile", "tf32", "fused_adam",
    "num_workers", "wandb", "batch_per_gpu",
)
MODEL_KEYS_NOT_IDENTITY = ("grad_checkpoint",)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def identity(cfg: Any) -> dict:
    """The canonical dict that names a cell: what changes the trained network, nothing else."""
    ident = {k: _plain(cfg[k]) for k in IDENTITY_KEYS}
    ident["train"] = {k: v for k, v in ident["train"].items() if k not in TRAIN_KEYS_NOT_IDENTITY}
    ident["model"] = {k: v for k, v in ident["model"].items() if k not in MODEL_KEYS_NOT_IDENTITY}
    return ident


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of the cell's identity (64 hex digits)."""
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cell_id(cfg: Any) -> str:
    """Readable, deterministic run-folder name, e.g. `DiT-B-4_adaln_zero_digits_s0_1a2b3c4d`."""
    return f"DiT-{cfg.model.name}-{cfg.patch}_{cfg.cond}_{cfg.data.name}_s{cfg.seed}_{config_hash(cfg)[:8]}"
