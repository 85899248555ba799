"""Quiet by default: the console shows jaxlm's own lines and every warning; the INFO lines of
libraries (orbax logs ~45 per checkpoint save, jax its backend probing) go to `<workdir>/log.txt`
with everything else, so nothing is lost. `--verbosity=1` (absl DEBUG) shows all of it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from absl import logging as absl_logging

LOG_FILE = "log.txt"
# The jaxlm package (this file is jaxlm/run/console.py): every subpackage's lines are its own.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def is_own(record: logging.LogRecord) -> bool:
    """True for records logged from jaxlm's own modules."""
    return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


# Library warnings that describe intended use, not a problem (orbax, on jaxlm's read-only
# checkpoint readers).
_NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")
# Libraries whose failures reach jaxlm as exceptions that it prints in one line (orbax's failed
# saves and reads: jaxlm.run.checkpoint re-raises them naming the checkpoint): the tracebacks
# they log on the way (one per background thread of a failed save) go to log.txt only.
_RERAISED = (f"{os.sep}orbax{os.sep}",)


def is_reraised(record: logging.LogRecord) -> bool:
    """True for a traceback logged by a library whose failures jaxlm re-raises."""
    return record.exc_info is not None and any(p in record.pathname for p in _RERAISED)


class NoReraisedTracebacks(logging.Filter):
    """Drops the tracebacks of `is_reraised` records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_reraised(record)


class OwnInfoOnly(logging.Filter):
    """Passes warnings and errors from anywhere (but _NOISE), lower levels only from jaxlm."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_own(record):
            return True
        if is_reraised(record):
            return False
        return record.levelno >= logging.WARNING and not any(
            n in record.getMessage() for n in _NOISE)


def _console_handlers() -> list[logging.Handler]:
    """absl's handler and the root logger's stream handlers (not its files)."""
    handlers = [absl_logging.get_absl_handler()] + [
        h for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    return list(dict.fromkeys(handlers))


def drop_reraised_tracebacks() -> None:
    """From now until the process ends, keeps `is_reraised` tracebacks off the console, even
    after `quiet` ends: a failed save's background threads log theirs after jaxlm has already
    reported the failure in one line. A no-op with --verbosity >= 1."""
    if absl_logging.get_verbosity() >= 1:
        return
    for h in _console_handlers():
        if not any(isinstance(f, NoReraisedTracebacks) for f in h.filters):
            h.addFilter(NoReraisedTracebacks())


@contextlib.contextmanager
def quiet(workdir: str | None) -> Iterator[None]:
    """Filters the console (absl's handler and the root logger's stream handlers) to
    OwnInfoOnly, and copies every INFO line to <workdir>/log.txt (local workdirs), for the
    duration of the block. A no-op filter-wise with --verbosity >= 1."""
    verbose = absl_logging.get_verbosity() >= 1
    console = _console_handlers()
    flt = OwnInfoOnly()
    if not verbose:
        for h in console:
            h.addFilter(flt)
    file_handler = None
    if workdir and "://" not in workdir:
        os.makedirs(workdir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(workdir, LOG_FILE))
        file_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s"))
        file_handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(file_handler)
    try:
        yield
    finally:
        for h in console:
            h.removeFilter(flt)
        if file_handler is not None:
            logging.getLogger().removeHandler(file_handler)
            file_handler.close()
