"""Helpers shared by test modules (pytest puts tests/ on sys.path: `from helpers import ...`)."""

import os


def one_thread_env() -> dict:
    """The environment of a subprocess under test: one CPU thread (kernels then reduce in a fixed order,
    so separate processes compute bitwise alike), no progress bar, no wandb; the session's HARNESS_CACHE
    (tests/conftest.py) is inherited, so the digits extractor trains once."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HARNESS_NO_BAR="1", WANDB_MODE="disabled")
    return env
