"""Entry point: `python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/jaxlm_tiny`.

Flags only; everything else lives in importable library code (jaxlm.run.trainer.run).
Override any config key on the command line: `--config.train.steps=100`, or pass the config
file an argument: `--config=configs/chinchilla.py:size=1018`.

A mistake the user can fix (a config key, a data file, a checkpoint, a flag) is printed as one
line `error: ...` naming the key or file, exit status 1; `--verbosity=1` adds the traceback.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.parallel import distributed
from jaxlm.run import config as config_lib
from jaxlm.run import console, errors, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and caches.")
flags.mark_flags_as_required(["config", "workdir"])


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_flags(argv: list[str]) -> None:
    """The config file exists and every `--config.*` override names a known, current key."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        raise errors.MissingFileError(f"config file {path.split(':', 1)[0]!r} does not exist "
                                      "(--config)", path=path)
    for arg in argv[1:]:
        if arg.startswith("--config."):
            config_lib.check_override_key(arg.removeprefix("--config.").split("=", 1)[0])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after failing in one line on a missing config file or a
    `--config.*` override of an unknown or renamed key (ml_collections alone would raise a
    bare AttributeError with a long traceback)."""
    if errors.verbosity_requested(argv) >= 1:
        _check_flags(argv)
        return app.parse_flags_with_usage(argv)
    try:
        _check_flags(argv)
        return flags.FLAGS(argv)
    except errors.UserError as e:
        sys.exit(errors.one_line(e))
    except flags.Error as e:  # absl's message may embed a traceback: keep its first and last line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        text = lines[0] if len(lines) == 1 else f"{lines[0].rstrip(':')}: {lines[-1]}"
        sys.exit(f"error: {text} (--helpshort lists the flags)")
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a bad override value
        sys.exit(f"error: a --config flag could not be applied ({type(e).__name__}: "
                 f"{' '.join(str(e).split())}); check the flag names and values")


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments: {argv[1:]}")
    # Joins the other processes of a multi-host job (a no-op on one machine); must come
    # before anything touches devices.
    with console.quiet(None):  # library INFO lines (backend probing) off the console
        distributed.initialize(_CONFIG.value.distributed)
        if not distributed.is_primary():
            logging.set_verbosity(logging.WARNING)  # only process 0 logs progress
        trainer.run(_CONFIG.value, _WORKDIR.value)


def main(argv: list[str]) -> None:
    errors.run_main(_train, argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
