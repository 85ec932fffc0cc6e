"""Session-wide test environment: no network services, no progress bars, one shared tmp cache."""

import os

import pytest


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
