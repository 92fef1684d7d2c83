"""The errors phimoe explains in one line, each with its exit code: 2 for bad input from the user
(an unknown option value, a missing file, an empty prompt), 1 for a failure at run time (a corrupt
checkpoint, no network). Every command reports them the same way (``report``); anything else is a
bug and keeps its traceback behind PHIMOE_DEBUG=1. A leaf: it imports nothing of the package."""

from __future__ import annotations

import sys


class PhimoeError(Exception):
    """A failure explained in one line. ``exit_code`` 1 unless the class or the raiser says
    otherwise."""

    exit_code = 1

    def __init__(self, message: str = "", *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PhimoeError, ValueError):
    """Bad input from the user: exit code 2."""

    exit_code = 2


class HubError(PhimoeError):
    """A model could not be resolved. ``str(err)`` is one clear line for the user.

    ``exit_code`` is 2 for bad user input (a local path that does not exist, an invalid repo id),
    1 for runtime failures (network, missing repo, gated repo, full disk, ...).
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(" ".join(str(message).split()), exit_code=exit_code)  # always exactly one line


def report(exc: PhimoeError, stream=None) -> int:
    """Write ``exc`` as one ``error:`` line; return its exit code."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    (stream or sys.stderr).write(f"error: {text}\n")
    return exc.exit_code
