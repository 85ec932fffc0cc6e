"""The grid sweep on the local launcher (`python -m harness.sweep -m ...`): the plan, idempotent relaunch and
extension, failed cells, every kind of bad input rejected before anything exists, and the status CLI.

A sweep that trains runs as a subprocess from the repository root, as a user runs it. Runs that must do
nothing (bad input, plan=true, relaunching a finished grid) go through the same Hydra entry point
(`harness.sweep.main`) in this process: a process each would only add start-up time.
"""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_CELL, ConfigPlus
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from harness import status, sweep
from harness.cell import load_run_config
from harness.core import checkpoint, cli, config, throughput
from harness.core.config import Config, compose
from harness.core.runfolder import read_json, read_jsonl, update_status

REPO = Path(__file__).resolve().parents[1]
SWEEP_TIMEOUT_S = 300  # a hung sweep fails the test instead of the CI job
STEPS = 10
CKPT_EVERY = 5
LOG_EVERY = 5
# A cell a shared 2-core CPU trains in seconds: a 1-block DiT on 8x8 digits, FID (digits extractor) from
# 20 samples. Off-paper and tiny on purpose: these tests check the sweep's bookkeeping, not the numbers.
TINY = [
    *TINY_CELL, f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", f"train.log_every={LOG_EVERY}",
    "train.val_every=5", "eval=digits", "eval.num_samples=20", "eval.sampling_steps=5", f"eval.at_steps=[{STEPS}]",
    "eval.batch_size=20", "eval.shard_size=20", "report=false",
]
CELL_ID = re.compile(r"^(DiT-demo-S-(\d)_adaln_zero_digits_s0_[0-9a-f]{8})\s")
NAN_LR = "1e30"  # weights jump to ~1e30 after one AdamW step: the loss is NaN by the first logged step


def run_sweep(out_dir, *overrides):
    """Runs the sweep to completion; returns the CompletedProcess (text stdout and stderr). It inherits the
    session's harness cache (tests/conftest.py), so the digits extractor trains once."""
    cmd = [sys.executable, "-m", "harness.sweep", "-m", *TINY, *overrides, f"out_dir={out_dir}"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)


def sweep_in_process(monkeypatch, out_dir, *overrides):
    """Runs harness.sweep's Hydra entry point in this process; returns its exit code."""
    monkeypatch.setattr(sys, "argv", ["harness.sweep", "-m", *TINY, *overrides, f"out_dir={out_dir}"])
    try:
        sweep.main()
    except SystemExit as e:
        return e.code
    return 0


def plan_ids(stdout):
    """{patch: cell id} of the plan's rows."""
    return {int(m.group(2)): m.group(1) for line in stdout.splitlines() if (m := CELL_ID.match(line))}


def snapshot(run_dir):
    """What a relaunch must leave untouched: the training log and the attempts count."""
    return (run_dir / "metrics.jsonl").read_bytes(), read_json(run_dir / "status.json")["attempts"]


def assert_finished(run_dir, attempts):
    st = read_json(run_dir / "status.json")
    assert (st["state"], st["step"], st["attempts"]) == ("finished", STEPS, attempts), st
    assert STEPS in checkpoint.list_steps(run_dir / "checkpoints")
    record = read_json(run_dir / "evals" / f"step_{STEPS}.json")
    assert record is not None, f"no evals/step_{STEPS}.json in {run_dir}"
    assert record["step"] == STEPS and record["num_samples"] == 20
    assert math.isfinite(record["metrics"]["fid"]), record["metrics"]


def fake_kill_after_first_checkpoint(run_dir):
    """Leaves a finished `run_dir` as a kill between its first and second checkpoints would: newest
    checkpoint at CKPT_EVERY, its log up to there, state running, no evaluation."""
    for step in checkpoint.list_steps(run_dir / "checkpoints"):
        if step > CKPT_EVERY:
            path = checkpoint.ckpt_path(run_dir / "checkpoints", step)
            for p in path.parent.glob(f"{path.stem}.*"):
                p.unlink()
    assert checkpoint.list_steps(run_dir / "checkpoints") == [CKPT_EVERY]
    for folder in ("evals", "samples"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    kept = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("step", 0) <= CKPT_EVERY]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    update_status(run_dir, state="running", step=CKPT_EVERY)


@pytest.mark.process
def test_plan_then_relaunch_and_extension_run_only_what_is_missing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"

    assert sweep_in_process(monkeypatch, out, "patch=4,8", "plan=true") == 0
    plan = capsys.readouterr().out
    ids = plan_ids(plan)
    assert sorted(ids) == [4, 8]
    assert "2 cells, 2 to run; estimated GPU-hours" in plan
    for head in ("objective", "params", "Gflops", "train Gflops", "GPU-h"):
        assert head in plan
    for cid in ids.values():
        row = next(line for line in plan.splitlines() if line.startswith(cid)).split()
        objective, params_m, train_gflops = row[1], float(row[2].rstrip("M")), float(row[4])
        assert objective == "ddpm" and params_m > 0 and train_gflops > 0, row
    assert not out.exists(), "plan=true must create nothing"

    first = run_sweep(out, "patch=4,8")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in out.iterdir() if (p / "cell.json").exists()) == sorted(ids.values())
    for cid in ids.values():
        assert_finished(out / cid, attempts=1)
    assert sorted(read_json(out / "sweep.json")["grid"]) == sorted(ids.values())
    before = {cid: snapshot(out / cid) for cid in ids.values()}

    assert sweep_in_process(monkeypatch, out, "patch=4,8") == 0
    assert "2 already done, 0 run now" in capsys.readouterr().out
    assert {cid: snapshot(out / cid) for cid in ids.values()} == before, "a finished cell was run again"

    # Half-finished (patch 8 killed after its first checkpoint) and extended by a new cell (patch 2).
    fake_kill_after_first_checkpoint(out / ids[8])
    extended = run_sweep(out, "patch=2,4,8")
    assert extended.returncode == 0, extended.stderr
    new_id = plan_ids(extended.stdout)[2]
    assert new_id not in ids.values()
    assert "3 cells, 1 already done, 2 run now" in extended.stdout
    assert snapshot(out / ids[4]) == before[ids[4]], "the finished cell was touched"
    assert_finished(out / new_id, attempts=1)
    assert_finished(out / ids[8], attempts=2)
    resumes = [r for r in read_jsonl(out / ids[8] / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes == [{"event": "resume", "step": CKPT_EVERY}], "must resume from its checkpoint, not step 0"
    trained = [r["step"] for r in read_jsonl(out / ids[8] / "metrics.jsonl") if "loss" in r]
    assert trained == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), "steps before the checkpoint ran twice"

    done = {cid: snapshot(out / cid) for cid in [*ids.values(), new_id]}
    assert sweep_in_process(monkeypatch, out, "patch=2,4,8") == 0
    assert "3 already done, 0 run now" in capsys.readouterr().out
    assert {cid: snapshot(out / cid) for cid in done} == done

    # The harness is upgraded (its schema gains a defaulted field and a section): the same relaunch finds
    # every cell under its old name, done, and trains nothing.
    assert relaunch_upgraded(monkeypatch, out, "patch=2,4,8") == 0
    assert "3 already done, 0 run now" in capsys.readouterr().out
    assert {cid: snapshot(out / cid) for cid in done} == done


def relaunch_upgraded(monkeypatch, out_dir, *overrides) -> int:
    """Runs the sweep in this process as a harness whose schema is helpers.ConfigPlus would; returns its code."""
    store = ConfigStore.instance()
    store.store(name="schema", node=ConfigPlus)
    monkeypatch.setattr(config, "Config", ConfigPlus)  # the schema identity() reads
    try:
        return sweep_in_process(monkeypatch, out_dir, *overrides)
    finally:
        store.store(name="schema", node=Config)


def gpu_hours_between_patches(fine, coarse):
    """A GPU-hours-per-job limit between the plan's estimates (training, validation and evaluation) of the
    patch-`fine` and patch-`coarse` tiny cells, so the sweep gives them different resources (two launch groups)."""
    def hours(patch):
        row = sweep.plan_row(compose([*TINY, f"patch={patch}"]), throughput.gpu_image_gflops_per_s())
        return row["est_gpu_hours"]

    assert hours(fine) > hours(coarse)
    return math.sqrt(hours(fine) * hours(coarse))


@pytest.fixture(scope="module")
def failed_sweep(tmp_path_factory):
    """A sweep of two NaN cells and two good ones, in two resource classes (patch 2 would get two GPUs on
    SLURM, patch 8 one; on one machine they run in grid order); returns (out_dir, CompletedProcess)."""
    out = tmp_path_factory.mktemp("failed") / "sweep"
    limit = gpu_hours_between_patches(2, 8)
    result = run_sweep(out, f"train.lr={NAN_LR},0.001", "patch=2,8", "resources.max_gpus=2",
                       f"resources.gpu_hours_per_gpu_job_max={limit!r}")
    return out, result


@pytest.mark.process
def test_failed_cells_record_their_reason_and_the_others_finish(failed_sweep):
    out, result = failed_sweep
    assert result.returncode == 1, result.stderr
    cells = {p.name: read_json(p / "status.json") for p in out.iterdir() if (p / "cell.json").exists()}
    assert len(cells) == 4
    failed = {cid for cid, st in cells.items() if st["state"] == "failed"}
    finished = {cid for cid, st in cells.items() if st["state"] == "finished"}
    assert len(failed) == 2 and len(finished) == 2, cells
    for cid in failed:
        assert "non-finite loss" in cells[cid]["reason"]
        assert read_json(out / cid / "cell.json")["cell_id"] == cid
    for cid in finished:
        assert_finished(out / cid, attempts=1)
    # The exit message names exactly the failed cells.
    message = result.stderr[result.stderr.index("2 cell(s) failed"):]
    named = set(re.findall(r"^\s+- (DiT-\S+): ", message, flags=re.M))
    assert named == failed, message


def test_local_slots_share_the_cores_and_refuse_what_is_no_share():
    """Over every machine of 1 to 64 cores and every share: as many cells as fit whole, each with its share
    (no core idle that a further cell could use); a share of 0, a negative one or one above the machine is bad input."""
    for cores in range(1, 65):
        assert sweep.local_slots(None, cores) == cores
        for per_cell in range(1, cores + 1):
            slots = sweep.local_slots(per_cell, cores)
            assert slots >= 1 and slots * per_cell <= cores < (slots + 1) * per_cell
        for bad in (0, -1, cores + 1):
            with pytest.raises(cli.BadInput, match=f"cpus_per_task={bad} .* allowed: 1 to {cores}"):
                sweep.local_slots(bad, cores)


@pytest.mark.process
def test_local_processes_run_cells_side_by_side_each_on_its_share_of_the_cores(tmp_path):
    """hydra/launcher=local_parallel: every cell finishes as the one-after-another launcher's do, no more run at
    once than the cores allow (one each), on a machine of two cores or more some do, and each ran one thread."""
    out = tmp_path / "sweep"
    result = run_sweep(out, "seed=0,1,2", "hydra/launcher=local_parallel")
    assert result.returncode == 0, result.stderr
    cores = sweep.machine_cores()
    assert f"running 3 cell(s) as processes here, {cores} at a time, 1 core(s) each" in result.stdout
    dirs = [p for p in out.iterdir() if (p / "cell.json").exists()]
    assert len(dirs) == 3
    for run_dir in dirs:
        assert_finished(run_dir, attempts=1)
        st = read_json(run_dir / "status.json")
        assert st["torch_threads"] == 1, st
    # The launcher's own account, line by line: a cell starts while others run, never more than the cores.
    running, most = set(), 0
    for line in result.stdout.splitlines():
        if m := re.match(r"^\s+(started|finished)\s+(DiT-\S+)", line):
            (running.add if m.group(1) == "started" else running.remove)(m.group(2))
            most = max(most, len(running))
    assert not running, result.stdout
    assert most == min(cores, 3), result.stdout


@pytest.mark.process
def test_status_cli_reads_the_run_folders(failed_sweep, capsys):
    out, _ = failed_sweep
    assert status.main([str(out), "--json"]) == 0
    rows = {r["cell_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert len(rows) == 4
    states = sorted(r["state"] for r in rows.values())
    assert states == ["failed", "failed", "finished", "finished"]
    for r in rows.values():
        assert r["attempts"] == 1
        if r["state"] == "finished":
            assert (r["step"], r["total_steps"], r["evals"]) == (STEPS, STEPS, 1)
            assert math.isfinite(r["fid"]) and r["fid_label"] == "FID (digits extractor)"
        else:
            assert r["fid"] is None and "non-finite loss" in r["reason"]

    assert status.main([str(out)]) == 0
    table = capsys.readouterr().out
    for cid in rows:
        assert cid in table
    assert table.count("reason: TrainingFailed: non-finite loss") == 2
    assert table.rstrip().endswith("2 failed, 2 finished")


def test_status_cli_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    for path, says in ((tmp_path, "is not a sweep folder"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            status.main([str(path)])
        assert exit_.value.code == 2
        assert says in capsys.readouterr().err


# ---- bad input: rejected before any folder is created or any job submitted ----

# Each case sweeps the bad value beside a good one: the good cell must not run either.
BAD_INPUT = {
    "unknown model": (["model=demo-S,Q"], "Could not find 'model/Q'; allowed: B, L, S, XL, demo-B, demo-S"),
    "patch 3": (["patch=4,3"], "unknown patch 3; allowed: 2, 4, 8"),
    "patch not dividing the input": (["data=synthetic", "data.image_size=64,48", "patch=4"],
                                     "patch 4 does not divide input_size 6; patches that do: [2]"),
    "heads not dividing the width": (["model.num_heads=2,3"], "num_heads 3 does not divide hidden_size 32"),
    "unknown cond": (["cond=adaln_zero,film"], "unknown cond 'film'; allowed: in_context, cross_attn, adaln"),
    "unknown key": (["+train.warmup=0,1"], "unknown key train.warmup; allowed: steps, global_batch"),
    "misspelled key": (["train.step=10,20"], "Could not override 'train.step'. To append to your config use "
                                            "+train.step=10 Key 'step' not in 'TrainConfig'"),
    "negative steps": ([f"train.steps={STEPS},-5"], "train.steps=-5 must be positive"),
    "eval step beyond training": ([f"eval.at_steps=[{STEPS}],[{STEPS + 1}]"],
                                  f"eval.at_steps contains {STEPS + 1}: evaluation steps must lie in 1..train"),
    "unknown data set option": (["data=digits,cifar"], "Could not find 'data/cifar'; allowed: digits"),
    "unknown data set name": (["data.name=digits,cifar"], "unknown data set 'cifar'; allowed: digits"),
    "missing data path": (["data=digits,latents256"], "data.path is required for 'latents' (got None)"),
    "data path that does not exist": (["data=digits,latents256", "data.path=/nonexistent/shards"],
                                      "latents folder '/nonexistent/shards' does not exist"),
    "GPUs that do not divide the batch": (["resources.gpus_per_node=1,3"],
                                          "train.global_batch=16 is not divisible by the 3 GPUs"),
    "unknown sampler": (["eval.sampler=ddpm,euler"], "eval.sampler='euler' cannot sample a model trained with "
                                                     "objective='ddpm'; allowed: ['ddpm', 'ddim']"),
    "unknown device": (["device=cpu,tpu"], "device='tpu' is not one of ['auto', 'cpu', 'cuda']"),
    "wrong type": ([f"train.steps={STEPS},many"], "Value 'many' of type 'str' could not be converted to Integer"),
    "more cores per cell than the machine has": (
        ["hydra/launcher=local_parallel", "hydra.launcher.cpus_per_task=4096", "seed=0,1"],
        f"hydra.launcher.cpus_per_task=4096 is not a share of this machine's {sweep.machine_cores()} cores; "
        f"allowed: 1 to {sweep.machine_cores()}"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_rejected_before_anything_is_created(case, tmp_path, monkeypatch, capsys):
    overrides, expected = BAD_INPUT[case]
    out = tmp_path / "sweep"
    assert sweep_in_process(monkeypatch, out, *overrides) == 2
    err = capsys.readouterr().err
    assert "nothing was created or submitted" in err
    assert expected in err, err
    assert not out.exists(), f"{case}: {out} was created"


def test_every_bad_value_of_a_grid_is_reported_at_once(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    bad = ["patch=3", "cond=film", "train.steps=-5", "device=tpu", "eval.sampler=euler"]
    assert sweep_in_process(monkeypatch, out, *bad, "seed=0,1") == 2
    err = capsys.readouterr().err
    assert "the grid has 10 problem(s)" in err
    (line,) = err.strip().splitlines()  # one line: the problems follow the colon, each behind its cell's label
    problems = [p.split("] ", 1)[1] for p in re.split(r"; (?=\[)", line.split("submitted: ", 1)[1])]
    assert len(problems) == 10, err
    for fragment in ("unknown patch 3", "unknown cond 'film'", "train.steps=-5 must", "device='tpu'", "'euler'"):
        assert sum(fragment in p for p in problems) == 2, fragment  # once per cell
    assert not out.exists()


@pytest.mark.process
def test_bad_grid_from_the_command_line_exits_2_with_one_report(tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(out, "model=demo-S,Q", "patch=4,3")
    assert result.returncode == 2
    assert "the grid has 3 problem(s); nothing was created or submitted" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.process
def test_a_bad_value_outside_the_swept_keys_is_said_in_one_line_before_the_sweep(tmp_path):
    # Hydra composes the un-swept overrides once before the sweeper runs; the sweep composes them first
    # itself, so the bad one is said in one line (exit 2), not in Hydra's multi-line error.
    out = tmp_path / "sweep"
    result = run_sweep(out, "model=Q", "seed=0,1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Could not find 'model/Q'" in lines[0] and "demo-S" in lines[0]
    assert not out.exists()


def test_zero_gpus_is_rejected_as_bad_input(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert sweep_in_process(monkeypatch, out, "resources.gpus_per_node=0", "seed=0,1") == 2
    assert "resources.gpus_per_node=0" in capsys.readouterr().err
    assert not out.exists()


def test_cell_resources_give_the_expensive_cell_more_gpus_and_time():
    """The one rule in config: XL/2 at the paper's recipe gets more GPUs and a longer limit than S/8."""
    cfg = OmegaConf.structured(Config)
    cfg.train.steps, cfg.train.global_batch = 400_000, 256
    cfg.resources.gpus_per_node, cfg.resources.max_gpus = 4, 8  # nodes of 4 GPUs
    small = sweep.cell_resources(cfg, sweep.estimate_gpu_hours(0.36, 256, 400_000))
    big = sweep.cell_resources(cfg, sweep.estimate_gpu_hours(118.64, 256, 400_000))
    assert (small["gpus_per_node"], small["nodes"]) == (1, 1)
    assert (big["gpus_per_node"], big["nodes"], big["tasks_per_node"]) == (4, 2, 4)  # 8 GPUs on two nodes
    assert big["timeout_min"] > small["timeout_min"]
    assert 256 % (big["gpus_per_node"] * big["nodes"]) == 0  # the global batch stays divisible


@pytest.mark.process
def test_an_edited_recipe_or_another_sweep_is_refused_in_a_used_folder(failed_sweep, monkeypatch, capsys):
    """Relaunching into a sweep folder with an edited config would put two versions of the same cells side
    by side in the results; another sweep's name means another grid. Both are refused before anything."""
    out, _ = failed_sweep
    before = sorted(p.name for p in out.iterdir())
    assert sweep_in_process(monkeypatch, out, "train.lr=0.002", "patch=2,8") == 2
    err = capsys.readouterr().err
    assert "same cell with another config" in err and "train.lr: 0.001 -> 0.002" in err, err
    assert sweep_in_process(monkeypatch, out, "sweep_name=other", "train.lr=0.001", "patch=2,8") == 2
    assert "it is the folder of sweep 'default'" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.process
def test_a_cell_is_done_only_for_the_evaluation_settings_it_has(failed_sweep):
    """A relaunch with another evaluation preset is work to do (the new records), not a finished cell."""
    out, _ = failed_sweep
    good = next(p for p in out.iterdir() if p.is_dir() and read_json(p / "status.json", {}).get("state") == "finished")
    assert sweep.cell_done(load_run_config(good, []))
    assert not sweep.cell_done(load_run_config(good, ["eval.num_samples=24"]))


def test_composing_each_group_choice_once_gives_the_configs_hydra_composes(tmp_path, monkeypatch, capsys):
    """The plan composes config-group choices once and applies each cell's values after, as Hydra does: on a
    grid that varies groups, plain values, lists, group-swapping files (objective=flow sets eval.sampler) and
    new keys, every cell's config equals Hydra's own composition of that cell."""
    compared = []
    fast = sweep.GridSweep.compose_cell

    def checked(self, overrides):
        cfg = fast(self, overrides)
        hydras = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        plain = [OmegaConf.to_container(c, resolve=False) for c in (cfg, hydras)]
        for p in plain:
            p.pop("hydra")
        assert plain[0] == plain[1], overrides
        compared.append(overrides)
        return cfg

    monkeypatch.setattr(sweep.GridSweep, "compose_cell", checked)
    grid = ["model=demo-S,demo-B", "patch=2,4", "objective=ddpm,flow", "train.lr=1e-3,2e-3", "train.steps=10,20",
            "eval.at_steps=[5,10]", "eval.metrics=[fid,kid]", "plan=true"]
    assert sweep_in_process(monkeypatch, tmp_path / "sweep", *grid) == 0, capsys.readouterr().err
    assert len(compared) == 32


# ---- a plan that counts everything, and a local sweep that asks before days of work ----

def test_the_plan_counts_evaluation_and_validation_beside_training():
    """The paper's recipe: FID-50K at 250 steps every 50K steps costs about a third of training; guidance doubles
    the sampling; a training-only sweep plans no evaluation."""
    rate = throughput.gpu_image_gflops_per_s()
    paper = compose(["model=XL", "patch=2", "data=synthetic", "data.image_size=256", "train=paper"])
    row = sweep.plan_row(paper, rate)
    compute = row["compute_gflops"]
    assert compute["train"] == pytest.approx(118.64 * 256 * 400_000 * 3, rel=1e-3)
    assert 0.25 < compute["evaluation"] / compute["train"] < 0.4
    assert 0 < compute["validation"] < 0.01 * compute["train"]
    assert row["est_gpu_hours"] == pytest.approx(row["train_gpu_hours"] + row["eval_gpu_hours"])
    guided = sweep.plan_row(compose(["model=XL", "patch=2", "data=synthetic", "data.image_size=256",
                                     "train=paper", "eval=fid50k_cfg"]), rate)
    sampling = compute["evaluation"] - 8 * 50_000 * 5.71  # less the Inception features of 8 evaluations
    assert guided["compute_gflops"]["evaluation"] == pytest.approx(2 * sampling + 8 * 50_000 * 5.71, rel=1e-6)
    train_only = sweep.plan_row(compose(["model=XL", "patch=2", "data=synthetic", "data.image_size=256",
                                         "train=paper", "stage=train"]), rate)
    assert train_only["eval_gpu_hours"] == 0


def test_a_long_local_sweep_says_so_and_starts_nothing_unless_confirmed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "big"
    monkeypatch.setattr(sweep, "LOCAL_HOURS_ASKED", 1e-9)  # the tiny grid stands for one of days
    assert sweep_in_process(monkeypatch, out, "patch=2,4") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "on this machine's CPU" in err and "sweeps=demo" in err
    assert "hydra/launcher=slurm" in err and "confirm_local=true" in err and not out.exists()
    assert sweep_in_process(monkeypatch, out, "patch=2,4", "plan=true") == 0  # the plan says it, starts nothing
    assert "on this machine's CPU: about" in capsys.readouterr().out and not out.exists()
    assert sweep_in_process(monkeypatch, out, "patch=4", "confirm_local=true") == 0
    assert len([p for p in out.iterdir() if (p / "cell.json").exists()]) == 1
