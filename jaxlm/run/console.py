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


class OwnInfoOnly(logging.Filter):
    """Passes warnings and errors from anywhere (but _NOISE), lower levels only from jaxlm."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_own(record):
            return True
        return record.levelno >= logging.WARNING and not any(
            n in record.getMessage() for n in _NOISE)


@contextlib.contextmanager
def quiet(workdir: str | None) -> Iterator[None]:
    """Filters the console (absl's handler and the root logger's stream handlers) to
    OwnInfoOnly, and copies every INFO line to <workdir>/log.txt (local workdirs), for the
    duration of the block. A no-op filter-wise with --verbosity >= 1."""
    verbose = absl_logging.get_verbosity() >= 1
    console = [absl_logging.get_absl_handler()] + [
        h for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    console = list(dict.fromkeys(console))
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
