"""The cell: one (model size, patch, conditioning, data set, objective, seed) of a grid, and its run folder.

Everything that says what a cell is lives here, for the trainer, the evaluation, the sweep and the
benchmarks alike: its identity (the run-folder name), the checks of its config, the facts the analysis
needs (cell.json), and how its network, objective and codec are built.

Identity. A cell id is `DiT-<model>-<patch>_<cond>_<data>_s<seed>_<hash8>`; the hash is the sha256 of the
canonical JSON of the config values that change what is trained. Which values those are is declared in
the schema (harness.core.config: `identity`, `runtime`, `added`): a field added after cells existed enters the
hash only when it differs from its neutral value, so upgrading the harness never renames a cell of a
running study, and a changed value that matters is a new cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from harness.core import checkpoint, distributed, lease, vocabulary
from harness.core.config import (  # noqa: F401 - identity and config_hash are part of the cell's interface
    CONF_DIR,
    DDPM_SAMPLERS,
    DEVICES,
    FLOW_SAMPLERS,
    LABEL_SAMPLINGS,
    OBJECTIVES,
    PRECISIONS,
    STAGES,
    TIME_SAMPLINGS,
    WANDB_MODES,
    WEIGHTS,
    Config,
    EvalConfig,
    config_hash,
    identity,
    training_settings,
    unknown_keys,
)
from harness.core.runfolder import atomic_write_bytes, atomic_write_json, read_json
from harness.data import datasets
from harness.diffusion import DEFAULT_DIFFUSION_STEPS, create_diffusion, create_flow, space_timesteps
from harness.model import dit, flops

CELL_FILE = "cell.json"
CONFIG_FILE = "config.yaml"

#################################################################################
#                                  Identity                                     #
#################################################################################


def cell_id(cfg: Any) -> str:
    """Returns the readable, deterministic run-folder name, e.g. `DiT-B-4_adaln_zero_digits_s0_1a2b3c4d`;
    an objective or parametrization other than the paper's is named too (`..._digits_flow_mup_s0_...`)."""
    variant = "".join(f"_{v}" for v, paper in ((cfg.objective.name, "ddpm"), (cfg.model.parametrization, "sp"))
                      if v != paper)
    return (f"DiT-{cfg.model.name}-{cfg.patch}_{cfg.cond}_{cfg.data.name}{variant}_s{cfg.seed}"
            f"_{config_hash(cfg)[:8]}")


#################################################################################
#                                  Validation                                   #
#################################################################################


def _positive(problems: list[str], section: Any, prefix: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if getattr(section, key) <= 0:
            problems.append(f"{prefix}.{key}={getattr(section, key)} must be positive")


def _train_problems(cfg: Any) -> list[str]:
    t, problems = cfg.train, []
    _positive(problems, t, "train", ("steps", "global_batch", "log_every", "val_every", "val_batch", "val_times",
                                     "ckpt_every"))
    if getattr(t, "val_images", None) is not None and t.val_images < 2:
        problems.append(f"train.val_images={t.val_images} must be at least 2 (a standard error needs two images) "
                        "or null (the held-out split, at most 1,024)")
    bad_val = [s for s in t.get("val_at_steps", []) if not 0 < s <= t.steps]
    if bad_val:
        problems.append(f"train.val_at_steps contains {bad_val}: validation steps must lie in 1..train.steps={t.steps}")
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
    return problems


def _resources_problems(cfg: Any) -> list[str]:
    r, t, problems = cfg.resources, cfg.train, []
    for key in ("gpus_per_node", "nodes", "cpus_per_task", "max_gpus"):
        if getattr(r, key) < 1:
            problems.append(f"resources.{key}={getattr(r, key)} must be at least 1 "
                            "(a cell is one process per GPU; on one machine the value is not used)")
    world = r.gpus_per_node * r.nodes
    if t.global_batch > 0 and world > 0 and t.global_batch % world:
        problems.append(f"train.global_batch={t.global_batch} is not divisible by the {world} GPUs "
                        f"(resources.gpus_per_node={r.gpus_per_node} x nodes={r.nodes})")
    if t.batch_per_gpu is not None and t.global_batch > 0 and world > 0:
        per_rank = t.global_batch // max(world, 1)
        if t.batch_per_gpu <= 0 or per_rank % t.batch_per_gpu:
            problems.append(f"train.batch_per_gpu={t.batch_per_gpu} does not divide the per-GPU batch {per_rank}")
    return problems


def _objective_problems(cfg: Any) -> list[str]:
    o, problems = cfg.objective, []
    if o.name not in OBJECTIVES:
        return [f"objective={o.name!r} is not one of {list(OBJECTIVES)}"]
    if o.time_sampling not in TIME_SAMPLINGS:
        problems.append(f"objective.time_sampling={o.time_sampling!r} is not one of {list(TIME_SAMPLINGS)}")
    if o.logit_normal_scale <= 0:
        problems.append(f"objective.logit_normal_scale={o.logit_normal_scale} must be positive")
    return problems


def sampler_problems(objective: str, sampler: str, sampling_steps: Any) -> list[str]:
    """Returns why a sampler setting cannot sample a model trained with `objective` (empty when it can)."""
    if objective not in OBJECTIVES:
        return []  # reported with the objective
    allowed = DDPM_SAMPLERS if objective == "ddpm" else FLOW_SAMPLERS
    if sampler not in allowed:
        return [f"eval.sampler={sampler!r} cannot sample a model trained with objective={objective!r}; "
                f"allowed: {list(allowed)}"]
    if objective == "flow" and not (str(sampling_steps).isdigit() and int(sampling_steps) > 0):
        return [f"eval.sampling_steps={sampling_steps!r}: a flow sampler takes a positive number of steps"]
    if objective == "ddpm":
        try:
            space_timesteps(DEFAULT_DIFFUSION_STEPS, str(sampling_steps) or [DEFAULT_DIFFUSION_STEPS])
        except ValueError as e:
            return [f"eval.sampling_steps={sampling_steps!r}: {e}"]
    return []


def eval_problems(cfg: Any) -> list[str]:
    """Returns every problem of the evaluation settings `cfg.eval` for this cell (empty when fine)."""
    e, problems = cfg.eval, []
    problems += sampler_problems(cfg.objective.name, e.sampler, e.sampling_steps)
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
    if e.cfg_channels is not None and cfg.data.name in datasets.DATA_KINDS:
        channels = datasets.model_input_shape(cfg.data)[0]
        if not 1 <= e.cfg_channels <= channels:
            problems.append(f"eval.cfg_channels={e.cfg_channels}: this cell's model has {channels} input channel(s); "
                            f"allowed: null (all) or 1..{channels}")
    if e.cfg_scale > 1.0 and cfg.train.class_dropout_prob <= 0:
        problems.append(f"eval.cfg_scale={e.cfg_scale}: classifier-free guidance needs a model trained with label "
                        f"dropout, and this cell has train.class_dropout_prob={cfg.train.class_dropout_prob}")
    if e.every_steps <= 0:
        problems.append(f"eval.every_steps={e.every_steps} must be positive")
    for s in e.at_steps:
        if s <= 0 or (cfg.train.steps > 0 and s > cfg.train.steps):
            problems.append(f"eval.at_steps contains {s}: evaluation steps must lie in 1..train.steps="
                            f"{cfg.train.steps}")
    if cfg.data.name in datasets.DATA_KINDS:  # else reported with the data set
        problems += [f"eval.metrics: {p}" for p in vocabulary.metric_problems(list(e.metrics), extractor_for(cfg),
                                                                             e.dinov2_model)]
    return problems


def mup_base_width(cfg: Any) -> int | None:
    """Returns the cell's muP base width, None under sp (where a base width set for a whole grid does nothing)."""
    return cfg.model.mup_base_width if cfg.model.parametrization == "mup" else None


def validate(cfg: Any) -> list[str]:
    """Returns every problem with one cell's config as readable strings (empty when it is fine)."""
    problems: list[str] = unknown_keys(cfg) if isinstance(cfg, DictConfig) else []
    problems += datasets.validate_data(cfg.data)
    try:
        _, input_size = datasets.model_input_shape(cfg.data)
    except ValueError:  # unknown data set: already reported above
        input_size = None
    problems += [f"model.{p}" if p.startswith(("mup_base_width", "parametrization")) else p
                 for p in dit.validate_arch(cfg.model.name, cfg.patch, cfg.cond, input_size,
                                               hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads,
                                               parametrization=cfg.model.parametrization,
                                               mup_base_width=mup_base_width(cfg))]
    problems += _objective_problems(cfg)
    problems += _train_problems(cfg)
    problems += _resources_problems(cfg)
    problems += eval_problems(cfg)
    if cfg.device not in DEVICES:
        problems.append(f"device={cfg.device!r} is not one of {list(DEVICES)}")
    if cfg.stage not in STAGES:
        problems.append(f"stage={cfg.stage!r} is not one of {list(STAGES)}")
    if cfg.seed < 0:
        problems.append(f"seed={cfg.seed} must be non-negative")
    wait_s = cfg.get("lock_wait_s")
    if wait_s is not None and not (wait_s >= 0):  # NaN fails this too
        problems.append(f"lock_wait_s={wait_s} must be a number of seconds >= 0 (or null: the default policy)")
    return problems


def extractor_for(cfg: Any) -> str:
    """Returns the FID feature extractor of a cell's evaluation: eval.extractor, else its data kind's."""
    return cfg.eval.extractor or datasets.data_kind(cfg.data.name).extractor


#################################################################################
#                                  Run folder                                   #
#################################################################################


def run_dir_for(cfg: Any) -> Path:
    """Returns `<out_dir>/<cell_id>`, the cell's run folder."""
    return Path(cfg.out_dir) / cell_id(cfg)


def learn_sigma(cfg: Any) -> bool:
    """Returns whether the network also predicts its variance: the paper's DDPM does, a flow does not."""
    return cfg.objective.name == "ddpm"


def cell_facts(cfg: Any) -> dict:
    """Returns cell.json: what the analysis needs to place a cell, computed once (closed-form counts)."""
    in_channels, input_size = datasets.model_input_shape(cfg.data)
    cost = flops.model_cost(
        cfg.model.name, cfg.patch, cfg.cond, input_size=input_size, in_channels=in_channels,
        num_classes=cfg.data.num_classes, learn_sigma=learn_sigma(cfg), depth=cfg.model.depth,
        hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads, counter="closed_form",
    )
    return {
        "cell_id": cell_id(cfg), "config_hash": config_hash(cfg),
        "model": cfg.model.name, "patch": cfg.patch, "cond": cfg.cond, "data": cfg.data.name,
        "seed": cfg.seed, "input_size": input_size, "in_channels": in_channels,
        "tokens": cost["tokens"], "params": cost["params"], "gflops": cost["gflops"],
        "global_batch": cfg.train.global_batch, "steps": cfg.train.steps,
        "off_paper": bool(cfg.model.off_paper), "depth": cfg.model.depth,
        "hidden_size": cfg.model.hidden_size, "num_heads": cfg.model.num_heads,
        "objective": cfg.objective.name, "parametrization": cfg.model.parametrization,
        "mup_base_width": mup_base_width(cfg), "lr": cfg.train.lr,
        # everything else that changes what is trained: what a law checks before fitting cells together
        "settings": training_settings(cfg),
    }


def write_config(cfg: Any, run_dir: Path) -> None:
    """Writes the resolved config as run_dir/config.yaml, atomically."""
    text = OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    atomic_write_bytes(run_dir / CONFIG_FILE, text.encode())


def prepare_run_dir(cfg: Any) -> Path:
    """Creates (or re-opens) the run folder and returns it; refuses one written by a different config.

    A torn or missing cell.json of a folder that has its config.yaml is rewritten from that config.
    """
    run_dir = run_dir_for(cfg)
    facts = read_facts(run_dir)
    if facts is not None and facts.get("config_hash") != config_hash(cfg):
        raise ValueError(
            f"{run_dir} holds a run of another config (hash {str(facts.get('config_hash', '?'))[:12]}, "
            f"this config {config_hash(cfg)[:12]}); it is left untouched"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    if not (run_dir / CONFIG_FILE).exists():
        write_config(cfg, run_dir)
    if facts is None:
        atomic_write_json(run_dir / CELL_FILE, cell_facts(cfg))
    return run_dir


def read_facts(run_dir: Path) -> dict | None:
    """Returns cell.json, or None when there is none; a torn one is rebuilt from config.yaml when possible."""
    try:
        return read_json(Path(run_dir) / CELL_FILE)
    except ValueError:
        try:
            cfg = load_run_config(run_dir, [])
        except (FileNotFoundError, ValueError):
            return None
        facts = cell_facts(cfg)
        atomic_write_json(Path(run_dir) / CELL_FILE, facts)
        return facts


def load_run_config(run_dir: str | Path, overrides: list[str]) -> DictConfig:
    """Returns a run folder's resolved config on the schema, with `eval=<preset>` and `key=value` overrides.

    Raises FileNotFoundError when the folder has no config.yaml and ValueError naming the file for an
    unreadable config, an unknown key or an unknown preset.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    try:
        saved = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - any YAML error: the file is unreadable
        raise ValueError(f"{path} cannot be read: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(saved, DictConfig):
        raise ValueError(f"{path} does not hold a config (a mapping), got {type(saved).__name__}")
    bad = unknown_keys(saved)
    if bad:
        raise ValueError(f"{path}: " + "; ".join(bad))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), saved)
    except Exception as e:  # noqa: BLE001 - a wrong type in the file
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from e
    presets, rest = CONF_DIR / "eval", []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"bad override {o!r}: expected key=value")
        key, value = o.split("=", 1)
        if key == "eval":
            preset = presets / f"{value}.yaml"
            if not preset.exists():
                allowed = sorted(p.stem for p in presets.glob("*.yaml"))
                raise ValueError(f"unknown eval preset {value!r}; allowed: {allowed}")
            cfg.eval = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(preset))
        else:
            rest.append(o)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))
    except Exception as e:  # noqa: BLE001 - an unknown key or a wrong type in an override
        raise ValueError(f"bad override in {rest}: {str(e).splitlines()[0]}") from e


#################################################################################
#                                    Build                                      #
#################################################################################


def build_model(cfg: Any) -> torch.nn.Module:
    """Returns the cell's DiT, sized from its config and its data set's model-input shape."""
    in_channels, input_size = datasets.model_input_shape(cfg.data)
    return dit.build(
        cfg.model.name, cfg.patch, cfg.cond,
        input_size=input_size, in_channels=in_channels, num_classes=cfg.data.num_classes,
        learn_sigma=learn_sigma(cfg), class_dropout_prob=cfg.train.class_dropout_prob,
        depth=cfg.model.depth, hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads,
        grad_checkpoint=cfg.model.grad_checkpoint,
        parametrization=cfg.model.parametrization, mup_base_width=mup_base_width(cfg),
    )


def build_objective(cfg: Any):
    """Returns what the cell learns and samples with: the paper's diffusion (all 1000 steps) or a flow."""
    o = cfg.objective
    if o.name == "flow":
        return create_flow(time_sampling=o.time_sampling, logit_normal_loc=o.logit_normal_loc,
                           logit_normal_scale=o.logit_normal_scale)
    return create_diffusion("", learn_sigma=learn_sigma(cfg))


def fast_path(tcfg: Any, device: torch.device) -> tuple[str, bool]:
    """Returns (precision, compile) with the per-device defaults: bf16 and torch.compile on CUDA, fp32 eager
    on the CPU (no bf16 matrix units there; docs/benchmarks.md)."""
    precision = tcfg.precision if tcfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    compile_model = tcfg.compile if tcfg.compile is not None else device.type == "cuda"
    return precision, bool(compile_model)


def autocast_for(precision: str, device: torch.device):
    """Returns the autocast context of a precision: bf16 autocast, or none (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def check_checkpoint(run_dir: Path, step: int) -> Path:
    """Returns the path of the cell's checkpoint at `step`; FileNotFoundError (naming the steps there are) when
    there is none, ValueError when it fails its checksum."""
    path = checkpoint.ckpt_path(Path(run_dir) / "checkpoints", step)
    if not path.exists():
        have = checkpoint.list_steps(Path(run_dir) / "checkpoints")
        raise FileNotFoundError(f"no checkpoint for step {step} in {Path(run_dir) / 'checkpoints'} (have steps {have})")
    problem = checkpoint.verify(path)
    if problem:
        raise ValueError(f"checkpoint {path} cannot be trusted: {problem}")
    return path


def load_cell_model(cfg: Any, run_dir: Path, step: int, weights: str, device: torch.device):
    """Returns (model with the checkpoint's weights in eval mode, codec, latent shape (C, H, W)) of a cell.

    Raises FileNotFoundError (naming the steps there are) for a missing checkpoint and ValueError for one
    that fails its checksum.
    """
    path = check_checkpoint(run_dir, step)
    model = build_model(cfg)
    dit.load_checkpoint(checkpoint.load(path), model, key=weights)
    model.to(device).eval()
    in_channels, input_size = datasets.model_input_shape(cfg.data)
    return model, datasets.build_codec(cfg.data, device=device), (in_channels, input_size, input_size)


#################################################################################
#                         One writer per run folder                             #
#################################################################################


class _NotHolding:
    """What ranks other than 0 get from `hold`: rank 0 holds the folder for the whole process group."""

    lost = False

    def check(self) -> None:
        return None


@contextmanager
def hold(run_dir: Path, purpose: str, env: distributed.DistEnv, wait_s: float | None) -> Iterator[Any]:
    """Holds the cell's run folder (harness.core.lease) for this process group while the block runs.

    Rank 0 takes the lease; every rank raises lease.LeaseHeld (naming the holder) when it cannot. wait_s:
    seconds to wait for another holder; None: the default policy (a requeued SLURM job waits for its earlier
    attempt, anything else refuses at once); inf: wait as long as the holder lives. Re-entrant: the
    sweep's task holds the folder across training and evaluation, which hold it again inside.
    """
    wait = lease.default_wait_s if wait_s is None else (None if wait_s == float("inf") else float(wait_s))
    held, refusal = None, None
    if env.is_main:
        try:
            held = lease.CellLease(run_dir, purpose, wait_s=wait).acquire()
        except lease.LeaseHeld as e:
            refusal = str(e)
    refusal = distributed.broadcast_object(refusal)
    if refusal is not None:
        raise lease.LeaseHeld(refusal, None, Path(run_dir) / lease.LEASE_FILE, 0.0)
    try:
        yield held if held is not None else _NotHolding()
    finally:
        if held is not None:
            held.release()
