"""The sweep: every cell of a Hydra grid as its own job, validated and planned before anything starts.

    python -m harness.sweep -m model=S,B,L,XL patch=2,4,8            # the paper's grid, one machine
    python -m harness.sweep -m sweeps=paper hydra/launcher=slurm      # one SLURM job per cell
    python -m harness.sweep -m sweeps=demo                            # the CPU demo on digits
    python -m harness.sweep -m sweeps=paper plan=true                 # print the plan and exit

`GridSweep` (Hydra's basic sweeper plus what a scaling study needs) composes every cell first and
reports every bad value of the whole grid in one error, before a folder is created or a job submitted.
It prints the plan (params, Gflops, training compute, estimated GPU-hours), skips cells that are
finished already (so relaunching or extending a grid only runs what is missing) and cells another process
holds (another sweep, or a job still running), groups the rest by the resources their cost calls for,
and launches them. A failed cell records its reason in its own status.json and never stops the others;
the multirun then exits non-zero naming it.
"""

from __future__ import annotations

# --help answers before anything heavy is imported (torch, Hydra's loader): in well under a second.
from harness.core.help import exit_with_help_if_asked

exit_with_help_if_asked("sweep", __name__)

import contextlib
import copy
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import submitit
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf

from harness import tracking
from harness.cell import (
    cell_facts,
    cell_id,
    extractor_for,
    hold,
    identity,
    load_run_config,
    prepare_run_dir,
    read_facts,
    run_dir_for,
    validate,
)
from harness.core import cli, distributed, lease, throughput
from harness.core.compute import (
    EXTRACTOR_GFLOPS,
    FORWARD_BACKWARD_FACTOR,
    IN_HOUSE_EXTRACTOR_GFLOPS,
    evaluation_gflops,
    sampler_evaluations,
    train_compute_gflops,
    validation_gflops,
)
from harness.core.config import CONF_DIR, DEFAULT_VAL_IMAGES, compact_error, compose, eval_steps
from harness.core.runfolder import atomic_write_json, now_iso, read_json, read_status, update_status
from harness.evaluate import evaluate_cell, evaluation_done
from harness.train import Preempted, train

log = logging.getLogger(__name__)

TIMEOUT_SLACK = 1.25  # a job's time limit is its estimated wall time plus 25%
MIN_TIMEOUT_MIN = 60
# A sweep that would run longer than this on this machine's CPU starts only with confirm_local=true.
LOCAL_HOURS_ASKED = 1.0
LOCAL_POLL_S = 1.0  # how often the local process launcher looks for a finished cell
REASON_CHARS = 600  # a failure's reason in status.json: enough for a traceback's last line and the file


def _fail(message: str, code: int = cli.BAD_INPUT_EXIT) -> None:
    """Prints a grid problem without a traceback and exits non-zero (a message, not a crash)."""
    cli.fail(message, code)


def estimate_gpu_hours(gflops: float, global_batch: int, steps: int, rate: float | None = None) -> float:
    """Returns the GPU-hours to train a cell (training alone) at the recorded per-GPU throughput."""
    compute = {"train": train_compute_gflops(gflops, global_batch, steps)}
    return hours_at(compute, rate or throughput.gpu_image_gflops_per_s())["train"]


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
    hours = gpu_hours / gpus * TIMEOUT_SLACK
    timeout_min = int(min(r.timeout_min, max(MIN_TIMEOUT_MIN, math.ceil(hours * 60))))
    return {"gpus_per_node": per_node, "nodes": nodes, "tasks_per_node": per_node, "timeout_min": timeout_min}


def cell_compute(cfg: Any, gflops: float) -> dict:
    """Returns a cell's compute in the paper's units (Gflops): {"train": forward and backward of every step,
    "validation": its validation losses, "evaluation": sampling and feature extraction of every evaluation}."""
    t, e = cfg.train, cfg.eval
    records = len(set(range(t.val_every, t.steps + 1, t.val_every)) | set(eval_steps(cfg)) | set(t.val_at_steps))
    evals = 0 if cfg.stage == "train" else len(eval_steps(cfg))
    extractor = extractor_for(cfg)
    extractor_gflops = EXTRACTOR_GFLOPS.get(extractor, IN_HOUSE_EXTRACTOR_GFLOPS)
    if "fd_dinov2" in e.metrics:
        extractor_gflops += EXTRACTOR_GFLOPS.get(e.dinov2_model, EXTRACTOR_GFLOPS["dinov2-vit-l-14"])
    per_eval = evaluation_gflops(gflops, e.num_samples, sampler_evaluations(e.sampler, e.sampling_steps),
                                 e.cfg_scale > 1.0, extractor_gflops)
    return {"train": train_compute_gflops(gflops, t.global_batch, t.steps),
            "validation": validation_gflops(gflops, t.val_images or DEFAULT_VAL_IMAGES, t.val_times, records),
            "evaluation": evals * per_eval}


def hours_at(compute_gflops: dict, rate: float) -> dict:
    """Returns {part: hours} of a cell's compute at a device's training rate (training images/s x Gflops). The
    compute is in the paper's units, where a training image counts FORWARD_BACKWARD_FACTOR forward passes: so
    training, and forward-only work (validation, sampling, extraction) alike, run at that factor times the rate."""
    return {part: g / (FORWARD_BACKWARD_FACTOR * rate) / 3600.0 for part, g in compute_gflops.items()}


def plan_row(cfg: Any, rate: float) -> dict:
    """Returns a cell's plan: its facts, compute (training, validation, evaluation), estimated GPU-hours of each
    and in all, and the resources its cost calls for."""
    facts = cell_facts(cfg)
    compute = cell_compute(cfg, facts["gflops"])
    hours = hours_at(compute, rate)
    gpu_hours = sum(hours.values())
    return {**facts, "train_compute_gflops": compute["train"], "compute_gflops": compute,
            "train_gpu_hours": hours["train"] + hours["validation"], "eval_gpu_hours": hours["evaluation"],
            "est_gpu_hours": gpu_hours, "resources": cell_resources(cfg, gpu_hours)}


def format_plan(rows: list[dict], states: dict[str, str], rate: float, notes: dict[str, str] | None = None) -> str:
    """Returns the plan as a table: one line per cell with its cost and what the sweep will do with it
    (`states`: the cells it skips and why; `notes`: what a cell it runs still needs, default "to run")."""
    notes = notes or {}
    head = (f"{'cell':<52} {'objective':>9} {'params':>9} {'Gflops':>8} {'train Gflops':>12} {'train GPU-h':>11}"
            f" {'eval GPU-h':>10} {'GPUs':>4}  state")
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r["resources"]
        lines.append(
            f"{r['cell_id']:<52} {r['objective']:>9} {r['params'] / 1e6:>8.2f}M {r['gflops']:>8.3g}"
            f" {r['train_compute_gflops']:>12.3e} {r['train_gpu_hours']:>11.2f} {r['eval_gpu_hours']:>10.2f}"
            f" {res['gpus_per_node'] * res['nodes']:>4}  {states.get(r['cell_id'], notes.get(r['cell_id'], 'to run'))}"
        )
    skipped = [r for r in rows if r["cell_id"] in states]
    total = sum(r["est_gpu_hours"] for r in rows)
    todo = total - sum(r["est_gpu_hours"] for r in skipped)
    evaluation = sum(r["eval_gpu_hours"] for r in rows)
    lines.append(f"{len(rows)} cells, {len(rows) - len(skipped)} to run; estimated GPU-hours: {total:.1f} in all "
                 f"({total - evaluation:.1f} training and validation, {evaluation:.1f} evaluation), {todo:.1f} still "
                 f"to run (at {rate:.0f} image-Gflops/s of training per GPU)")
    return "\n".join(lines)


def _duration(hours: float) -> str:
    """Returns hours as a person says them: '40 minutes', '3.2 hours', '12 days', '4.1 years'."""
    if hours < 1:
        return f"{hours * 60:.0f} minutes"
    if hours < 48:
        return f"{hours:.2g} hours"
    if hours < 24 * 365:
        return f"{hours / 24:.3g} days"
    return f"{hours / 24 / 365:.3g} years"


def local_rates(rows: list[dict], states: dict[str, str], cfg: Any) -> dict[str, float] | None:
    """Returns {cell id: CPU training rate (image-Gflops/s) recorded for a model of its size} of the cells still to
    run, or None when they would not run here on a CPU (a SLURM launcher, a CUDA device) and the question does
    not arise."""
    if cfg.device == "cuda" or (cfg.device == "auto" and distributed.cuda_available()):
        return None
    return {r["cell_id"]: throughput.cpu_image_gflops_per_s(r["gflops"]) for r in rows if r["cell_id"] not in states}


def local_hours(rows: list[dict], rates: dict[str, float]) -> float:
    """Returns the hours the cells of `rates` (local_rates) would take on this machine's CPU, each at its rate."""
    return sum(sum(hours_at(r["compute_gflops"], rates[r["cell_id"]]).values()) for r in rows if r["cell_id"] in rates)


def _rates_text(rates: dict[str, float]) -> str:
    """Returns the CPU training rates the plan times its cells at, as the plan prints them."""
    shown = sorted({float(f"{rate:.2g}") for rate in rates.values()})
    if len(shown) > 1:
        return f"{shown[0]:g} to {shown[-1]:g} image-Gflops/s of training, by model size"
    return f"{shown[0] if shown else throughput.cpu_image_gflops_per_s():.2g} image-Gflops/s of training"


def cell_done(cfg: Any) -> bool:
    """True when the cell's training is finished and every configured evaluation has its record, made
    with the current evaluation settings and holding every metric asked for (anything else is work to do)."""
    run_dir = run_dir_for(cfg)
    status = read_status(run_dir)
    # "evaluating" is not done (its evals resume), nor a cell evaluated (stage=eval) before its training ended
    if status.get("state") != "finished" or not _training_over(status, cfg):
        return False
    if cfg.stage == "train":
        return True
    return all(evaluation_done(cfg, run_dir, s) for s in eval_steps(cfg))


def held_elsewhere(cfg: Any) -> str | None:
    """Returns who holds the cell's run folder when a live process other than this one does, else None."""
    info = lease.read_lease(run_dir_for(cfg))
    if info is None or info.get("stale"):
        return None
    return lease.describe_lease(info)


class GridSweep:
    """The grid sweeper's logic: validate the whole grid, print the plan, launch only what is missing."""

    def __init__(self, params: dict[str, str] | None = None):
        # Imported here: Hydra's plugin scan executes its core plugin modules again, and the sweeper must be
        # built from the classes Hydra holds after that scan (a top-level import breaks its super() calls).
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self._basic = BasicSweeper(max_batch_size=None, params=params)
        self._composed: dict[tuple, DictConfig] = {}  # config-group choices -> their composed config

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self._basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.hydra_context, self.config = hydra_context, config
        self.launcher = self._basic.launcher

    def sweep(self, arguments: list[str]) -> Any:
        params_conf = self._basic._parse_config() if self._basic.params else []
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = self._basic.split_arguments(parser.parse_overrides(params_conf), None)
        jobs = [list(j) for batch in batches for j in batch]

        cfgs, problems = [], []
        for overrides in jobs:
            label = " ".join(overrides) or "(defaults)"
            try:
                cfg = self.compose_cell(overrides)
            except Exception as e:  # noqa: BLE001 - composition errors (unknown key/option, wrong type)
                problems.append(f"[{label}] {compact_error(e)}")
                continue
            problems += [f"[{label}] {p}" for p in validate(cfg)]
            cfgs.append((overrides, cfg))
        if problems:
            _fail(_problem_list("the grid has", problems, "nothing was created or submitted"))

        if _is_local_processes(self.launcher):
            try:
                local_slots(self.launcher.params.get("cpus_per_task"), machine_cores())
            except cli.BadInput as e:
                _fail(f"{e}; nothing was created or submitted")
        ids = [cell_id(c) for _, c in cfgs]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            _fail(f"these cells appear more than once in the grid: {sorted(dupes)}")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        rate = throughput.gpu_image_gflops_per_s()
        rows = [plan_row(c, rate) for _, c in cfgs]
        conflicts = _foreign_cells(sweep_dir, str(self.config.sweep_name), [(c, r) for (_, c), r in zip(cfgs, rows)])
        if conflicts:
            _fail(_problem_list(f"{sweep_dir} already holds results that would mix with this grid's:", conflicts,
                                "nothing was created or submitted (use another sweep_name=... or out_dir=..., or "
                                "move the old run folders away)"))
        states, notes = {}, {}  # cells skipped (and why); what a cell still to run needs
        for _, c in cfgs:
            if cell_done(c):
                states[cell_id(c)] = "done, skipped"
            elif (holder := held_elsewhere(c)) is not None:
                states[cell_id(c)] = f"held by {holder}; skipped"
            elif _trained(c, run_dir_for(c)):
                notes[cell_id(c)] = "trained; evaluations to do"
        print(f"sweep folder: {sweep_dir.resolve()}", flush=True)
        print(format_plan(rows, states, rate, notes), flush=True)
        here_cpu = _submitit_kind(self.launcher) != "slurm"  # Hydra's launcher or the local processes
        rates = local_rates(rows, states, cfgs[0][1] if cfgs else self.config) if here_cpu else None
        here = None if rates is None else local_hours(rows, rates)
        if here is not None:
            print(f"on this machine's CPU: about {_duration(here)} (at {_rates_text(rates)})", flush=True)
        if self.config.plan:
            return []
        if here is not None and here > LOCAL_HOURS_ASKED and not self.config.confirm_local:
            _fail(f"this sweep would run about {_duration(here)} on this machine's CPU ({len(rows) - len(states)} "
                  "cells, training and evaluation): run the CPU demo (python -m harness.sweep -m sweeps=demo), "
                  "submit to SLURM (hydra/launcher=slurm cluster=...), or pass confirm_local=true to start it here; "
                  "nothing was started")

        _record_sweep(sweep_dir, self.config, ids)
        todo = [(o, c, r) for (o, c), r in zip(cfgs, rows) if r["cell_id"] not in states]
        if _is_local_processes(self.launcher):
            outcomes = _launch_local(self.launcher, todo)
        elif _is_submitit(self.launcher):
            outcomes = _launch_submitit(self.launcher, todo)
        else:  # one machine: Hydra's launcher runs the cells one after another; resources do not apply
            returns = self.launcher.launch([o for o, _, _ in todo], initial_job_idx=0) if todo else []
            outcomes = [(item, _job_value(ret)) for item, ret in zip(todo, returns)]

        failed = [f"{r['cell_id']}: {value.get('reason')}" for (_, _, r), value in outcomes
                  if value.get("state") != "finished"]
        unwritten = _write_report(sweep_dir, self.config) if self.config.report else []
        if failed:  # a run's outcome, not bad input: one line per failed cell, each with its reason
            print(f"error: {len(failed)} cell(s) failed (see their status.json):\n  - " + "\n  - ".join(failed),
                  file=sys.stderr, flush=True)
            raise SystemExit(cli.FAILED_EXIT)
        done = sum(1 for s in states.values() if s.startswith("done"))
        held = len(states) - done
        elsewhere = sum(1 for _, value in outcomes if value.get("note") == DONE_ELSEWHERE)
        print(f"sweep {sweep_dir}: {len(rows)} cells, {done} already done, {len(todo) - elsewhere} run now"
              + (f", {elsewhere} done by another process while this sweep waited for them" if elsewhere else "")
              + (f", {held} held by other processes (relaunch when they finish)" if held else ""), flush=True)
        if unwritten:
            print(f"not written in the report: {', '.join(unwritten)} (see report.md)", flush=True)
        return [value for _, value in outcomes]


    def compose_cell(self, overrides: list[str]) -> DictConfig:
        """Returns one cell's config, as Hydra composes it for the job (load_sweep_config), but composing the
        config-group choices (model=, data=, ...) once per distinct set: a 48-cell grid has a handful, and each
        composition costs ~0.1 s. The cell's plain values (patch=, cond=, train.lr=, ...) are then applied as
        Hydra applies them after composing (tests compare the two on whole grids)."""
        # Imported here: see __init__ (Hydra's plugin scan executes its internal modules again).
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        loader = self.hydra_context.config_loader
        parsed = OverridesParser.create().parse_overrides(overrides)
        groups = [o for o in parsed if loader.repository.group_exists(o.key_or_group)
                  and not isinstance(o.value(), dict)]
        values = [o for o in parsed if o not in groups]
        key = tuple(o.input_line for o in groups)
        if key not in self._composed:
            self._composed[key] = loader.load_sweep_config(self.config, list(key))
        cfg = copy.deepcopy(self._composed[key])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        return cfg


def _problem_list(head: str, problems: list[str], tail: str) -> str:
    """Returns problems as one line when there is one, else a head line and one line per problem."""
    if len(problems) == 1:
        return f"{head} 1 problem; {tail}: {problems[0]}" if head.endswith("has") else f"{head} {problems[0]}; {tail}"
    return f"{head} {len(problems)} problem(s); {tail}: " + "; ".join(problems)


def _job_value(ret: JobReturn) -> dict:
    """Returns a cell's result dict from Hydra's JobReturn; a job that raised becomes a failure with its reason."""
    if ret.status == JobStatus.COMPLETED and isinstance(ret.return_value, dict):
        return ret.return_value
    return {"state": "failed", "reason": _reason(ret._return_value)}


def _submitit_kind(launcher) -> str | None:
    """Returns hydra-submitit-launcher's executor ("slurm" or "local") for its launchers, else None. By class
    name: Hydra's plugin scan can import the plugin's module a second time in one process, and the launcher it
    builds then fails isinstance against this module's import of the class."""
    if any(k.__name__ == "BaseSubmititLauncher" for k in type(launcher).__mro__):
        return launcher._EXECUTOR
    return None


def _is_submitit(launcher) -> bool:
    return _submitit_kind(launcher) is not None


def _is_local_processes(launcher) -> bool:
    """True for submitit's local launcher (hydra/launcher=local_parallel): cells as processes on this machine."""
    return _submitit_kind(launcher) == "local"


def _launch_submitit(launcher, todo: list) -> list[tuple[Any, dict]]:
    """Submit every cell (one job array per resource group, all groups at once), then wait for all.

    This does what hydra-submitit-launcher's `launch` does, with two differences a long sweep needs: the
    groups are submitted together rather than one after the other, and a job that dies without a result
    (OOM, node failure, scancel) becomes a failed cell with its reason instead of an exception that stops
    the sweep from waiting for the others and leaves the dead cell marked running.
    """
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

    return [(item, _job_outcome(item, job)) for item, job in submitted]


def _job_outcome(item: tuple, job) -> dict:
    """Returns a submitted cell's result dict once its job has ended; a job that died without a result (OOM, node
    failure, scancel, a killed process) becomes a failed cell, recorded in its status.json when nobody else holds
    the folder."""
    _, c, _ = item
    try:
        return _job_value(job.results()[0])
    except Exception as e:  # noqa: BLE001 - the job died without a result
        value = {"state": "failed", "reason": f"job {job.job_id} ended without a result: {_reason(e)}"}
        run_dir = run_dir_for(c)
        if (run_dir.exists() and read_status(run_dir).get("state") != "finished"
                and held_by_ended_job_or_nobody(lease.read_lease(run_dir), job.job_id)):
            update_status(run_dir, state="failed", reason=value["reason"])
        return value


def machine_cores() -> int:
    """Returns the cores this process may run on (its CPU affinity, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpus_per_cell(cpus_per_task: int | None) -> int:
    """Returns the cores each cell of the local process launcher gets: hydra.launcher.cpus_per_task, 1 if unset."""
    return 1 if cpus_per_task is None else cpus_per_task


def local_slots(cpus_per_task: int | None, cores: int) -> int:
    """Returns how many cells the local process launcher runs at once: each gets `cpus_per_task` of `cores`."""
    per_cell = cpus_per_cell(cpus_per_task)
    if not 1 <= per_cell <= cores:
        raise cli.BadInput(f"hydra.launcher.cpus_per_task={per_cell} is not a share of this machine's {cores} "
                           f"cores; allowed: 1 to {cores}")
    return cores // per_cell


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Sets environment variables for what starts inside the block (a local job copies os.environ), then restores
    them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _launch_local(launcher, todo: list) -> list[tuple[Any, dict]]:
    """Runs the cells as processes on this machine (submitit's local executor), as many at once as the machine
    has cores for at hydra.launcher.cpus_per_task each; a cell starts when one ends, in grid order.

    Each process gets cpus_per_task math-library threads (torch would otherwise start one per core in every
    process, and processes that share cores that way run several times slower than one after another) and no
    progress bars (its output goes to its log file, named when it starts). What it buys depends on the machine:
    on two cores, sweeps=scaling took about as long as one after another (docs/benchmarks.md).
    """
    params = dict(launcher.params)
    at_once = local_slots(params.get("cpus_per_task"), machine_cores())  # checked before the plan was printed
    per_cell = cpus_per_cell(params.get("cpus_per_task"))
    executor = submitit.AutoExecutor(cluster="local", folder=params["submitit_folder"])
    executor.update_parameters(timeout_min=params["timeout_min"], name=params.get("name") or "cell")
    threads = {k: str(per_cell) for k in throughput.THREAD_VARS}
    pending, running, outcomes = list(enumerate(todo)), {}, {}
    print(f"running {len(todo)} cell(s) as processes here, {at_once} at a time, {per_cell} core(s) each", flush=True)
    try:
        while pending or running:
            while pending and len(running) < at_once:
                i, item = pending.pop(0)
                with _environment({**threads, "HARNESS_NO_BAR": "1"}):
                    job = executor.submit(launcher, list(item[0]), "hydra.sweep.dir", i, f"job_id_for_{i}",
                                          Singleton.get_state())
                running[i] = (item, job, time.monotonic())
                print(f"  started  {item[2]['cell_id']} (log: {job.paths.stdout})", flush=True)
            ended = [i for i, (_, job, _) in running.items() if job.done()]
            if not ended:
                time.sleep(LOCAL_POLL_S)
            for i in ended:
                item, job, t0 = running.pop(i)
                outcomes[i] = (item, _job_outcome(item, job))
                state = outcomes[i][1].get("state")
                print(f"  {state:8s} {item[2]['cell_id']} after {(time.monotonic() - t0) / 60:.1f} min "
                      f"({len(outcomes)} of {len(todo)})", flush=True)
    except BaseException:  # Ctrl-C or a crash here: the cells still running stop too (each resumes on relaunch)
        for _, job, _ in running.values():
            job.cancel(check=False)
        raise
    return [outcomes[i] for i in range(len(todo))]


def held_by_ended_job_or_nobody(info: dict | None, job_id: str) -> bool:
    """True when the lease record `info` (lease.read_lease) is no live holder's but, at most, that of the
    SLURM job `job_id` ("123" or array task "123_4"), which has ended: its failure is then ours to record.
    A job killed on another node leaves a lease that looks live until it goes stale (minutes)."""
    if info is None or info.get("stale"):
        return True
    slurm = info.get("slurm") or {}
    ids = {slurm.get("job_id"), f"{slurm.get('array_job_id')}_{slurm.get('array_task_id')}"}
    return str(job_id) in ids


def _group_by_resources(todo: list) -> dict:
    groups: dict = {}
    for item in todo:
        key = tuple(sorted(item[2]["resources"].items()))
        groups.setdefault(key, []).append(item)
    return groups


def _coords(facts: dict) -> tuple:
    """Where a cell sits in a grid: two cells with the same coordinates must have the same config."""
    return (facts.get("model"), facts.get("patch"), facts.get("cond"), facts.get("data"), facts.get("seed"),
            facts.get("objective", "ddpm"), facts.get("parametrization", "sp"))


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
    try:
        meta = read_json(sweep_dir / "sweep.json")
    except ValueError:
        meta = None  # a torn sweep.json is rewritten by this launch
    if meta is not None and meta.get("name") != name:
        return [f"it is the folder of sweep {meta.get('name')!r}, this grid is sweep_name={name!r}"]
    ids = {row["cell_id"] for _, row in cells}
    new = {_coords(row): c for c, row in cells}  # the plan rows already hold each cell's facts
    problems = []
    for facts_path in sorted(sweep_dir.glob("*/cell.json")):
        old = read_facts(facts_path.parent)
        c = new.get(_coords(old)) if old else None
        if c is None or old["cell_id"] in ids:
            continue
        try:
            before = _flat(identity(load_run_config(facts_path.parent, [])))
        except (FileNotFoundError, ValueError):
            before = {}
        after = _flat(identity(c))
        diff = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after))
                if before.get(k) != after.get(k)]
        problems.append(f"{old['cell_id']} is the same cell with another config ({'; '.join(diff) or 'hash'})")
    return problems


def _record_sweep(sweep_dir: Path, config: DictConfig, ids: list[str]) -> None:
    """sweep.json marks a sweep folder and lists every cell ever launched into it (two sweeps launched together
    into one folder each add their cells: the read-modify-write is locked)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with lease.folder_lock(sweep_dir):
        try:
            meta = read_json(sweep_dir / "sweep.json") or {}
        except ValueError:
            meta = {}  # torn: rebuilt from this grid and the run folders present
            ids = ids + [p.parent.name for p in sweep_dir.glob("*/cell.json")]
        meta.setdefault("name", str(config.sweep_name))
        meta["created"] = meta.get("created") or now_iso()
        meta["grid"] = sorted(set(meta.get("grid", [])) | set(ids))
        meta["updated"] = now_iso()
        atomic_write_json(sweep_dir / "sweep.json", meta)


def _write_report(sweep_dir: Path, config: DictConfig) -> list[str]:
    """Writes the report, prints each cell's last evaluation, the paths of the table and the FID-vs-Gflops
    figure and the measured correlation, logs the results table to wandb once; returns the names of what could
    not be written (never raises)."""
    # Here, not at the top: the analysis stack (pandas, scipy, matplotlib) takes seconds to import, and the plan
    # of a grid must be instant; it is needed only once the cells are done.
    from harness.report import build_report

    try:
        report = build_report([sweep_dir], sweep_dir / "report")
    except Exception as e:  # noqa: BLE001 - a report problem must not hide the cells' results
        log.error("the report could not be written: %s", e)
        return ["the whole report"]
    if report.last is not None and len(report.last):
        print("each cell's last evaluation:\n" + report.last.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
              flush=True)
    for name in ("results.csv", "fig8_gflops.png", "report.md"):
        if (report.path.parent / name).exists():
            print(f"{name:<16} {report.path.parent / name}", flush=True)
    corr = report.correlation
    if corr is None:
        # Not a failure: a compute-optimal study evaluates each size at its own steps by design.
        print("FID-Gflops correlation (the paper's Figure 8): not computed, fewer than 3 cells share an evaluated "
              "step and protocol; report.md has what was measured", flush=True)
    else:
        print(f"{corr['label']} vs Gflops at step {corr['step']} over {corr['n']} cells: Spearman "
              f"{corr['spearman']:.3f}, Pearson(FID, log10 Gflops) {corr['pearson_log10_gflops']:.3f} (paper: -0.93)",
              flush=True)
    try:
        tracking.log_results_table(config, sweep_dir, report.table)
    except Exception as e:  # noqa: BLE001 - tracking must never fail a finished sweep
        log.error("the results table could not be logged to wandb: %s", e)
        return [*report.not_written, "the wandb results table"]
    return report.not_written


def _reason(e: Any) -> str:
    """Returns why a job or task failed, as status.json records it: one line of at most REASON_CHARS."""
    return cli.one_line(e, limit=REASON_CHARS)


# ---- the task: one cell ----

DONE_ELSEWHERE = "done by another process"  # run_cell's note for a cell finished while its task waited


def run_cell(cfg: DictConfig) -> dict:
    """Train the cell (resuming), then evaluate its configured checkpoints; never raises for a cell failure.

    The cell's run folder is held for the whole task; when another process holds it (a sweep launched
    twice, a job still running), the task waits for it (or cfg.lock_wait_s seconds) and then does only what
    is left, so between them every cell is trained and evaluated once.
    """
    run_dir = run_dir_for(cfg)
    wait_s = cfg.lock_wait_s if cfg.lock_wait_s is not None else float("inf")
    try:
        env = distributed.init(cfg.device)
        if env.is_main:
            prepare_run_dir(cfg)
        distributed.barrier()
        with hold(run_dir, "sweep", env, wait_s) as held:
            if cell_done(cfg):  # done by whoever held the folder while this task waited for it
                return {"run_dir": str(run_dir), "state": "finished", "note": DONE_ELSEWHERE}
            try:
                return _run_stages(cfg, run_dir, env)
            except Preempted:
                raise
            except Exception as e:  # noqa: BLE001 - a failed cell records why and lets the others go on
                log.exception("cell %s failed", run_dir.name)
                reason = f"{type(e).__name__}: {_reason(e)}"
                if env.is_main and not held.lost:  # a folder taken over is not ours to write
                    try:
                        update_status(run_dir, state="failed", reason=reason)
                    except OSError:
                        log.exception("could not record the failure of %s", run_dir)
                return {"run_dir": str(run_dir), "state": "failed", "reason": reason}
    except Preempted:
        raise  # submitit requeues the job; the next attempt resumes from the checkpoint
    except Exception as e:  # noqa: BLE001 - the folder could not be made or taken: nothing of it was touched
        log.exception("cell %s could not start", run_dir.name)
        return {"run_dir": str(run_dir), "state": "failed", "reason": f"{type(e).__name__}: {_reason(e)}"}


def _trained(cfg: DictConfig, run_dir: Path) -> bool:
    """True when the cell's training is over (finished, or killed while evaluating) at its last step."""
    return _training_over(read_status(run_dir), cfg)


def _training_over(status: dict, cfg: DictConfig) -> bool:
    """True when a cell's status.json says its training is over (finished, or killed while evaluating)."""
    return status.get("state") in ("finished", "evaluating") and (status.get("step") or 0) >= cfg.train.steps


def _run_stages(cfg: DictConfig, run_dir: Path, env) -> dict:
    """Trains (stage all/train) and evaluates (stage all/eval) a cell whose folder this process holds; a cell
    whose training is over only gets the evaluations it lacks (no new attempt is counted)."""
    if cfg.stage in ("all", "train") and not _trained(cfg, run_dir):
        result = train(cfg)
    else:
        result = {"run_dir": str(run_dir), "state": "finished"}
    if cfg.stage in ("all", "eval"):
        before = read_status(run_dir)
        if env.is_main:
            update_status(run_dir, state="evaluating")
        result["evals"] = evaluate_cell(cfg)
        if env.is_main:  # a cell evaluated before its training ended is not finished: a later sweep trains it
            trained = (before.get("step") or 0) >= cfg.train.steps
            update_status(run_dir, state="finished" if trained else "interrupted", reason=None if trained else
                          f"evaluated at step {before.get('step') or 0} of {cfg.train.steps}; training not finished")
    return result


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_cell(cfg)


def preflight(argv: list[str]) -> None:
    """Composes the un-swept overrides once, as Hydra will before the sweeper runs, so that a bad one is
    said in one line (exit 2) instead of Hydra's multi-line error; swept values are checked by GridSweep."""
    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception as e:  # noqa: BLE001 - a malformed override
        cli.fail(compact_error(e))
    # Hydra's own overrides stay in: a cluster preset sets keys of the launcher that hydra/launcher=slurm selects.
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        compose(fixed)
    except cli.BadInput as e:
        if cli.debug():
            raise
        cli.fail(e)


# Hydra's own flags that run no sweep (shell completion, its help, what a config composes to): handed to Hydra as
# they are.
HYDRA_FLAGS = ("-sc", "--shell-completion", "--hydra-help", "--info", "-i", "--cfg", "-c")

if __name__ == "__main__":
    # Hydra's completion strips `python script.py` from the line it completes, not `python -m module`: the module
    # is named as the script path (as long, so the cursor position stays right).
    if "-m harness.sweep" in os.environ.get("COMP_LINE", ""):
        os.environ["COMP_LINE"] = os.environ["COMP_LINE"].replace("-m harness.sweep", "harness/sweep.py", 1)
    if not any(a in HYDRA_FLAGS for a in sys.argv[1:]):
        if "-m" not in sys.argv and "--multirun" not in sys.argv:
            sys.argv.insert(1, "--multirun")  # the sweep is always a multirun, even of one cell
        preflight(sys.argv[1:])
    main()
