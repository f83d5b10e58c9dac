"""The console a person reads: progress bars with ETA, one line per event, quiet libraries.

Third-party INFO logging (orbax, absl, jax's backend probing) is hidden unless `verbose`.
Progress bars are tqdm's: on a terminal they redraw in place; when stderr is not a terminal
(CI, SLURM logs) the same bar is written as one line every `_PIPE_INTERVAL_S` seconds instead.
Only process 0 prints.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_PIPE_INTERVAL_S = 10.0
_QUIET_LOGGERS = ("absl", "orbax", "jax", "jax._src.xla_bridge", "etils", "grain", "tensorflow")


def _primary() -> bool:
    """Process 0 of a multi-host run; True before jax has started a backend.

    Asking jax for the process index would start its backend (and claim GPU memory), which a
    data-preparation tool must not do just to print a progress bar.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return True
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        return True
    return jax.process_index() == 0


def configure(verbose: bool = False) -> None:
    """Hides library INFO logging (and jax's "Unable to initialize backend" probes)."""
    level = logging.INFO if verbose else logging.WARNING
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    absl_logging.set_stderrthreshold("info" if verbose else "warning")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        # Backend probing on a machine without a TPU/GPU is expected, not a warning.
        logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        warnings.filterwarnings("ignore", category=FutureWarning, module="orbax")


def say(message: str) -> None:
    """One line for the person watching (process 0 only), without breaking a progress bar."""
    if _primary():
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    **kwargs: Any,
) -> Iterator[T] | tqdm:
    """A tqdm bar (rate and ETA) on process 0; on other processes a silent one."""
    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        disable=not _primary(),
        mininterval=0.5 if tty else _PIPE_INTERVAL_S,
        dynamic_ncols=tty,
        ncols=None if tty else 100,
        file=sys.stderr if tty else _Lines(sys.stderr),
        **kwargs,
    )


# Cursor moves and erases (ESC[A, ESC[K ...) that tqdm writes to place nested bars.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Lines:
    """A file for tqdm that turns each redraw into one whole line, without escape codes (logs).

    On a terminal a nested bar (validation inside training) is drawn one row below with cursor
    moves; in a log those codes are noise, so they are dropped and every redraw is a line.
    """

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> None:
        for line in _ESCAPES.sub("", text).replace("\r", "\n").split("\n"):
            if line.strip():
                self._stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self._stream.flush()


def run_cli(
    doc: str,
    fv: Any,
    argv: list[str] | None,
    body: Any,
    *,
    rewrite: Any = None,
) -> int:
    """The entry of the flag-based command-line tools (`predict`, `evaluate`, `embed`).

    `--help` prints `doc` and the flags; otherwise library logging is quieted, the flags in
    `fv` (an `absl.flags.FlagValues`) are parsed, each argument first passed through `rewrite`
    when given, and `body(fv, positional_args)` returns the exit status. A bad flag or a
    `CxrjaxError` prints `error: ...` with its fix and returns 2, never a traceback.
    """
    from absl import flags

    from cxrjax.errors import ConfigError, CxrjaxError, report_and_exit

    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(doc)
        print(fv.get_help())
        return 0
    configure(verbose=False)
    try:
        positional = fv([argv[0], *(map(rewrite, argv[1:]) if rewrite else argv[1:])])[1:]
        return body(fv, positional)
    except flags.Error as e:
        return report_and_exit(ConfigError(str(e), "See --help."))
    except CxrjaxError as e:
        return report_and_exit(e)
