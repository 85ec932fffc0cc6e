"""The sweep: every cell of a Hydra grid as its own job, validated and planned before anything starts.

    python -m harness.sweep -m model=S,B,L,XL patch=2,4,8            # the paper's grid, one machine
    python -m harness.sweep -m sweeps=paper hydra/launcher=slurm      # one SLURM job per cell
    python -m harness.sweep -m sweeps=demo                            # the CPU demo on digits
    python -m harness.sweep -m sweeps=paper plan=true                 # print the plan and exit

`GridSweep` (Hydra's basic sweeper plus what a scaling study needs) composes every cell first and
reports every bad value of the whole grid in one error, before a folder is created or a job submitted.
It prints the plan (params, Gflops, training compute, estimated GPU-hours), skips cells that are
finished already (so relaunching or extending a grid only runs what is missing), groups the rest by the
resources their cost calls for, and launches them. A failed cell records its reason in its own
status.json and never stops the others; the multirun then exits non-zero naming it.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from harness import config as hconfig
from harness import distributed
from harness.runfolder import atomic_write_json, read_json, read_status

log = logging.getLogger(__name__)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Training images/s of one GPU per paper-convention Gflop of the model, i.e. images/s x gflops.
# Used only to estimate GPU-hours in the plan. Read from conf/throughput.yaml (plan_device's figure, written
# by `python -m harness.bench train --record` on a GPU; docs/benchmarks.md); until a GPU has been
# recorded, the fast-DiT A100 figure (107.5 images/s for XL/2 at 118.64 Gflops).
FAST_DIT_A100_IMAGE_GFLOPS_PER_S = 107.5 * 118.64


def _gpu_image_gflops_per_s() -> float:
    from harness.bench import recorded_image_gflops_per_s

    return recorded_image_gflops_per_s() or FAST_DIT_A100_IMAGE_GFLOPS_PER_S


GPU_IMAGE_GFLOPS_PER_S = _gpu_image_gflops_per_s()


def _fail(message: str, code: int = 2) -> None:
    """Print a grid problem without a traceback and exit non-zero (a message, not a crash)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def estimate_gpu_hours(gflops: float, global_batch: int, steps: int) -> float:
    """GPU-hours to train a cell at the benchmarked per-GPU throughput (a planning estimate)."""
    images_per_s = GPU_IMAGE_GFLOPS_PER_S / max(gflops, 1e-12)
    return global_batch * steps / images_per_s / 3600.0


def cell_resources(cfg: Any, gpu_hours: float) -> dict:
    """The one rule mapping a cell's cost to what it asks of SLURM.

    A cell gets the fewest GPUs (a power of two dividing the global batch, at most resources.max_gpus)
    that bring its wall time under resources.gpu_hours_per_gpu_job_max hours, on as few nodes as hold
    them (resources.gpus_per_node is what one node has), and a time limit of that wall time with 25% slack
    (at least an hour, at most resources.timeout_min). Big cells (XL/2) thus get more GPUs and time than
    small ones (S/8); preemption and requeue cover whatever is left.
    """
    r = cfg.resources
    gpus = 1
    while (gpu_hours / gpus > r.gpu_hours_per_gpu_job_max and gpus * 2 <= r.max_gpus
           and cfg.train.global_batch % (gpus * 2) == 0):
        gpus *= 2
    nodes = math.ceil(gpus / r.gpus_per_node)
    while gpus % nodes:  # the same number of GPUs on every node
        nodes += 1
    per_node = gpus // nodes
    hours = gpu_hours / gpus * 1.25
    timeout_min = int(min(r.timeout_min, max(60, math.ceil(hours * 60))))
    return {"gpus_per_node": per_node, "nodes": nodes, "tasks_per_node": per_node, "timeout_min": timeout_min}


def plan_row(cfg: Any) -> dict:
    from harness import flops
    from harness.train import cell_facts

    facts = cell_facts(cfg)
    train_gflops = flops.train_compute_gflops(facts["gflops"], cfg.train.global_batch, cfg.train.steps)
    gpu_hours = estimate_gpu_hours(facts["gflops"], cfg.train.global_batch, cfg.train.steps)
    return {**facts, "train_compute_gflops": train_gflops, "est_gpu_hours": gpu_hours,
            "resources": cell_resources(cfg, gpu_hours)}


def format_plan(rows: list[dict], skipped: set[str]) -> str:
    head = f"{'cell':<52} {'params':>9} {'Gflops':>8} {'train Gflops':>12} {'GPU-h':>8} {'GPUs':>4}  state"
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r["resources"]
        lines.append(
            f"{r['cell_id']:<52} {r['params'] / 1e6:>8.2f}M {r['gflops']:>8.3g} {r['train_compute_gflops']:>12.3e}"
            f" {r['est_gpu_hours']:>8.2f} {res['gpus_per_node'] * res['nodes']:>4}"
            f"  {'done, skipped' if r['cell_id'] in skipped else 'to run'}"
        )
    total = sum(r["est_gpu_hours"] for r in rows)
    todo = sum(r["est_gpu_hours"] for r in rows if r["cell_id"] not in skipped)
    lines.append(f"{len(rows)} cells, {len(rows) - len(skipped)} to run; estimated GPU-hours: {total:.1f} in all, "
                 f"{todo:.1f} still to run (at {GPU_IMAGE_GFLOPS_PER_S:.0f} image-Gflops/s per GPU)")
    return "\n".join(lines)


def cell_done(cfg: Any) -> bool:
    """True when the cell's training is finished and every configured evaluation has its record, made
    with the current evaluation settings (another preset is work still to do)."""
    from harness.evaluate import record_for
    from harness.train import run_dir_for

    run_dir = run_dir_for(cfg)
    if read_status(run_dir).get("state") != "finished":  # "evaluating" is not done: its evals resume
        return False
    if cfg.stage == "train":
        return True
    return all(record_for(cfg, run_dir, s)[1] is not None for s in hconfig.eval_steps(cfg))


class GridSweep:
    """The grid sweeper's logic: validate the whole grid, print the plan, launch only what is missing."""

    def __init__(self, params: dict[str, str] | None = None):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self._basic = BasicSweeper(max_batch_size=None, params=params)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self._basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.hydra_context, self.config = hydra_context, config
        self.launcher = self._basic.launcher

    def sweep(self, arguments: list[str]) -> Any:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params_conf = self._basic._parse_config() if self._basic.params else []
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = self._basic.split_arguments(parser.parse_overrides(params_conf), None)
        jobs = [list(j) for batch in batches for j in batch]

        cfgs, problems = [], []
        for overrides in jobs:
            label = " ".join(overrides) or "(defaults)"
            try:
                cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            except Exception as e:  # noqa: BLE001 - composition errors (unknown key/option, wrong type)
                problems.append(f"[{label}] {_compact_error(e)}")
                continue
            problems += [f"[{label}] {p}" for p in hconfig.validate(cfg)]
            cfgs.append((overrides, cfg))
        if problems:
            _fail(f"the grid has {len(problems)} problem(s); nothing was created or submitted:\n  - "
                  + "\n  - ".join(problems))

        ids = [hconfig.cell_id(c) for _, c in cfgs]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            _fail(f"these cells appear more than once in the grid: {sorted(dupes)}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        rows = [plan_row(c) for _, c in cfgs]
        conflicts = _foreign_cells(sweep_dir, str(self.config.sweep_name), [(c, r) for (_, c), r in zip(cfgs, rows)])
        if conflicts:
            _fail(f"{sweep_dir} already holds results that would mix with this grid's; nothing was created or "
                  "submitted (use another sweep_name=... or out_dir=..., or move the old run folders away):\n  - "
                  + "\n  - ".join(conflicts))
        done = {hconfig.cell_id(c) for _, c in cfgs if cell_done(c)}
        print(f"sweep folder: {sweep_dir.resolve()}", flush=True)
        print(format_plan(rows, done), flush=True)
        if self.config.plan:
            return []

        _record_sweep(sweep_dir, self.config, ids)
        todo = [(o, c, r) for (o, c), r in zip(cfgs, rows) if r["cell_id"] not in done]
        if _is_submitit(self.launcher):
            outcomes = _launch_submitit(self.launcher, todo)
        else:  # one machine: Hydra's launcher runs the cells one after another; resources do not apply
            returns = self.launcher.launch([o for o, _, _ in todo], initial_job_idx=0) if todo else []
            outcomes = [(item, _job_value(ret)) for item, ret in zip(todo, returns)]

        failed = [f"{r['cell_id']}: {value.get('reason')}" for (_, _, r), value in outcomes
                  if value.get("state") != "finished"]
        if self.config.report:
            _write_report(sweep_dir)
        if failed:
            _fail(f"{len(failed)} cell(s) failed (see their status.json):\n  - " + "\n  - ".join(failed), code=1)
        print(f"sweep {sweep_dir}: {len(rows)} cells, {len(done)} already done, {len(todo)} run now", flush=True)
        return [value for _, value in outcomes]


def _job_value(ret: JobReturn) -> dict:
    """A cell's result dict from Hydra's JobReturn; a job that raised becomes a failure with its reason."""
    if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, dict):
        return ret.return_value
    return {"state": "failed", "reason": _first_line(ret._return_value)}


def _is_submitit(launcher) -> bool:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

    return isinstance(launcher, BaseSubmititLauncher)


def _launch_submitit(launcher, todo: list) -> list[tuple[Any, dict]]:
    """Submit every cell (one job array per resource group, all groups at once), then wait for all.

    This does what hydra-submitit-launcher's `launch` does, with two differences a long sweep needs: the
    groups are submitted together rather than one after the other, and a job that dies without a result
    (OOM, node failure, scancel) becomes a failed cell with its reason instead of an exception that stops
    the sweep from waiting for the others and leaves the dead cell marked running.
    """
    import submitit
    from hydra.core.singleton import Singleton
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from harness.runfolder import update_status
    from harness.train import run_dir_for

    kind = launcher._EXECUTOR
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    submitted, idx = [], 0
    for res_key, group in _group_by_resources(todo).items():
        params = dict(launcher.params)
        if kind == "slurm":
            params.update(dict(res_key))
        executor = submitit.AutoExecutor(
            cluster=kind, folder=params["submitit_folder"],
            **({f"{kind}_max_num_timeout": params["max_num_timeout"]} if "max_num_timeout" in params else {}),
        )
        executor.update_parameters(**{
            k if k in base_keys else f"{kind}_{k}": v for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        })
        job_args = [(list(o), "hydra.sweep.dir", idx + i, f"job_id_for_{idx + i}", Singleton.get_state())
                    for i, (o, _, _) in enumerate(group)]
        jobs = executor.map_array(launcher, *zip(*job_args))
        log.info("submitted %d cell(s) as %s with %s", len(group), [j.job_id for j in jobs], dict(res_key))
        submitted += zip(group, jobs)
        idx += len(group)

    outcomes = []
    for (o, c, r), job in submitted:
        try:
            value = _job_value(job.results()[0])
        except Exception as e:  # noqa: BLE001 - the job died without a result
            value = {"state": "failed", "reason": f"job {job.job_id} ended without a result: {_first_line(e)}"}
            run_dir = run_dir_for(c)
            if run_dir.exists() and read_status(run_dir).get("state") != "finished":
                update_status(run_dir, state="failed", reason=value["reason"])
        outcomes.append(((o, c, r), value))
    return outcomes


def _group_by_resources(todo: list) -> dict:
    groups: dict = {}
    for item in todo:
        key = tuple(sorted(item[2]["resources"].items()))
        groups.setdefault(key, []).append(item)
    return groups


def _coords(facts: dict) -> tuple:
    """Where a cell sits in a grid: two cells with the same coordinates must have the same config."""
    return (facts["model"], facts["patch"], facts["cond"], facts["data"], facts["seed"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _foreign_cells(sweep_dir: Path, name: str, cells: list[tuple[Any, dict]]) -> list[str]:
    """Why this grid must not be launched into `sweep_dir`: another sweep's folder, or an edited config.

    An edited recipe gives every cell a new id (the config hash), so nothing would be overwritten; but the
    folder would then hold two versions of the same cell and the results table would mix them.
    """
    meta = read_json(sweep_dir / "sweep.json")
    if meta is not None and meta.get("name") != name:
        return [f"it is the folder of sweep {meta.get('name')!r}, this grid is sweep_name={name!r}"]
    ids = {row["cell_id"] for _, row in cells}
    new = {_coords(row): c for c, row in cells}  # the plan rows already hold each cell's facts
    problems = []
    for facts_path in sorted(sweep_dir.glob("*/cell.json")):
        old = read_json(facts_path)
        c = new.get(_coords(old))
        if c is None or old["cell_id"] in ids:
            continue
        old_cfg = OmegaConf.load(facts_path.parent / "config.yaml")
        before, after = _flat(hconfig.identity(old_cfg)), _flat(hconfig.identity(c))
        diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k)]
        problems.append(f"{old['cell_id']} is the same cell with another config ({'; '.join(diff) or 'hash'})")
    return problems


def _record_sweep(sweep_dir: Path, config: DictConfig, ids: list[str]) -> None:
    """sweep.json marks a sweep folder and lists every cell ever launched into it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    meta = read_json(sweep_dir / "sweep.json") or {"name": str(config.sweep_name), "created": None}
    from harness.runfolder import now_iso

    meta["created"] = meta.get("created") or now_iso()
    meta["grid"] = sorted(set(meta.get("grid", [])) | set(ids))
    meta["updated"] = now_iso()
    atomic_write_json(sweep_dir / "sweep.json", meta)


def _write_report(sweep_dir: Path) -> None:
    """The report, then the paths of its table and FID-vs-Gflops figure and the measured correlation."""
    from harness.report import write_report

    try:
        path = write_report([sweep_dir], sweep_dir / "report")
        for name in ("results.csv", "fig8_gflops.png", "report.md"):
            if (path.parent / name).exists():
                print(f"{name:<16} {path.parent / name}", flush=True)
        from harness.results import load_results
        from harness.scaling import gflops_correlation

        try:
            c = gflops_correlation(load_results([sweep_dir]), cond=None)
        except ValueError as e:  # fewer than 3 evaluated cells: nothing to correlate yet
            print(f"no FID-Gflops correlation yet: {e}", flush=True)
            return
        print(f"{c['label']} vs Gflops at step {c['step']} over {c['n']} cells: Spearman {c['spearman']:.3f}, "
              f"Pearson(FID, log10 Gflops) {c['pearson_log10_gflops']:.3f} (paper: -0.93)", flush=True)
    except Exception as e:  # noqa: BLE001 - a report problem must not hide the cells' results
        log.error("the report could not be written: %s", e)


def _compact_error(e: Exception) -> str:
    """Hydra's composition error in one line: what was wrong and, for a missing option, what is allowed."""
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


def _first_line(e: Any) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if "\n" not in text[:300] else text[:600]


# ---- the task: one cell ----

def run_cell(cfg: DictConfig) -> dict:
    """Train the cell (resuming), then evaluate its configured checkpoints; never raises for a cell failure."""
    from harness.runfolder import update_status
    from harness.train import Preempted, prepare_run_dir, run_dir_for, train

    run_dir = run_dir_for(cfg)
    try:
        if cfg.stage in ("all", "train"):
            result = train(cfg)
        else:
            result = {"run_dir": str(run_dir), "state": "finished"}
        if cfg.stage in ("all", "eval"):
            from harness.evaluate import evaluate_cell

            main = distributed.is_main_process()
            if main:
                update_status(run_dir, state="evaluating")
            result["evals"] = evaluate_cell(cfg)
            if main:
                update_status(run_dir, state="finished")
        return result
    except Preempted:
        raise  # submitit requeues the job; the next attempt resumes from the checkpoint
    except Exception as e:  # noqa: BLE001 - a failed cell records why and lets the others go on
        log.exception("cell %s failed", run_dir.name)
        reason = f"{type(e).__name__}: {_first_line(e)}"
        try:
            if distributed.is_main_process():
                if not run_dir.exists():
                    prepare_run_dir(cfg)
                update_status(run_dir, state="failed", reason=reason)
        except Exception:  # noqa: BLE001
            log.exception("could not record the failure of %s", run_dir)
        return {"run_dir": str(run_dir), "state": "failed", "reason": reason}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_cell(cfg)


if __name__ == "__main__":
    if "-m" not in sys.argv and "--multirun" not in sys.argv:
        sys.argv.insert(1, "--multirun")  # the sweep is always a multirun, even of one cell
    main()
