"""Session-wide test environment: no network services, no progress bars, one shared tmp cache; the test tiers.

Tiers (pyproject.toml's markers): `make test` runs every test; `make test-fast` (the inner loop) leaves out the
`slow`, `process`, `notebook`, `slurm` and `gpu` ones. In the fast tier a test that starts a process without the
`process` mark fails, naming the mark, so the tier stays what it says.
"""

import os
import subprocess

import pytest

FAST_TIER_ENV = "HARNESS_TEST_TIER"  # "fast": make test-fast

# Under pytest-xdist (make test runs a worker per core) each worker computes on one thread: two workers of two
# threads each on two cores only take turns. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


@pytest.fixture(scope="session", autouse=True)
def _harness_test_env(tmp_path_factory):
    """Every test (and every subprocess it starts) uses one fresh cache, so the digits feature extractor
    is trained once per session and never read from or written to the user's ~/.cache/harness."""
    saved = {k: os.environ.get(k) for k in ("HARNESS_CACHE", "WANDB_MODE", "HARNESS_NO_BAR", "HF_HUB_OFFLINE")}
    os.environ["HARNESS_CACHE"] = str(tmp_path_factory.mktemp("harness_cache"))
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["HARNESS_NO_BAR"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def one_thread():
    """In-process torch on one thread, as the subprocesses of helpers.one_thread_env compute; also much
    faster for tiny tensors on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
    """In the fast tier, starting a process fails the test: it should carry the `process` mark."""
    if os.environ.get(FAST_TIER_ENV) != "fast" or request.node.get_closest_marker("process"):
        return
    real = subprocess.Popen.__init__
    def refuse(self, args, *a, **kw):
        if (args if isinstance(args, str) else args[0]) == "git":  # the commit a checkpoint records: milliseconds
            return real(self, args, *a, **kw)
        raise AssertionError(f"{request.node.nodeid} starts a process ({args!r:.120}): mark it "
                             "@pytest.mark.process (make test-fast leaves those out)")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


# The one tiny trained cell the command tests share (trained once per session, by the train command as a user runs
# it): the tiny digits cell at patch 4, 4 steps, checkpoints at 2 and 4, every checkpoint kept.
TRAINED_STEPS = 4


@pytest.fixture(scope="session")
def trained_cell(tmp_path_factory):
    """The run folder of the session's tiny trained cell. Read it; copy it (shutil.copytree) to change it."""
    from helpers import TINY_CELL, run_module

    out = tmp_path_factory.mktemp("trained_cell")
    r = run_module("harness.train", *TINY_CELL, "patch=4", f"train.steps={TRAINED_STEPS}", "train.ckpt_every=2",
                   "train.log_every=2", "train.val_every=10", "train.keep_last=100", "eval=digits", f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    (run_dir,) = [p for p in out.iterdir() if (p / "cell.json").exists()]
    return run_dir
