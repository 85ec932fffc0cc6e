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

from harness.cell import (
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
from harness.core.runfolder import atomic_write_json, read_json
from harness.core.vocabulary import METRIC_OF_KEY
from harness.sample import SAMPLE_KEYS, sample_to_npz, save_pngs

log = logging.getLogger(__name__)

EVALS_DIR = "evals"
# Not a setting of the record: the metrics asked for (a record is completed with the missing ones).
METRICS_KEY = "metrics"
_EVAL_FIELDS = {f.name: f for f in dataclasses.fields(EvalConfig)}
# Fields that name a record: those with a role in EvalConfig other than `runtime`, except the metric list.
SETTING_KEYS = tuple(k for k, f in _EVAL_FIELDS.items() if f.metadata.get(ROLE) != NEVER and k != METRICS_KEY)


def _neutral(key: str) -> Any:
    f = _EVAL_FIELDS[key]
    return f.metadata.get(NEUTRAL, f.default if f.default is not dataclasses.MISSING else None)


def _plain_eval(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg.eval, resolve=True) if isinstance(cfg.eval, DictConfig) else dict(cfg.eval)


def eval_settings(cfg: Any) -> dict:
    """Returns the settings that name an evaluation: the always-named fields of EvalConfig with their values
    (the extractor resolved), and fields added later only where they differ from their neutral value."""
    e = _plain_eval(cfg)
    e["extractor"] = extractor_for(cfg)
    return {k: e[k] for k in SETTING_KEYS
            if _EVAL_FIELDS[k].metadata.get(ROLE) == ALWAYS or e[k] != _neutral(k)}


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
    """True when the step has a record with these settings holding every metric asked for."""
    _, record = record_for(cfg, run_dir, step)
    return record is not None and not missing_metrics(cfg, record)


def evaluate(cfg: Any, step: int, run_dir: str | Path | None = None) -> dict:
    """Samples from the checkpoint at `step`, computes the metrics, writes and returns the record.

    Raises cli.BadInput for bad settings, FileNotFoundError for a missing checkpoint and cli.MissingWeights
    for extractor weights that are not here, all before any sampling. Holds the cell's lease while writing.
    """
    problems = eval_problems(cfg)
    if problems:
        raise cli.BadInput(f"bad evaluation settings: {'; '.join(problems)}")
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    _, existing = record_for(cfg, run_dir, step)
    if existing is not None and not missing_metrics(cfg, existing):
        return existing
    check_checkpoint(run_dir, step)  # before anything is held, loaded or trained
    env = distributed.init(cfg.device)
    if env.is_main:  # missing weights fail here, with what to fetch and where, before the lease and any sampling
        from harness.metrics import fidelity  # see _evaluate

        fidelity.preflight(missing_metrics(cfg, existing), extractor_for(cfg), cuda=env.device.type == "cuda",
                          dinov2_model=cfg.eval.dinov2_model)
    with hold(run_dir, "evaluate", env, cfg.lock_wait_s):
        record_path, existing = record_for(cfg, run_dir, step)  # again: another process may have just written it
        todo = missing_metrics(cfg, existing)
        if existing is not None and not todo:
            return existing
        record = _evaluate(cfg, step, run_dir, env, record_path, existing, todo)
    return record


def _evaluate(cfg, step: int, run_dir: Path, env, record_path: Path, existing: dict | None, todo: list[str]) -> dict:
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
        m = fidelity.compute_metrics(
            samples, reference, extractor=extractor, data_name=cfg.data.name, split=split, metrics=tuple(todo),
            device="cuda" if env.device.type == "cuda" else "cpu", dinov2_model=cfg.eval.dinov2_model,
        )
        wall_s = time.perf_counter() - t0
        record = _merge(existing, _new_record(cfg, step, run_dir, npz, samples, m, todo, wall_s, env), todo)
        atomic_write_json(record_path, record)
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
    return {
        "step": step, "images_seen": int(ckpt["images_seen"]),
        # every naming field with its value, neutral or not, so a later reader needs no defaults
        **{k: e[k] for k in SETTING_KEYS}, **settings,
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
    out["completed"] = list(existing.get("completed", [])) + [{"metrics": added, "wall_s": new["wall_s"],
                                                                "versions": new["versions"]}]
    return out


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
    return [evaluate(cfg, s, run_dir) for s in eval_steps(cfg) if s in have]


def versions() -> dict:
    """Returns the versions of what made a record: torch, torch-fidelity, numpy, the harness's commit."""
    import torch_fidelity  # see _evaluate

    try:
        harness_version = importlib.metadata.version("harness")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        harness_version = None
    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__,
            "harness": harness_version, "git_commit": checkpoint.git_commit()}


USAGE = "usage: python -m harness.evaluate run_dir=RUN_FOLDER step=N|all [eval=PRESET] [eval.KEY=VALUE ...]"


@cli.guard
def main(argv: list[str] | None = None) -> list[dict]:
    """`python -m harness.evaluate run_dir=... step=N|all [eval=PRESET] [eval.KEY=V]`: prints the metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    kv = dict(a.split("=", 1) for a in args if a.startswith(("run_dir=", "step=")))
    if "run_dir" not in kv:
        raise cli.BadInput(f"run_dir= is missing; {USAGE}")
    step = kv.get("step", "all")
    if step != "all" and not step.isdigit():
        raise cli.BadInput(f"step={step!r}: expected a checkpoint step (a positive integer) or all")
    run_dir = Path(kv["run_dir"])
    if not run_dir.is_dir():
        raise cli.BadInput(f"run_dir={run_dir}: no such folder")
    cfg = load_run_config(run_dir, [a for a in args if not a.startswith(("run_dir=", "step="))])
    problems = eval_problems(cfg)
    if problems:
        raise cli.BadInput(f"bad evaluation settings: {'; '.join(problems)}")
    records = evaluate_cell(cfg, run_dir) if step == "all" else [evaluate(cfg, int(step), run_dir)]
    for r in records:
        print(f"step {r['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items()
                                                 if isinstance(v, (int, float))))
    return records


if __name__ == "__main__":
    main()
