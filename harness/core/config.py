"""Typed configuration of one cell, registered with Hydra's ConfigStore.

Every component receives only its own sub-config. The schema is structured (dataclasses), so a typo in a
key or a wrong type is an error at composition time, never a silent default. The checks a type cannot
express (allowed values, divisibility, paths) live with the cell (`harness.cell.validate`), which reports
every problem of a grid at once, before anything is submitted.

Each field also says whether it is part of a cell's identity (the hash in its run-folder name), with one of
three roles, so that upgrading the harness never renames a cell of a running study:
- `identity(x)`: a field every cell id has hashed since the first release, with its value, default or not;
- `runtime(x)`: never part of the identity (how a run is observed, where and how fast it runs);
- no role (a plain default): a field added later. It enters the hash only when its value differs from its
  `neutral` value (metadata; default: the field's default), the value that reproduces what cells did
  before the field existed. So adding a defaulted field leaves every existing cell id unchanged, and a
  cell that sets it to something else is a new cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from harness.core.cli import BadInput

# One home for the repository's folders: the Hydra config tree and the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
SWEEPS_DIR = REPO_ROOT / "sweeps"  # the named grids: options of the config group `sweeps`

PATCH_SIZES = (2, 4, 8)  # the paper's patch sizes (Table 4)
# Held-out images a validation reads when train.val_images is None (and the split has as many): enough for a
# standard error near 1% of the loss, few enough that validating both weights stays a small share of training.
DEFAULT_VAL_IMAGES = 1024
CONDS = ("in_context", "cross_attn", "adaln", "adaln_zero")  # the conditioning variants (paper Fig 3, 5)
PRECISIONS = ("auto", "fp32", "bf16")
DDPM_SAMPLERS = ("ddpm", "ddim")
FLOW_SAMPLERS = ("euler", "heun", "sde")
SAMPLERS = DDPM_SAMPLERS + FLOW_SAMPLERS
OBJECTIVES = ("ddpm", "flow")
TIME_SAMPLINGS = ("uniform", "logit_normal")
PARAMETRIZATIONS = ("sp", "mup")
LABEL_SAMPLINGS = ("uniform", "balanced")
WEIGHTS = ("ema", "model")
WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("auto", "cpu", "cuda")
STAGES = ("all", "train", "eval")

ROLE = "identity_role"  # dataclass field metadata key
ALWAYS, NEVER = "always", "never"
NEUTRAL = "neutral"  # metadata key: the value under which an added field stays out of the hash
APPLIES_IF = "applies_if"  # metadata key: (sibling field, value) without which the field has no effect


def identity(default: Any) -> Any:
    """A field that has always named the cell: hashed with its value, default or not."""
    return field(default=default, metadata={ROLE: ALWAYS})


def runtime(default: Any = MISSING, *, factory: Any = None) -> Any:
    """A field that never names the cell (bookkeeping, speed, where results go)."""
    if factory is not None:
        return field(default_factory=factory, metadata={ROLE: NEVER})
    return field(default=default, metadata={ROLE: NEVER})


def added(default: Any, *, neutral: Any, applies_if: tuple[str, Any] | None = None) -> Any:
    """A field added after cells existed: hashed only when its value differs from `neutral` (and, with
    `applies_if=(sibling, value)`, only when the sibling field holds that value: otherwise it has no effect)."""
    meta = {NEUTRAL: neutral}
    if applies_if is not None:
        meta[APPLIES_IF] = applies_if
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """Transformer size; patch and conditioning are swept keys of the cell, not of the size."""

    name: str = identity(MISSING)  # S, B, L, XL, or an off-paper label such as "demo-S"
    depth: int = identity(MISSING)
    hidden_size: int = identity(MISSING)
    num_heads: int = identity(MISSING)
    off_paper: bool = identity(False)  # sizes the paper never trained (CPU demo): labelled in every table
    grad_checkpoint: bool = runtime(False)
    # sp: the paper's standard parametrization. mup: maximal update parametrization (Yang et al., Tensor
    # Programs V), whose best learning rate at mup_base_width transfers to wider models.
    parametrization: str = added("sp", neutral="sp")
    mup_base_width: int | None = added(None, neutral=None, applies_if=("parametrization", "mup"))


@dataclass
class DataConfig:
    name: str = identity("digits")  # a kind of harness.data.datasets.DATA_KINDS: digits, imagefolder, latents, ...
    path: str | None = identity(None)  # image folder root or latent shard folder
    # The held-out images of a path-based kind (validation loss, metric floors). None: the kind's own held-out split,
    # else `<path>/../val` for an image folder `<...>/train`, `<path>/val` for latent shards, when it exists.
    val_path: str | None = runtime(None)
    image_size: int = identity(16)  # pixel resolution (digits are resized to it; ImageNet 256 or 512)
    num_classes: int = identity(10)
    channels: int = identity(1)  # pixel channels of the data set (digits 1, ImageNet 3)
    vae: str = identity("stabilityai/sd-vae-ft-ema")  # hub id or local folder; unused in pixel space
    synthetic_count: int = identity(4096)


FLOW = ("name", "flow")


@dataclass
class ObjectiveConfig:
    """What the network learns. ddpm: the paper's (1000-step linear schedule, eps prediction, learned sigma,
    hybrid loss). flow: rectified flow (linear interpolant, velocity prediction; SiT, SD3)."""

    name: str = added("ddpm", neutral="ddpm")
    time_sampling: str = added("uniform", neutral="uniform", applies_if=FLOW)  # uniform | logit_normal (SD3)
    logit_normal_loc: float = added(0.0, neutral=0.0, applies_if=FLOW)
    logit_normal_scale: float = added(1.0, neutral=1.0, applies_if=FLOW)


@dataclass
class TrainConfig:
    """The paper's recipe (section 4: AdamW 1e-4, batch 256, EMA 0.9999, 400K steps): the defaults here are
    its one home; `conf/train/paper.yaml` selects them. The global batch is the experimental variable."""

    steps: int = identity(400_000)
    global_batch: int = identity(256)
    batch_per_gpu: int | None = runtime(None)  # micro-batch per process; None: global_batch / world_size
    lr: float = identity(1e-4)
    weight_decay: float = identity(0.0)
    ema_decay: float = identity(0.9999)
    class_dropout_prob: float = identity(0.1)
    log_every: int = runtime(100)
    val_every: int = runtime(5000)
    # Steps to validate at besides every val_every (log-spaced for a scaling study: its IsoFLOP profiles read each
    # cell early and late); evaluation steps and the last step are always validated.
    val_at_steps: list[int] = runtime(factory=list)
    # The fixed validation batch of earlier versions (training images): part of every cell's name since the first
    # release, so it stays, unused; the validation loss now reads val_images held-out images (harness.heldout).
    val_batch: int = identity(256)
    val_images: int | None = runtime(None)  # held-out images per validation; None: the split, at most 1,024
    # (DEFAULT_VAL_IMAGES)
    val_times: int = runtime(8)  # times per image, at the midpoints of equal strata of the time distribution
    ckpt_every: int = runtime(50_000)
    keep_last: int = runtime(2)  # newest checkpoints kept besides those at evaluation steps
    precision: str = identity("auto")  # auto | fp32 | bf16 (autocast; master weights fp32). auto: bf16 on CUDA
    tf32: bool = runtime(True)
    compile: bool | None = runtime(None)  # torch.compile the model; None: on CUDA only
    fused_adam: bool = runtime(True)  # fused AdamW on CUDA, foreach on the CPU
    num_workers: int = runtime(2)  # loader threads (prefetch); 0 loads in the training thread
    wandb: str = runtime("offline")  # offline | online | disabled
    # A cell whose log reaches past its newest usable checkpoint (checkpoints deleted) refuses to train
    # again from step 0 unless this is set; the restart is then marked in metrics.jsonl.
    restart: bool = runtime(False)


@dataclass
class EvalConfig:
    """How a checkpoint becomes a metric record (paper section 5). Default: the grid's FID-50K.

    The roles name an evaluation record (harness.evaluate), as they name a cell: an evaluation made before a
    field was added still counts as made with that field's neutral value."""

    preset: str = runtime("fid50k")
    num_samples: int = identity(50_000)
    sampler: str = identity("ddpm")  # ddpm | ddim for objective=ddpm; euler | heun | sde for objective=flow
    sampling_steps: str = identity("250")  # ddpm: respacing string ("250", "ddim50"); flow: number of steps ("50")
    cfg_scale: float = identity(1.0)  # 1.0: no guidance (the grid's protocol)
    cfg_channels: int | None = identity(None)  # None: guide every channel; 3 reproduces the public code
    label_sampling: str = identity("uniform")  # uniform | balanced
    weights: str = identity("ema")  # ema | model
    every_steps: int = runtime(50_000)  # evaluate checkpoints at multiples of this (paper Fig 6)
    at_steps: list[int] = runtime(factory=list)  # explicit steps; overrides every_steps when set
    batch_size: int = runtime(125)
    shard_size: int = runtime(1000)  # samples per resumable shard (independent of batch size and world size)
    extractor: str | None = identity(None)  # None: the data set kind's extractor (digits-cnn, inception-v3-compat)
    # Not part of a record's identity: a record made with fewer metrics is completed, never duplicated.
    metrics: list[str] = field(default_factory=lambda: ["fid", "isc", "kid", "prc"])
    reference_split: str = identity("train")  # ADM's reference is the training set; digits use their test split
    # ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz, arr_0 N x H x W x 3 uint8): the paper's
    # ImageNet statistics, without reading 1.28M images. None: the data set's own `reference_split`.
    reference_npz: str | None = identity(None)
    dinov2_model: str = added("dinov2-vit-l-14", neutral="dinov2-vit-l-14")  # the feature space of fd_dinov2
    save_png: bool = runtime(False)
    seed: int = identity(0)  # sample i uses seed (seed, i): the same images whatever the world size or batch


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
class WandbConfig:
    """Where a cell's wandb run goes (harness.tracking); the mode is train.wandb (offline, online, disabled)."""

    project: str = "harness"
    entity: str | None = None  # None: the account's default entity
    group: str | None = None  # None: the sweep's name (sweep_name)
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: int = identity(2)
    cond: str = identity("adaln_zero")
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = runtime(factory=EvalConfig)
    resources: ResourcesConfig = runtime(factory=ResourcesConfig)
    wandb: WandbConfig = runtime(factory=WandbConfig)
    seed: int = identity(0)
    sweep_name: str = runtime("default")
    out_dir: str = runtime("outputs/${sweep_name}")  # the sweep folder; each cell writes <out_dir>/<cell_id>/
    device: str = runtime("auto")
    plan: bool = runtime(False)  # print the plan of the grid and exit
    # A sweep that would run over an hour on this machine's CPU (no SLURM launcher, no GPU) starts only with this.
    confirm_local: bool = runtime(False)
    stage: str = runtime("all")  # all | train | eval
    report: bool = runtime(True)  # write the sweep report when the last cell finishes
    # Seconds to wait for a run folder held by another process (harness.core.lease). None: wait only when this
    # is a requeued SLURM job whose previous attempt may still hold it; refuse at once otherwise.
    lock_wait_s: float | None = runtime(None)


#################################################################################
#                        Identity: what names a cell                            #
#################################################################################


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _named_values(node: Any, schema: type, neutral_too: bool = False) -> dict:
    """The values of `node` (a section or the whole config) that name a cell, by their roles in `schema` (with
    `neutral_too`, also those of added fields at their neutral value: every value that changes what is trained)."""
    out = {}
    for f in dataclasses.fields(schema):
        role = f.metadata.get(ROLE)
        if role == NEVER:
            continue
        if APPLIES_IF in f.metadata:  # e.g. a muP base width does nothing to an sp cell
            sibling, value = f.metadata[APPLIES_IF]
            if node[sibling] != value:
                continue
        sub = section_schema(f.name, schema)
        value = node[f.name]
        if sub is not None:
            named = _named_values(value, sub, neutral_too)
            if named:  # a section whose fields all hold their neutral values adds nothing
                out[f.name] = named
            continue
        value = _plain(value)
        if neutral_too or role == ALWAYS or value != _plain(f.metadata.get(NEUTRAL, _field_default(f))):
            out[f.name] = value
    return out


def identity(cfg: Any) -> dict:
    """Returns the canonical dict that names a cell: the values that change the trained network."""
    return _named_values(cfg, Config)


def config_hash(cfg: Any) -> str:
    """Returns the sha256 (64 hex digits) of the canonical JSON of the cell's identity."""
    blob = json.dumps(identity(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# The axes a scaling law fits along: a cell's size, how long it trains, and its seed. Cells that differ in anything
# else that changes what is trained (learning rate, batch, EMA, data, objective, ...) are different experiments,
# which one law never fits together unless asked to (harness.results.alike).
LAW_AXES = ("model.name", "model.depth", "model.hidden_size", "model.num_heads", "model.off_paper", "patch",
            "train.steps", "seed")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def training_settings(cfg: Any) -> dict:
    """Returns every value that changes what a cell trains, off the law's axes, as {"train.lr": 1e-4, ...}: what
    two cells must share for one scaling law to fit them together."""
    return {k: v for k, v in _flatten(_named_values(cfg, Config, neutral_too=True)).items() if k not in LAW_AXES}


def register_configs() -> None:
    """Register the schema so conf/config.yaml composes onto typed nodes, each named grid of sweeps/ as an option
    of the group `sweeps` (at the config's root, as its `# @package _global_` header says), and each grid's own
    groups (sweeps/<group>/*.yaml): Hydra finds them without a search path over the repository."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for path in named_sweeps():
        cs.store(group="sweeps", name=path.stem, node=OmegaConf.load(path), package="_global_", provider="harness")
    # A grid whose cells differ in more than one value at once (a size and its training duration) sweeps a group of
    # its own: sweeps/<group>/<option>.yaml, each option the values of one cell, at the config's root.
    for path in sorted(SWEEPS_DIR.glob("*/*.yaml")):
        cs.store(group=path.parent.name, name=path.stem, node=OmegaConf.load(path), package="_global_",
                 provider="harness")


def named_sweeps() -> list[Path]:
    """Returns the files of the named grids (sweeps/*.yaml), sorted by name."""
    return sorted(SWEEPS_DIR.glob("*.yaml"))


def sweep_description(path: Path) -> str:
    """Returns a named grid's one-line description: the first sentence of its header comment."""
    lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
    text = " ".join(ln for ln in lines if not ln.startswith("@package"))
    for end in (". ", "? "):
        if end in text:
            text = text[: text.index(end) + 1]
    return text


register_configs()


def section_schema(name: str, schema: type | None = None) -> type | None:
    """The dataclass of a config section (`model`, `train`, ...), None for a plain field."""
    f = {f.name: f for f in dataclasses.fields(schema or Config)}.get(name)
    if f is None or f.default_factory is dataclasses.MISSING:
        return None
    made = f.default_factory
    return made if dataclasses.is_dataclass(made) else None


def unknown_keys(cfg: Any, schema: type | None = None, prefix: str = "") -> list[str]:
    """Keys present in `cfg` that the schema (default: Config) does not define (Hydra's `+key=value` adds them)."""
    schema = schema or Config
    known = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            out.append(f"unknown key {prefix}{key!s}; allowed: {', '.join(f.name for f in dataclasses.fields(schema))}")
            continue
        sub = section_schema(key, schema)
        if sub is not None and isinstance(cfg[key], DictConfig):
            out += unknown_keys(cfg[key], sub, f"{prefix}{key}.")
    return out


def eval_steps(cfg: Any) -> list[int]:
    """Training steps whose checkpoints are evaluated (always including the last one)."""
    if cfg.eval.at_steps:
        steps = set(cfg.eval.at_steps)
    else:
        steps = set(range(cfg.eval.every_steps, cfg.train.steps + 1, cfg.eval.every_steps))
    steps.add(cfg.train.steps)
    return sorted(steps)


def compact_error(e: BaseException) -> str:
    """Returns Hydra's composition error in one line: what was wrong and, for a missing option, what is allowed."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # Hydra keeps the reason of a bad override (wrong type, unknown key) in the chained OmegaConf error.
    cause = [ln.strip() for ln in str(e.__cause__ or "").splitlines() if ln.strip()][:1]
    lines += [ln for ln in cause if ln not in lines]
    if not lines:
        return type(e).__name__
    if "Available options" in str(e):
        i = next(k for k, ln in enumerate(lines) if ln.startswith("Available options"))
        options = [ln for ln in lines[i + 1:] if not ln.startswith(("Config search path", "provider="))]
        return f"{lines[0]}; allowed: {', '.join(options)}"
    return " ".join(ln for ln in lines if not ln.startswith(("full_key", "object_type", "provider=")))[:400]


def compose(overrides: list[str]) -> DictConfig:
    """Returns one cell's config composed from conf/ (and the named grids of sweeps/) with `overrides`;
    BadInput with Hydra's error in one line for an unknown key, option or a wrong type."""
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="harness"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - every composition error is an error in the overrides or files
        raise BadInput(compact_error(e)) from e
