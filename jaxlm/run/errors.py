"""The one error type for failures a user can fix, and how entry points print it.

A `UserError` (bad config key, unreadable data file, checkpoint that cannot be restored, a
broken Hugging Face file, a bad CLI flag) carries a message naming the key or file and what to
do. Every entry point runs its main function through `run_main`, which prints such an error as
one line `error: ...` and exits with status 1; the traceback is shown only with
`--verbosity=1` or higher. Subclasses also derive from the builtin type that callers and tests
already catch (ValueError, FileNotFoundError).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging


class UserError(Exception):
    """A failure the user can fix; the message names the key or file and what to do."""

    def __init__(self, message: str, *, key: str | None = None, path: str | None = None):
        super().__init__(message)
        self.key = key
        self.path = path


class ConfigError(UserError, ValueError):
    """A config key or CLI flag with a bad value (message starts with `config key <key>:`)."""


class DataError(UserError, ValueError):
    """Training data that cannot be read or decoded (names the file and record)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be restored (names the step directory)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the run needs does not exist (names it)."""


class NonFiniteError(UserError, FloatingPointError):
    """Too many NaN/Inf steps in a row (train.max_nonfinite)."""


class WorkdirLockedError(UserError, RuntimeError):
    """Another run owns the workdir."""


def config_error(key: str, msg: str) -> ConfigError:
    """`config key <key>: <msg>` as a ConfigError carrying the key."""
    return ConfigError(f"config key {key}: {msg}", key=key)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises `config key <key>: 'value' is not one of (...)` unless `value` is in `choices`."""
    if value not in choices:
        raise config_error(key, f"{value!r} is not one of {choices}")


def check_at_least(key: str, value: float, minimum: float) -> None:
    """Raises `config key <key>: must be >= minimum, got value` when `value` is smaller."""
    if value < minimum:
        raise config_error(key, f"must be >= {minimum}, got {value}")


def check_interval(key: str, value: float, low: float, high: float, bounds: str = "[]") -> None:
    """Raises `config key <key>: must lie in [low, high], got value` unless `value` lies in the
    interval; `bounds` ("[]", "[)", "(]" or "()") says which ends are included."""
    above = value >= low if bounds[0] == "[" else value > low
    below = value <= high if bounds[1] == "]" else value < high
    if not (above and below):
        raise config_error(key, f"must lie in {bounds[0]}{low}, {high}{bounds[1]}, got {value}")


def is_user_error(e: BaseException) -> bool:
    """UserErrors, plus the plain errors that already name a config key or a missing file."""
    if isinstance(e, UserError):
        return True
    if isinstance(e, ValueError) and str(e).startswith("config key"):
        return True
    return isinstance(e, FileNotFoundError)


def one_line(e: BaseException) -> str:
    """The error as one line (embedded newlines folded)."""
    text = " ".join(str(e).split()) if str(e) else type(e).__name__
    if isinstance(e, (UserError, ValueError)):
        return f"error: {text}"
    return f"error: {type(e).__name__}: {text}"


def verbosity_requested(argv: list[str]) -> int:
    """The --verbosity / -v value given in `argv` (0 when absent), read before absl parses
    flags, so a flag error itself can be shown with its traceback on request."""
    level = 0
    for i, arg in enumerate(argv):
        for name in ("--verbosity", "-verbosity", "--v", "-v"):
            value = None
            if arg.startswith(name + "="):
                value = arg.split("=", 1)[1]
            elif arg == name and i + 1 < len(argv):
                value = argv[i + 1]
            if value is not None:
                try:
                    level = int(value)
                except ValueError:
                    pass
    return level


def run_main(main: Callable[..., Any], *args: Any) -> Any:
    """Calls `main(*args)`; a user-fixable failure becomes one line on stderr and exit 2 (the
    traceback instead with --verbosity >= 1)."""
    try:
        return main(*args)
    except Exception as e:  # noqa: BLE001  (only user errors are caught; others re-raise)
        if not is_user_error(e) or logging.get_verbosity() >= 1 \
                or verbosity_requested(sys.argv) >= 1:
            raise
        sys.exit(one_line(e))
