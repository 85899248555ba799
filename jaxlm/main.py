"""Entry point: `python -m jaxlm.main --config=configs/tiny.py --workdir=/tmp/jaxlm_tiny`.

Flags only; everything else lives in importable library code (jaxlm.trainer.run).
Override any config key on the command line: `--config.train.steps=100`, or pass the config
file an argument: `--config=configs/chinchilla.py:size=1018`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and caches.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after failing with the new name on a `--config.*` override of a
    renamed config key (ml_collections alone would raise a bare KeyError)."""
    for arg in argv[1:]:
        if arg.startswith("--config."):
            try:
                config_lib.check_renamed_key(arg.removeprefix("--config.").split("=", 1)[0])
            except ValueError as e:
                sys.exit(f"error: {e}")
    return app.parse_flags_with_usage(argv)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        # Joins the other processes of a multi-host job (a no-op on one machine); must come
        # before anything touches devices.
        distributed.initialize(_CONFIG.value.distributed)
        if not distributed.is_primary():
            logging.set_verbosity(logging.WARNING)  # only process 0 logs progress
        trainer.run(_CONFIG.value, _WORKDIR.value)
    except ValueError as e:
        if not str(e).startswith("config key"):
            raise
        sys.exit(f"error: {e}")  # a config mistake: the message names the key; no traceback


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
