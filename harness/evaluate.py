"""Evaluation as a stage: a checkpoint becomes `evals/step_N.json`, every setting recorded beside the metrics.

    python -m harness.evaluate run_dir=outputs/demo/DiT-demo-S-2_... step=300
    python -m harness.evaluate run_dir=... step=all eval=fid10k    # every evaluation step, another preset
    python -m harness.evaluate run_dir=... step=400000 eval=fid50k_cfg   # the paper's guided protocol

Samples are written shard by shard (`harness.sample`), so a killed evaluation resumes without redoing
finished shards. A record is written atomically once the metrics exist. Records are named by their
settings (the fields of EvalConfig that name an evaluation, harness.core.config), never by the metric list:
an evaluation with the same settings and a metric the record lacks adds that metric to the record (from the
same samples), never a second record; one made with other settings is never overwritten: it goes to
`evals/step_N_<settings-hash>.json` beside the first.
"""

from __future__ import annotations

# --help answers before anything heavy is imported (torch, Hydra's loader): in well under a second.
from harness.core.help import exit_with_help_if_asked

exit_with_help_if_asked("evaluate", __name__)

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness import heldout, tracking
from harness.cell import (
    autocast_for,
    build_model,
    build_objective,
    check_checkpoint,
    eval_problems,
    extractor_for,
    fast_path,
    hold,
    load_cell_model,
    load_run_config,
    run_dir_for,
)
from harness.core import checkpoint, cli, distributed
from harness.core.config import ALWAYS, NEUTRAL, NEVER, ROLE, EvalConfig, eval_steps
from harness.core.runfolder import append_jsonl, atomic_write_json, read_json, read_jsonl
from harness.core.vocabulary import METRIC_OF_KEY, weights_id
from harness.data.datasets import build_codec, data_kind
from harness.model import dit
from harness.sample import SAMPLE_KEYS, sample_to_npz, save_grid, save_pngs

log = logging.getLogger(__name__)

EVALS_DIR = "evals"
GRID_FILE = "grid.png"  # beside an evaluation's samples: its first samples as one image (harness.sample.save_grid)
# Not a setting of the record: the metrics asked for (a record is completed with the missing ones).
METRICS_KEY = "metrics"
_EVAL_FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}
# Fields that name a record: those with a role in EvalConfig other than `runtime`, except the metric list.
CONFIG_SETTING_KEYS = tuple(k for k, f in _EVAL_FIELDS.items() if f.metadata.get(ROLE) != NEVER and k != METRICS_KEY)
# Settings no config field holds, derived from one, with the value a record made before they existed had: the
# weights of an in-house extractor (None before they shipped: weights trained on first use, per machine).
DERIVED_SETTINGS = {"extractor_weights": None}
SETTING_KEYS = CONFIG_SETTING_KEYS + tuple(DERIVED_SETTINGS)


def _neutral(key: str) -> Any:
    if key in DERIVED_SETTINGS:
        return DERIVED_SETTINGS[key]
    f = _EVAL_FIELDS[key]
    return f.metadata.get(NEUTRAL, f.default if f.default is not dataclasses.MISSING else None)


def _plain_eval(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg.eval, resolve=True) if isinstance(cfg.eval, DictConfig) else dict(cfg.eval)


def eval_settings(cfg: Any) -> dict:
    """Returns the settings that name an evaluation: the always-named fields of EvalConfig with their values
    (the extractor resolved), fields added later only where they differ from their neutral value, and the shipped
    weights of an in-house extractor (so a record made with other weights is never taken for this one's)."""
    e = _plain_eval(cfg)
    e["extractor"] = extractor_for(cfg)
    e["extractor_weights"] = weights_id(e["extractor"])
    return {k: e[k] for k in SETTING_KEYS
            if (k in _EVAL_FIELDS and _EVAL_FIELDS[k].metadata.get(ROLE) == ALWAYS) or e[k] != _neutral(k)}


def eval_hash(cfg: Any) -> str:
    """Returns 8 hex digits of the sha256 of eval_settings: names a record made with non-default settings."""
    return hashlib.sha256(json.dumps(eval_settings(cfg), sort_keys=True).encode()).hexdigest()[:8]


def samples_hash(cfg: Any) -> str:
    """Returns 8 hex digits naming the samples folder: only the settings that change the pixels, so
    re-scoring the same samples with another extractor or metric list does not sample again."""
    e = _plain_eval(cfg)
    return hashlib.sha256(json.dumps({k: e[k] for k in SAMPLE_KEYS}, sort_keys=True).encode()).hexdigest()[:8]


def _matches(record: dict, settings: dict) -> bool:
    """True when `record` was made with `settings` (a field a record lacks held its neutral value then)."""
    for k in SETTING_KEYS:
        want = settings.get(k, _neutral(k))
        if record.get(k, _neutral(k)) != want:
            return False
    return True


def requested_metrics(record: dict) -> list[str]:
    """Returns the metric names a record was asked for (a record without the list: those its values show)."""
    if isinstance(record.get("metrics_requested"), list):
        return list(record["metrics_requested"])
    return sorted({METRIC_OF_KEY.get(k, k) for k in (record.get("metrics") or {})})


def record_for(cfg: Any, run_dir: Path, step: int) -> tuple[Path, dict | None]:
    """Returns (where this evaluation's record is or goes, the record when one exists with these settings).

    The first evaluation of a step is `evals/step_N.json`; one with other settings goes beside it as
    `evals/step_N_<settings hash>.json`. A torn record file is reported and treated as absent (rewritten).
    """
    folder = Path(run_dir) / EVALS_DIR
    settings = eval_settings(cfg)
    first = folder / f"step_{step}.json"
    candidates = [first] + sorted(folder.glob(f"step_{step}_*.json"))
    torn = None
    for path in candidates:
        try:
            record = read_json(path)
        except ValueError as e:
            log.warning("%s", e)
            torn = torn or path
            continue
        if isinstance(record, dict) and _matches(record, settings):
            return path, record
    if torn is not None:
        return torn, None
    if not first.exists():
        return first, None
    other = folder / f"step_{step}_{eval_hash(cfg)}.json"
    while other.exists():  # another setting's record under this name: never overwritten
        other = other.with_name(other.stem + "x.json")
    return other, None


def missing_metrics(cfg: Any, record: dict | None) -> list[str]:
    """Returns the metrics cfg asks for that `record` does not hold yet (all of them when it is None)."""
    have = set(requested_metrics(record)) if record else set()
    return [m for m in cfg.eval.metrics if m not in have]


def evaluation_done(cfg: Any, run_dir: Path, step: int) -> bool:
    """True when the step has a record with these settings holding every metric asked for, and the validation
    loss of its checkpoint (what the loss-to-FID law pairs with the record) is measured, or can no longer be."""
    _, record = record_for(cfg, run_dir, step)
    return record is not None and not missing_metrics(cfg, record) and _validated_or_gone(run_dir, step)


def _validated_or_gone(run_dir: Path, step: int) -> bool:
    return validation_done(run_dir, step) or not checkpoint.ckpt_path(Path(run_dir) / "checkpoints", step).exists()


def evaluate(cfg: Any, step: int, run_dir: str | Path | None = None, run=None) -> dict:
    """Samples from the checkpoint at `step`, computes the metrics, writes and returns the record; measures the
    checkpoint's validation loss when metrics.jsonl has none at that step (`validate_step`).

    Raises cli.BadInput for bad settings, FileNotFoundError for a missing checkpoint and cli.MissingWeights
    for extractor weights that are not here, all before any sampling. Holds the cell's lease while writing.
    """
    problems = eval_problems(cfg)
    if problems:
        raise cli.BadInput(f"bad evaluation settings: {'; '.join(problems)}")
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    _, existing = record_for(cfg, run_dir, step)
    if existing is not None and not missing_metrics(cfg, existing) and _validated_or_gone(run_dir, step):
        return existing
    check_checkpoint(run_dir, step)  # before anything is held, loaded or trained
    env = distributed.init(cfg.device)
    if env.is_main and missing_metrics(cfg, existing):  # missing weights fail here, with what to fetch and where,
        from harness.metrics import fidelity  # before the lease and any sampling (see _evaluate)

        fidelity.preflight(missing_metrics(cfg, existing), extractor_for(cfg), cuda=env.device.type == "cuda",
                          dinov2_model=cfg.eval.dinov2_model)
    with hold(run_dir, "evaluate", env, cfg.lock_wait_s):
        record_path, existing = record_for(cfg, run_dir, step)  # again: another process may have just written it
        todo = missing_metrics(cfg, existing)
        record = existing if existing is not None and not todo else \
            _evaluate(cfg, step, run_dir, env, record_path, existing, todo, run)
        line = validate_step(cfg, step, run_dir, env)
        if line is not None:
            tracking.log_line(run, line, "val")
    return record


def _evaluate(cfg, step: int, run_dir: Path, env, record_path: Path, existing: dict | None, todo: list[str],
              run=None) -> dict:
    # Here, not at the top: torch-fidelity and the torchvision it loads take seconds to import, and the sweep
    # imports this module to plan (it asks which evaluations are done) long before anything is measured.
    from harness.metrics import fidelity

    t0 = time.perf_counter()
    extractor = extractor_for(cfg)
    model, codec, shape = load_cell_model(cfg, run_dir, step, cfg.eval.weights, env.device)
    precision, _ = fast_path(cfg.train, env.device)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    samples_dir = run_dir / "samples" / f"step_{step}_{samples_hash(cfg)}"
    npz = sample_to_npz(model, codec, cfg.eval, samples_dir, shape, cfg.data.num_classes, env, autocast,
                        source=checkpoint.checkpoint_source(run_dir / "checkpoints", step),
                        objective=cfg.objective.name)
    record = None
    if env.is_main:
        with np.load(npz) as f:
            samples = f["arr_0"]
        reference, split = reference_set(cfg)
        device = "cuda" if env.device.type == "cuda" else "cpu"
        m = fidelity.compute_metrics(
            samples, reference, extractor=extractor, data_name=cfg.data.name, split=split, metrics=tuple(todo),
            device=device, dinov2_model=cfg.eval.dinov2_model,
        )
        floor = metric_floor_for(cfg, reference, split, len(samples), todo, device)
        wall_s = time.perf_counter() - t0
        new = _new_record(cfg, step, run_dir, npz, samples, m, todo, wall_s, env)
        new["floor"] = floor
        grid = save_grid(npz, samples_dir / GRID_FILE)
        new["samples_grid"] = str(grid.relative_to(run_dir))
        record = _merge(existing, new, todo)
        atomic_write_json(record_path, record)
        tracking.log_evaluation(run, record, grid)
        if cfg.eval.save_png:
            save_pngs(npz, samples_dir / "png", limit=64)
    distributed.barrier()
    return distributed.broadcast_object(record)


def _new_record(cfg, step: int, run_dir: Path, npz: Path, samples: np.ndarray, m: dict, todo: list[str],
                wall_s: float, env) -> dict:
    """Returns the record of one evaluation: the metrics and every setting that produced them."""
    settings = eval_settings(cfg)
    ckpt = checkpoint.load(checkpoint.ckpt_path(run_dir / "checkpoints", step))
    e = _plain_eval(cfg)
    unique = ckpt.get("unique_train_images")
    return {
        "step": step, "images_seen": int(ckpt["images_seen"]), "unique_train_images": unique,
        "epochs": None if not unique else int(ckpt["images_seen"]) / unique,
        # every naming field with its value, neutral or not, so a later reader needs no defaults
        **{k: e[k] for k in CONFIG_SETTING_KEYS}, **DERIVED_SETTINGS, **settings,
        "num_samples": int(len(samples)), "preset": cfg.eval.preset, "objective": cfg.objective.name,
        "guided": bool(cfg.eval.cfg_scale > 1.0),
        "metrics": dict(m["metrics"]), "metrics_requested": list(todo),
        "metric_label": m["metric_label"], "reference_stats_id": m["reference_stats_id"],
        "num_reference": m.get("num_reference"), "feature_spaces": m.get("feature_spaces", {}),
        "data": cfg.data.name, "samples": str(npz.relative_to(run_dir)),
        "versions": versions(), "wall_s": wall_s,
        "gpu_hours": wall_s / 3600 * env.world_size if env.device.type == "cuda" else 0.0,
        "warnings": m.get("warnings", []), "settings_hash": eval_hash(cfg),
        "extractor_info": m.get("extractor_info"), "metric_settings": m.get("settings"),
        "feature_dim": m.get("feature_dim"),
    }


def _merge(existing: dict | None, new: dict, added: list[str]) -> dict:
    """Returns `existing` completed with the metrics in `added` (no value of it changed), or `new`."""
    if existing is None:
        return new
    out = dict(existing)
    out["metrics"] = {**new["metrics"], **existing.get("metrics", {})}
    out["metrics_requested"] = requested_metrics(existing) + [m for m in added if m not in requested_metrics(existing)]
    out["feature_spaces"] = {**new.get("feature_spaces", {}), **existing.get("feature_spaces", {})}
    out["warnings"] = list(existing.get("warnings", [])) + list(new.get("warnings", []))
    if new.get("floor") is not None:  # the floors of the added metrics beside those the record had
        floor = dict(existing.get("floor") or new["floor"])
        floor["values"] = {**new["floor"]["values"], **(existing.get("floor") or {}).get("values", {})}
        out["floor"] = floor
    out["completed"] = list(existing.get("completed", [])) + [{"metrics": added, "wall_s": new["wall_s"],
                                                                "versions": new["versions"]}]
    return out


def validation_done(run_dir: Path, step: int) -> bool:
    """True when metrics.jsonl holds a validation line of the current estimator (harness.heldout) at `step`."""
    return any(r.get("step") == step and isinstance(r.get("validation"), dict)
               for r in read_jsonl(Path(run_dir) / "metrics.jsonl"))


def validate_step(cfg: Any, step: int, run_dir: Path, env) -> dict | None:
    """Measures the validation loss of a kept checkpoint (raw and EMA weights, harness.heldout) and appends it to
    metrics.jsonl as the trainer would have; returns the line, or None when the step has one already. Lets a cell
    trained before held-out validation existed (or validated at other steps) get the loss that the loss-to-FID law
    pairs with each evaluation, from the checkpoint that evaluation read."""
    if validation_done(run_dir, step):
        return None
    try:
        path = check_checkpoint(run_dir, step)
    except (FileNotFoundError, ValueError) as e:  # the checkpoint was pruned or broke since: nothing to measure
        log.warning("%s: no validation loss at step %d: %s", Path(run_dir).name, step, e)
        return None
    state = checkpoint.load(path)
    raw, ema = build_model(cfg), build_model(cfg)
    dit.load_checkpoint(state, raw, key="model")
    dit.load_checkpoint(state, ema, key="ema")
    objective = build_objective(cfg).to(env.device)
    codec = build_codec(cfg.data, device=env.device) if data_kind(cfg.data.name).encode_every_step else None
    vs = heldout.validation_set(cfg, objective, codec, env.device)
    precision, _ = fast_path(cfg.train, env.device)
    unique = state.get("unique_train_images")
    line = {"step": step, "images_seen": int(state["images_seen"]),
            "epochs": None if not unique else int(state["images_seen"]) / unique, "unique_train_images": unique,
            **heldout.validation_record(raw.to(env.device), ema.to(env.device), objective, vs,
                                        autocast_for(precision, env.device)),
            "source": "evaluate"}
    if env.is_main:
        append_jsonl(Path(run_dir) / "metrics.jsonl", line)
    return line


def metric_floor_for(cfg: Any, reference: np.ndarray, split: str, num_samples: int, metrics,
                     device: str) -> dict | None:
    """Returns the floor of these metrics at this sample count (harness.metrics.floors: what as many real images
    get against the same reference), computed once and cached; None when the data set has no real images beside the
    reference, or none of the metrics has a floor (the record then says "floor": null)."""
    from harness.metrics import floors, references  # see _evaluate

    if not floors.floor_metrics(metrics):
        return None
    found = references.floor_images(cfg.data, split)
    if found is None:
        log.warning("%s: no real images beside the reference set: the metrics' floor is not measured", cfg.data.name)
        return None
    real, real_split = found
    try:
        return floors.metric_floor(real, reference, num_samples, extractor=extractor_for(cfg),
                                   data_name=cfg.data.name, split=split, metrics=metrics, real_split=real_split,
                                   device=device, batch_size=cfg.eval.batch_size)
    except ValueError as e:  # too few real images to extrapolate from: said in the log and the record
        log.warning("%s: the metrics' floor is not measured: %s", cfg.data.name, e)
        return {"num_samples": num_samples, "values": {}, "method": f"not measured: {e}"}


def reference_set(cfg: Any) -> tuple[np.ndarray, str]:
    """Return (reference images uint8 N x H x W x 3, split label): ADM's reference batch when given,
    else the data set's own split."""
    from harness.metrics import references  # see _evaluate

    if cfg.eval.reference_npz:
        path = Path(cfg.eval.reference_npz)
        if not path.exists():
            raise FileNotFoundError(
                f"eval.reference_npz={path} does not exist; ADM's ImageNet reference batches are "
                "VIRTUAL_imagenet256_labeled.npz / VIRTUAL_imagenet512.npz from openai/guided-diffusion's "
                "evaluations"
            )
        with np.load(path) as f:
            return f["arr_0"], f"npz-{path.stem}"
    return references.reference_images(cfg.data, cfg.eval.reference_split), cfg.eval.reference_split


def evaluate_cell(cfg: Any, run_dir: str | Path | None = None) -> list[dict]:
    """Evaluate every configured step whose checkpoint exists; each one resumable on its own."""
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    have = set(checkpoint.list_steps(run_dir / "checkpoints"))
    missing = [s for s in eval_steps(cfg) if s not in have]
    if missing:
        log.warning("%s: no checkpoint for configured evaluation steps %s (have %s); skipped",
                    run_dir.name, missing, sorted(have))
    todo = [s for s in eval_steps(cfg) if s in have and not evaluation_done(cfg, run_dir, s)]
    # One wandb run (the cell's, resumed by its id) for every evaluation of this call, opened only if one is due.
    run = tracking.open_run(cfg, run_dir, "evaluate") if todo and distributed.is_main_process() else None
    try:
        return [evaluate(cfg, s, run_dir, run) for s in eval_steps(cfg) if s in have]
    finally:
        tracking.close_run(run)


def versions() -> dict:
    """Returns the versions of what made a record: torch, torch-fidelity, numpy, the harness's commit."""
    import torch_fidelity  # see _evaluate

    try:
        harness_version = importlib.metadata.version("harness")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        harness_version = None
    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__,
            "harness": harness_version, "git_commit": checkpoint.git_commit()}


USAGE = ("usage: python -m harness.evaluate run_dir=RUN_FOLDER step=N|all [validation=only] [eval=PRESET] "
         "[eval.KEY=VALUE ...]")
CLI_KEYS = ("run_dir=", "step=", "validation=")


def validate_cell(cfg: Any, run_dir: Path, steps: list[int]) -> list[dict]:
    """Measures the validation loss of each kept checkpoint in `steps` that has none yet (harness.heldout);
    returns the lines written. Holds the cell's lease."""
    env = distributed.init(cfg.device)
    with hold(run_dir, "validate", env, cfg.lock_wait_s):
        return [line for s in steps if (line := validate_step(cfg, s, run_dir, env)) is not None]


@cli.guard
def main(argv: list[str] | None = None) -> list[dict]:
    """`python -m harness.evaluate run_dir=... step=N|all [validation=only] [eval=PRESET] [eval.KEY=V]`: prints the
    metrics (with validation=only: the held-out validation loss of kept checkpoints, no sampling)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    kv = dict(a.split("=", 1) for a in args if a.startswith(CLI_KEYS))
    if "run_dir" not in kv:
        raise cli.BadInput(f"run_dir= is missing; {USAGE}")
    step = kv.get("step", "all")
    if step != "all" and not step.isdigit():
        raise cli.BadInput(f"step={step!r}: expected a checkpoint step (a positive integer) or all")
    if kv.get("validation", "only") != "only":
        raise cli.BadInput(f"validation={kv['validation']!r}: allowed: only (the validation loss alone, no metrics)")
    run_dir = Path(kv["run_dir"])
    if not run_dir.is_dir():
        raise cli.BadInput(f"run_dir={run_dir}: no such folder")
    cfg = load_run_config(run_dir, [a for a in args if not a.startswith(CLI_KEYS)])
    problems = eval_problems(cfg)
    if problems:
        raise cli.BadInput(f"bad evaluation settings: {'; '.join(problems)}")
    if "validation" in kv:
        kept = checkpoint.list_steps(run_dir / "checkpoints")
        if step != "all" and int(step) not in kept:
            raise cli.BadInput(f"step={step}: no checkpoint at that step in {run_dir / 'checkpoints'} (have {kept})")
        lines = validate_cell(cfg, run_dir, kept if step == "all" else [int(step)])
        for line in lines:
            p = "val" if line["validation"]["heldout"] else "train_batch"
            print(f"step {line['step']}: {p}_loss={line[p + '_loss']:.5g} +- {line[p + '_loss_se']:.2g}, "
                  f"{p}_loss_ema={line[p + '_loss_ema']:.5g} +- {line[p + '_loss_ema_se']:.2g} "
                  f"({line['validation']['split']} split, {line['validation']['num_images']} images)")
        if not lines:
            print("every kept checkpoint has its validation loss already")
        return lines
    records = evaluate_cell(cfg, run_dir) if step == "all" else [evaluate(cfg, int(step), run_dir)]
    for r in records:
        print(f"step {r['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items()
                                                 if isinstance(v, (int, float))))
    return records


if __name__ == "__main__":
    main()
