"""How every command reports a problem a user can fix: one line on stderr, exit code 2, no traceback.

A traceback is for bugs. Bad input (a value, a key, a missing file, weights that must be fetched) is said
in one line that names the file, key or value and what is allowed, before any work starts. Set
`HARNESS_DEBUG=1` (or Hydra's `HYDRA_FULL_ERROR=1`) to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

BAD_INPUT_EXIT = 2
FAILED_EXIT = 1
DEBUG_ENV = ("HARNESS_DEBUG", "HYDRA_FULL_ERROR")


class BadInput(ValueError):
    """Input a user can fix (a value, a key, a file), found before any work."""


class MissingWeights(OSError):
    """Weights that cannot be downloaded here: the message says what to fetch and where to put it. (An
    OSError, as the failed download or the missing file behind it.)"""


class Refused(RuntimeError):
    """The command cannot go on now: another process holds what it needs (said in one line, exit 1)."""


# What a command reports as bad input: our own checks raise ValueError (or BadInput), missing paths
# FileNotFoundError, offline weights MissingWeights.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, MissingWeights)


def debug() -> bool:
    """Returns whether tracebacks were asked for (HARNESS_DEBUG=1 or HYDRA_FULL_ERROR=1)."""
    return any(os.environ.get(k, "") not in ("", "0") for k in DEBUG_ENV)


def one_line(message: Any, limit: int | None = None) -> str:
    """Returns a message (or an exception) as one line: its lines joined with '; ', bullets and blank lines dropped,
    cut to `limit` characters with '...' when given (a figure panel, a status.json reason)."""
    parts = [" ".join(ln.split()).removeprefix("- ") for ln in str(message).splitlines()]
    text = "; ".join(p for p in parts if p) or type(message).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def fail(message: Any, code: int = BAD_INPUT_EXIT) -> NoReturn:
    """Prints `error: <message>` as one line on stderr and exits with `code`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a command's main: input errors become one line and exit 2 (tracebacks when debugging)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except INPUT_ERRORS as e:
            if debug():
                raise
            fail(e)
        except Refused as e:
            if debug():
                raise
            fail(e, code=FAILED_EXIT)

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the harness's error form: one line naming the problem, exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see {self.prog} --help)")
