"""The one error base class: a user-facing problem with the fix in its message.

Library code raises a `CxrjaxError` subclass (never `SystemExit`); every command-line entry point
turns it into `error: <message>` on stderr and exit status 2, never a traceback. Anything that is
not a `CxrjaxError` is a bug in cxrjax and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2


class CxrjaxError(Exception):
    """A problem the user can fix; `str(e)` says what is wrong, where, and what to do."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        super().__init__(f"{problem}\n{fix}" if fix else problem)
        self.problem = problem
        self.fix = fix


class ConfigError(CxrjaxError, ValueError):
    """A config field or command-line option that cannot work (misspelt label, bad choice)."""


class MissingInputError(CxrjaxError, FileNotFoundError):
    """A dataset, run directory or weights the command names does not exist."""


class RunDirError(CxrjaxError):
    """A run directory that is not one, belongs to another config, or is in use."""


class Preempted(Exception):
    """A signal stopped training after a checkpoint was committed; rerunning resumes.

    Not a user error: the entry point prints where it stopped and exits 0 (maxtext's
    `StopTraining`), so a scheduler's requeue reruns the same command.
    """

    def __init__(self, step: int, workdir: str) -> None:
        super().__init__(f"stopped at step {step}; rerun the same command to resume from {workdir}")
        self.step = step


T = TypeVar("T")


def report_and_exit(error: CxrjaxError) -> int:
    """Prints the message for a person and returns the exit status an entry point should use."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def cli(main: Callable[..., T]) -> Callable[..., T | int]:
    """Wraps an entry point: a `CxrjaxError` becomes its message and exit status 2."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except CxrjaxError as e:
            return report_and_exit(e)

    wrapped.__name__ = main.__name__
    wrapped.__doc__ = main.__doc__
    return wrapped


def run_main(main: Callable[..., object], *args: object) -> None:
    """The end of a tool: `if __name__ == "__main__": run_main(main)`.

    Exits with `main`'s status when it returns an int (0 otherwise), and with status 2 and the
    message, never a traceback, when it raises a `CxrjaxError`.
    """
    try:
        status = main(*args)
    except CxrjaxError as e:
        sys.exit(report_and_exit(e))
    sys.exit(status if isinstance(status, int) else 0)


class NonFiniteError(CxrjaxError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""
