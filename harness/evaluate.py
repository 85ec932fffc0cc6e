"""Evaluation as a stage: a checkpoint becomes `evals/step_N.json`, every setting recorded beside the metrics.

    python -m harness.evaluate run_dir=outputs/demo/DiT-demo-S-2_... step=300
    python -m harness.evaluate run_dir=... step=all eval=fid10k    # every evaluation step, another preset
    python -m harness.evaluate run_dir=... step=400000 eval.cfg_scale=1.5

Samples are written shard by shard (`harness.sample`), so a killed evaluation resumes without redoing
finished shards. A record is written atomically once the metrics exist; an existing record made with
the same settings is returned as is, and one made with other settings is never overwritten: the new
record then goes to `evals/step_N_<settings-hash>.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness import checkpoint, distributed
from harness.config import EvalConfig, eval_steps
from harness.runfolder import atomic_write_json, read_json

log = logging.getLogger(__name__)

# The settings that change an evaluation's result; they name its samples folder and identify its record.
EVAL_IDENTITY_KEYS = ("num_samples", "sampler", "sampling_steps", "cfg_scale", "cfg_channels",
                      "label_sampling", "weights", "extractor", "metrics", "reference_split", "reference_npz",
                      "seed")


def eval_settings(cfg: Any) -> dict:
    """Return the settings that identify an evaluation (EVAL_IDENTITY_KEYS), the extractor resolved."""
    from harness.metrics import default_extractor

    e = OmegaConf.to_container(cfg.eval, resolve=True) if isinstance(cfg.eval, DictConfig) else dict(cfg.eval)
    e["extractor"] = e.get("extractor") or default_extractor(cfg.data.name)
    return {k: e[k] for k in EVAL_IDENTITY_KEYS}


def eval_hash(cfg: Any) -> str:
    """Return 8 hex digits of the sha256 of eval_settings: names a record made with non-default settings."""
    return hashlib.sha256(json.dumps(eval_settings(cfg), sort_keys=True).encode()).hexdigest()[:8]


def samples_hash(cfg: Any) -> str:
    """Return 8 hex digits naming the samples folder: only the settings that change the pixels, so
    re-scoring the same samples with another extractor or metric list does not sample again."""
    from harness.sample import SAMPLE_KEYS

    e = eval_settings(cfg)
    return hashlib.sha256(json.dumps({k: e[k] for k in SAMPLE_KEYS}, sort_keys=True).encode()).hexdigest()[:8]


def preflight_extractor(extractor: str, cuda: bool) -> int:
    """Return the extractor's feature width, loading its weights now, so missing weights (offline Inception)
    fail with a clear message before any sampling rather than after hours of it."""
    from urllib.error import URLError

    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    from harness import metrics

    if extractor == metrics.DIGITS_EXTRACTOR:
        weights_path = metrics.digits_extractor_info()["weights_path"]  # trains once (seconds), then cached
    elif extractor in FEATURE_EXTRACTORS_REGISTRY:
        weights_path = None
    else:
        raise ValueError(f"eval.extractor={extractor!r} is not registered; allowed: "
                         f"{sorted(set(FEATURE_EXTRACTORS_REGISTRY) | {metrics.DIGITS_EXTRACTOR})}")
    probe = np.zeros((metrics.DIGITS_CNN_SIZE, metrics.DIGITS_CNN_SIZE, 3), dtype=np.uint8)
    try:
        return metrics._probe_feature_dim(extractor, weights_path, probe, cuda)
    except URLError as e:
        raise metrics.MissingWeightsError(metrics._offline_message(extractor)) from e


def checkpoint_source(run_dir: Path, step: int) -> dict:
    """Return the checkpoint's file name and sha256 (its sidecar's): what made a samples folder, kept valid
    when the run folder is moved or copied."""
    path = checkpoint.ckpt_path(run_dir / "checkpoints", step)
    sidecar = read_json(path.with_suffix(".json")) or {}
    return {"checkpoint": path.name, "checkpoint_sha256": sidecar.get("sha256")}


def record_for(cfg: Any, run_dir: Path, step: int) -> tuple[Path, dict | None]:
    """(where this evaluation's record goes, the record when it exists already with these settings).

    The first evaluation of a step is `evals/step_N.json`; one with other settings goes beside it as
    `evals/step_N_<settings hash>.json`, so no record is ever overwritten by another setting's.
    """
    first = Path(run_dir) / "evals" / f"step_{step}.json"
    existing = read_json(first)
    if existing is None or existing.get("settings_hash") == eval_hash(cfg):
        return first, existing
    other = first.with_name(f"step_{step}_{eval_hash(cfg)}.json")
    return other, read_json(other)


def load_cell_model(cfg: Any, run_dir: Path, step: int, weights: str, device: torch.device):
    """(model with the checkpoint's weights, codec, latent shape) of a cell; clear errors for bad input."""
    from harness import data, models
    from harness.autoencoder import build_codec
    from harness.train import build_model

    path = checkpoint.ckpt_path(run_dir / "checkpoints", step)
    if not path.exists():
        have = checkpoint.list_steps(run_dir / "checkpoints")
        raise FileNotFoundError(
            f"no checkpoint for step {step} in {run_dir / 'checkpoints'} (have steps {have})"
        )
    problem = checkpoint.verify(path)
    if problem:
        raise ValueError(f"checkpoint {path} cannot be trusted: {problem}")
    model = build_model(cfg)
    models.load_checkpoint(checkpoint.load(path), model, key=weights)
    model.to(device).eval()
    in_channels, input_size = data.model_input_shape(cfg.data)
    return model, build_codec(cfg.data, device=device), (in_channels, input_size, input_size)


def evaluate(cfg: Any, step: int, run_dir: str | Path | None = None) -> dict:
    """Sample from the checkpoint at `step`, compute the metrics, write and return the record.

    The record is `evals/step_N.json`, or `evals/step_N_<eval_hash>.json` when step_N.json holds an
    evaluation with other settings (never overwritten). Raises ValueError for bad settings, FileNotFoundError
    for a missing checkpoint and MissingWeightsError for missing extractor weights, before any sampling.
    """
    from harness import metrics
    from harness.config import validate
    from harness.sample import sample_to_npz
    from harness.train import fast_path, run_dir_for

    problems = [p for p in validate(cfg) if p.startswith("eval.")]
    if problems:
        raise ValueError("bad evaluation settings:\n  - " + "\n  - ".join(problems))
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    settings = eval_settings(cfg)
    record_path, existing = record_for(cfg, run_dir, step)
    if existing is not None:
        return existing

    env = distributed.init(cfg.device)
    t0 = time.perf_counter()
    model, codec, shape = load_cell_model(cfg, run_dir, step, cfg.eval.weights, env.device)
    if env.is_main:
        preflight_extractor(settings["extractor"], cuda=env.device.type == "cuda")
    precision, _ = fast_path(cfg.train, env.device)
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    samples_dir = run_dir / "samples" / f"step_{step}_{samples_hash(cfg)}"
    npz = sample_to_npz(model, codec, cfg.eval, samples_dir, shape, cfg.data.num_classes, env, autocast,
                        source=checkpoint_source(run_dir, step))
    record = None
    if env.is_main:
        with np.load(npz) as f:
            samples = f["arr_0"]
        reference, split = reference_set(cfg)
        m = metrics.compute_metrics(
            samples, reference, extractor=settings["extractor"], data_name=cfg.data.name,
            split=split, metrics=tuple(cfg.eval.metrics),
            device="cuda" if env.device.type == "cuda" else "cpu",
        )
        wall_s = time.perf_counter() - t0
        ckpt = checkpoint.load(checkpoint.ckpt_path(run_dir / "checkpoints", step))
        record = {
            "step": step, "images_seen": int(ckpt["images_seen"]),
            # important: the settings' "metrics" (the names asked for) must not replace the values
            **{k: settings[k] for k in EVAL_IDENTITY_KEYS if k not in ("num_samples", "metrics")},
            "metrics": m["metrics"], "metrics_requested": list(settings["metrics"]),
            "num_samples": int(len(samples)), "preset": cfg.eval.preset,
            "metric_label": metrics.metric_label(settings["extractor"]),
            "reference_stats_id": m["reference_stats_id"], "num_reference": m.get("num_reference"),
            "data": cfg.data.name, "samples": str(npz.relative_to(run_dir)),
            "versions": versions(), "wall_s": wall_s,
            "gpu_hours": wall_s / 3600 * env.world_size if env.device.type == "cuda" else 0.0,
            "warnings": m.get("warnings", []), "settings_hash": eval_hash(cfg),
            "extractor_info": m.get("extractor_info"), "metric_settings": m.get("settings"),
            "feature_dim": m.get("feature_dim"),
        }
        atomic_write_json(record_path, record)
        if cfg.eval.save_png:
            from harness.sample import save_pngs

            save_pngs(npz, samples_dir / "png", limit=64)
    distributed.barrier()
    return distributed.broadcast_object(record)


def reference_set(cfg: Any) -> tuple[np.ndarray, str]:
    """Return (reference images uint8 N x H x W x 3, split label): ADM's reference batch when given,
    else the data set's own split."""
    from harness import metrics

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
    return metrics.reference_images(cfg.data, cfg.eval.reference_split), cfg.eval.reference_split


def evaluate_cell(cfg: Any, run_dir: str | Path | None = None) -> list[dict]:
    """Evaluate every configured step whose checkpoint exists; each one resumable on its own."""
    from harness.train import run_dir_for

    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    have = set(checkpoint.list_steps(run_dir / "checkpoints"))
    missing = [s for s in eval_steps(cfg) if s not in have]
    if missing:
        log.warning("%s: no checkpoint for configured evaluation steps %s (have %s); skipped",
                    run_dir.name, missing, sorted(have))
    return [evaluate(cfg, s, run_dir) for s in eval_steps(cfg) if s in have]


def versions() -> dict:
    import torch_fidelity

    import harness

    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
            "numpy": np.__version__, "harness": getattr(harness, "__version__", "0.1.0"),
            "git_commit": checkpoint.git_commit()}


def load_run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """Return the cell's resolved config with `eval=<preset>` and `eval.key=value` overrides applied."""
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = OmegaConf.merge(OmegaConf.structured(_schema()), OmegaConf.load(run_dir / "config.yaml"))
    conf = Path(__file__).resolve().parents[1] / "conf" / "eval"
    rest = []
    for o in overrides:
        if o.startswith("eval="):
            preset = conf / f"{o.split('=', 1)[1]}.yaml"
            if not preset.exists():
                allowed = sorted(p.stem for p in conf.glob("*.yaml"))
                raise ValueError(f"unknown eval preset {o.split('=', 1)[1]!r}; allowed: {allowed}")
            cfg.eval = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.load(preset))
        else:
            rest.append(o)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(rest))


def _schema():
    from harness.config import Config

    return Config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    kv = dict(a.split("=", 1) for a in args if a.startswith(("run_dir=", "step=")))
    if "run_dir" not in kv:
        raise SystemExit("usage: python -m harness.evaluate run_dir=RUN_FOLDER step=N|all [eval=PRESET] "
                         "[eval.KEY=V]")
    run_dir = Path(kv["run_dir"])
    cfg = load_run_config(run_dir, [a for a in args if not a.startswith(("run_dir=", "step="))])
    step = kv.get("step", "all")
    records = evaluate_cell(cfg, run_dir) if step == "all" else [evaluate(cfg, int(step), run_dir)]
    for r in records:
        if r is not None:  # None on ranks other than 0 never happens (broadcast), kept for safety
            print(f"step {r['step']}: " + ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items()
                                                     if isinstance(v, (int, float))))


if __name__ == "__main__":
    main()
