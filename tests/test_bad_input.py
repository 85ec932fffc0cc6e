"""Bad input to every command, run as a user runs it (`python -m harness.<command> ...` from the repository root).

Each case must exit 2 (1 for a run that failed, harness.core.cli), print no traceback, print exactly one line on
stderr, `error: ...`, naming the bad key, value or file (and nothing on stdout), and leave the disk as it was:
no output folder, no Hydra folder, no file written, touched or removed, no lease taken and given back. With
HARNESS_DEBUG=1 (or HYDRA_FULL_ERROR=1) the traceback is back. No stderr line is excused as a harmless library
warning: one printed before the error is what the user reads first, and it is never about their input.

Where a command reports every problem at once (a cell's checks, a grid, evaluation settings) one case holds
several bad values and the line must name each. One tiny trained cell (module fixture) gives the run folder;
each case that reads one gets its own copy, so a case that writes into it cannot hide behind another.
Each case is its own process that spends most of its time importing torch; they run two at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import TINY_CELL, one_thread_env, run_module

from harness.core import checkpoint
from harness.core.runfolder import read_json

# Every case runs a command as a user does, in a process of its own: not in make test-fast.
pytestmark = pytest.mark.process

STEPS = 4  # the trained cell has checkpoints at steps 2 and 4
CKPT_FILE = checkpoint.ckpt_path(Path("checkpoints"), STEPS)  # relative to a run folder
CASE_TIMEOUT_S = 120  # a case that hangs fails instead of stalling the suite
PARALLEL = 2  # cases running at once
TRAIN = (*TINY_CELL, "patch=4", f"train.steps={STEPS}", "train.ckpt_every=2")


@pytest.fixture(scope="module")
def trained(trained_cell) -> Path:
    """The run folder of the session's tiny cell trained to step 4 (checkpoints at 2 and 4, label dropout 0.1;
    tests/conftest.py); a case that changes it works on a copy."""
    return trained_cell


def _edit_config(old: str, new: str) -> Callable[[Path], None]:
    def edit(tmp: Path) -> None:
        path = tmp / "run" / "config.yaml"
        text = path.read_text()
        assert old in text, f"the trained config has no {old!r}"
        path.write_text(text.replace(old, new, 1))
    return edit


def _corrupt_config(tmp: Path) -> None:
    (tmp / "run" / "config.yaml").write_text("model: [demo-S\npatch: 4\n")  # an unclosed flow sequence


def _unknown_key(tmp: Path) -> None:
    with open(tmp / "run" / "config.yaml", "a") as f:
        f.write("bogus_key: 1\n")


def _torn_checkpoint(tmp: Path) -> None:
    path = tmp / "run" / CKPT_FILE
    path.write_bytes(path.read_bytes()[:1000])  # a write cut short


def _folder(name: str, *files: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).mkdir(parents=True)
        for f in files:
            (tmp / name / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name / f).write_bytes(b"")
    return make


def _file(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).write_text("not what the command wants\n")
    return make


def _image_folder(tmp: Path) -> None:
    from PIL import Image

    (tmp / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp / "images" / "cat" / "0.png")


@dataclass(frozen=True)
class Case:
    """One bad command line. `args`, `names` and `env` may hold {run} (the case's copy of the trained run
    folder), {tmp} (the case's folder) and {out} (an output folder that must not come to exist)."""

    id: str
    module: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # fragments the error line must hold: the bad keys, values or files
    code: int = 2
    prepare: Callable[[Path], None] | None = None
    env: dict = field(default_factory=dict)
    copy_run: bool = False  # the case reads the run folder without naming it (a sweep folder holding it)


def _train(id: str, *args: str, names: tuple[str, ...], **kw) -> Case:
    return Case(f"train-{id}", "harness.train", (*TRAIN, *args, "out_dir={out}"), names, **kw)


def _sweep(id: str, *args: str, names: tuple[str, ...]) -> Case:
    return Case(f"sweep-{id}", "harness.sweep", ("-m", *TRAIN, *args, "out_dir={out}"), names)


def _evaluate(id: str, *args: str, names: tuple[str, ...], step: str = str(STEPS), **kw) -> Case:
    return Case(f"evaluate-{id}", "harness.evaluate", ("run_dir={run}", f"step={step}", *args), names, **kw)


def _sample(id: str, *args: str, names: tuple[str, ...]) -> Case:
    quick = ("--num-samples", "4", "--batch-size", "4", "--shard-size", "4", "--device", "cpu", "--out", "{out}")
    return Case(f"sample-{id}", "harness.sample", (*quick, *args), names)  # the case's own values come last


def _cmd(module: str, id: str, *args: str, names: tuple[str, ...], **kw) -> Case:
    return Case(f"{module}-{id}", f"harness.{module}", args, names, **kw)


RUN_FORM = ("--run-dir", "{run}", "--sampling-steps", "5")
CKPT_FORM = ("--ckpt", f"{{run}}/{CKPT_FILE}", "--vae", "tiny", "--num-classes", "10",
             "--sampling-steps", "5")  # the released-checkpoint form, pointed at the trained cell's file

CASES = [
    # train: composition (an unknown option) and the cell's own checks, before any folder exists
    _train("unknown-model", "model=Q", names=("model/Q", "allowed")),
    _train("cell-checks", "patch=3", "train.lr=-1", "model.parametrization=mup", "model.mup_base_width=64",
           "objective=flow", "eval.sampler=ddim", "train.class_dropout_prob=0", "eval.cfg_scale=1.5",
           "eval.extractor=clip-vit-b-32", "eval.metrics=[sfid,bogus_metric]", "lock_wait_s=-5",
           names=("patch 3", "train.lr=-1", "mup_base_width=64", "eval.sampler='ddim'", "flow", "eval.cfg_scale=1.5",
                  "bogus_metric", "sfid", "clip-vit-b-32", "lock_wait_s=-5")),
    _train("more-cell-checks", "model.parametrization=mup", "eval.sampling_steps=abc", "data=latents256",
           "data.image_size=256", "data.path=/nonexistent/latents",
           names=("mup_base_width=None", "eval.sampling_steps", "abc", "/nonexistent/latents")),
    _train("non-finite-loss", "train.lr=1e30", names=("non-finite loss",), code=1),
    _train("validation-settings", "train.val_images=1", "train.val_at_steps=[0]", "data.val_path=/no/held-out",
           names=("train.val_images=1", "train.val_at_steps contains [0]", "data.val_path='/no/held-out'")),
    _train("shapes-settings", "data=shapes", "data.channels=1", "data.image_size=24",
           names=("channels", "image_size 24")),
    # sweep: un-swept values (composed before Hydra starts) and swept ones (every cell checked, one line)
    _sweep("unknown-model", "model=Q", names=("model/Q", "allowed")),
    _sweep("unknown-key", "+foo=1", names=("foo",)),
    _sweep("steps-not-int", "train.steps=abc", names=("train.steps", "abc")),
    _sweep("patch-3", "patch=3", names=("patch 3",)),
    _sweep("swept-patch-and-model", "patch=4,3", "model=demo-S,Q", names=("patch=3", "unknown patch 3", "model/Q")),
    _sweep("swept-steps-and-sampler", "train.steps=4,abc", "eval.sampler=ddpm,euler",
           names=("train.steps=abc", "eval.sampler='euler'")),
    # evaluate: the run folder, its config and checkpoints, the step, the settings, the weights
    Case("evaluate-empty-folder", "harness.evaluate", ("run_dir={tmp}/empty", f"step={STEPS}"),
         ("{tmp}/empty", "config.yaml"), prepare=_folder("empty")),
    _evaluate("step-abc", names=("step='abc'",), step="abc"),
    _evaluate("validation-mode", "validation=all", names=("validation='all'", "only")),
    _evaluate("corrupt-config", names=("{run}/config.yaml",), prepare=_corrupt_config),
    _evaluate("config-unknown-key", names=("{run}/config.yaml", "bogus_key"), prepare=_unknown_key),
    _evaluate("torn-checkpoint", names=(f"{{run}}/{CKPT_FILE}", "checksum"), prepare=_torn_checkpoint),
    _evaluate("step-without-checkpoint", names=("step 3", "[2, 4]"), step="3"),
    _evaluate("unknown-preset", "eval=fid1k", names=("fid1k", "fid50k")),
    _evaluate("settings", "eval=digits", "eval.sampler=euler", "eval.cfg_scale=1.5", "eval.extractor=clip-vit-b-32",
              "eval.metrics=[sfid,bogus_metric]", "eval.num_samples=0",
              names=("eval.sampler='euler'", "eval.cfg_scale=1.5", "class_dropout_prob=0.0", "sfid", "bogus_metric",
                     "eval.num_samples=0"),
              prepare=_edit_config("class_dropout_prob: 0.1", "class_dropout_prob: 0.0")),
    # FD-DINOv2 with an empty torch hub folder and no network: what to fetch and where to put it
    _evaluate("dinov2-weights-missing", "eval=digits", "eval.metrics=[fd_dinov2]",
              names=("dinov2_vitl14_pretrain.pth", "{tmp}/torch/hub"), env={"TORCH_HOME": "{tmp}/torch"},
              prepare=_folder("torch/hub")),
    # sample: a run folder's checkpoint, or a released-style checkpoint file
    _sample("zero-samples", *RUN_FORM, "--step", str(STEPS), "--num-samples", "0", names=("--num-samples", "0")),
    _sample("bad-respacing", *RUN_FORM, "--step", str(STEPS), "--sampling-steps", "abc", names=("'abc'",)),
    _sample("ckpt-missing", "--ckpt", "{tmp}/DiT-XL-2-256x256.pt", names=("{tmp}/DiT-XL-2-256x256.pt",
                                                                          "dl.fbaipublicfiles.com")),
    _sample("ckpt-image-size", *CKPT_FORM, "--image-size", "15", names=("--image-size 15",)),
    # precompute
    _cmd("data.precompute", "missing-src", "--src", "{tmp}/nowhere", "--out", "{out}", names=("{tmp}/nowhere",)),
    _cmd("data.precompute", "empty-src", "--src", "{tmp}/empty", "--out", "{out}", names=("{tmp}/empty",),
         prepare=_folder("empty")),
    _cmd("data.precompute", "batch-0", "--src", "{tmp}", "--out", "{out}", "--batch-size", "0",
         names=("--batch-size", "0")),
    _cmd("data.precompute", "resolution-abc", "--src", "{tmp}", "--out", "{out}", "--resolution", "abc",
         names=("--resolution", "abc")),
    # the SD VAE neither in an (empty) Hugging Face cache nor downloadable: what to fetch
    _cmd("data.precompute", "vae-missing", "--src", "{tmp}/images", "--out", "{out}", "--resolution", "32",
         "--device", "cpu", names=("stabilityai/sd-vae-ft-ema", "huggingface-cli download"),
         env={"HF_HOME": "{tmp}/hf", "HF_HUB_OFFLINE": "1"}, prepare=_image_folder),
    # status, report, results: read run folders
    _cmd("status", "missing-folder", "{tmp}/nowhere", names=("{tmp}/nowhere",)),
    _cmd("status", "not-a-sweep", "{tmp}/empty", names=("{tmp}/empty", "sweep.json"),
         prepare=_folder("empty", "notes.txt")),
    _cmd("status", "unknown-option", "{tmp}", "--bogus", names=("--bogus",)),
    _cmd("report", "missing-folder", "{tmp}/nowhere", "--out", "{out}", names=("{tmp}/nowhere",)),
    _cmd("report", "negative-resamples", "{tmp}", "--resamples", "-1", names=("--resamples", "-1"), copy_run=True),
    _cmd("report", "out-is-a-file", "{tmp}", "--out", "{tmp}/notes.txt", names=("--out", "{tmp}/notes.txt"),
         prepare=_file("notes.txt"), copy_run=True),
    _cmd("results", "missing-folder", "{tmp}/nowhere", names=("{tmp}/nowhere",)),
    _cmd("results", "table-format", "{tmp}", "--csv", "{tmp}/table.txt", names=("--csv", "{tmp}/table.txt", ".csv"),
         copy_run=True),
    _cmd("results", "unknown-option", "{tmp}", "--bogus", names=("--bogus",), copy_run=True),
    # flops, mup coord-check, bench: arguments only
    _cmd("model.flops", "input-size-0", "--input-size", "0", names=("--input-size", "0")),
    _cmd("model.flops", "input-size-indivisible", "--input-size", "30", "--patch", "4", names=("--input-size", "30")),
    _cmd("model.flops", "patch-3", "--patch", "3", names=("--patch", "3")),
    _cmd("model.mup", "no-command", names=("coord-check",)),
    _cmd("model.mup", "widths-0", "coord-check", "--out", "{out}", "--widths", "0", "64", names=("--widths", "0")),
    _cmd("model.mup", "base-width", "coord-check", "--out", "{out}", "--widths", "64", "128", "--base-width", "30",
         names=("--base-width", "30")),
    _cmd("bench", "batch-0", "train", "--batch", "0", "--device", "cpu", "--json-out", "{out}/bench.json",
         names=("batch=0",)),
]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root (root included): (is a folder, size, modification time). A file written, touched,
    created or removed, or one created and removed again inside a folder, changes it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (path.is_dir(), 0 if path.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def _diff(before: dict, after: dict) -> str:
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return f"added {added}, removed {removed}, changed {changed}"


def _fill(text: str, tmp: Path) -> str:
    return text.format(run=tmp / "run", tmp=tmp, out=tmp / "out")


@dataclass
class Outcome:
    """What a case did: its folder, the finished process, the folder's snapshot before and after."""

    folder: Path
    process: subprocess.CompletedProcess
    before: dict
    after: dict

    def said(self) -> str:
        r = self.process
        return f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


def _needs_run(case: Case) -> bool:
    return case.copy_run or case.prepare is not None or any("{run}" in a for a in case.args)


def _run_case(case: Case, trained: Path | None, tmp: Path, debug_variable: str | None = None) -> Outcome:
    """Prepares the case's folder (a copy of the `trained` run folder when it needs one) and runs the command
    (with `debug_variable`=1: tracebacks asked for); returns what it did."""
    if _needs_run(case):
        shutil.copytree(trained, tmp / "run")
    if case.prepare is not None:
        case.prepare(tmp)
    env = {k: v for k, v in one_thread_env().items() if k not in ("HARNESS_DEBUG", "HYDRA_FULL_ERROR")}
    env.update({k: _fill(v, tmp) for k, v in case.env.items()})
    if debug_variable is not None:
        env[debug_variable] = "1"
    before = snapshot(tmp)
    r = run_module(case.module, *(_fill(a, tmp) for a in case.args), env=env, timeout=CASE_TIMEOUT_S)
    return Outcome(tmp, r, before, snapshot(tmp))


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Runs every selected case, PARALLEL at a time; returns {case id: Outcome}. The cell is trained only
    when a selected case needs its run folder."""
    selected = [c for c in CASES if any(f"[{c.id}]" in item.nodeid for item in request.session.items)]
    trained = request.getfixturevalue("trained") if any(_needs_run(c) for c in selected) else None
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = {c.id: pool.submit(_run_case, c, trained, tmp_path_factory.mktemp(c.id)) for c in selected}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, outcomes):
    o = outcomes[case.id]
    r, said = o.process, o.said()
    assert "Traceback" not in r.stderr + r.stdout, said
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one `error: ` line on stderr; {said}"
    missing = [n for n in (_fill(n, o.folder) for n in case.names) if n not in lines[0]]
    assert not missing, f"the error does not name {missing}; {said}"
    assert r.returncode == case.code, said
    if case.code == 2:  # bad input: nothing done, nothing printed but the error
        assert r.stdout == "", said
        assert o.after == o.before, f"the disk changed: {_diff(o.before, o.after)}; {said}"
    else:  # a failed run: its run folder says why, and nothing non-finite was saved
        (run_dir,) = [p for p in (o.folder / "out").iterdir() if (p / "cell.json").exists()]
        status = read_json(run_dir / "status.json")
        assert status["state"] == "failed" and "non-finite" in status["reason"], status
        assert checkpoint.list_steps(run_dir / "checkpoints") == []


@pytest.mark.parametrize("variable", ["HARNESS_DEBUG", "HYDRA_FULL_ERROR"])
def test_debug_shows_the_traceback(variable, tmp_path):
    case = next(c for c in CASES if c.id == "status-missing-folder")
    o = _run_case(case, None, tmp_path, debug_variable=variable)
    assert o.process.returncode != 0 and "Traceback" in o.process.stderr, o.said()
    assert str(tmp_path / "nowhere") in o.process.stderr
    assert o.after == o.before, _diff(o.before, o.after)


def test_the_table_covers_every_command():
    assert {c.module for c in CASES} >= {"harness.train", "harness.sweep", "harness.evaluate", "harness.sample",
                                         "harness.data.precompute", "harness.status", "harness.report",
                                         "harness.results", "harness.model.flops", "harness.model.mup", "harness.bench"}
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
