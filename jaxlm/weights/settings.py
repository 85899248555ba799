"""The `init_from` section of a run config: start a run from another run's params
(jaxlm/weights/init_from.py)."""

from __future__ import annotations

import ml_collections

from jaxlm.run import errors
from jaxlm.run.section import Section


def default_init_from_config() -> ml_collections.ConfigDict:
    """The `init_from` section with its defaults."""
    fi = ml_collections.ConfigDict()
    # Start from the params of another run's checkpoint directory (<workdir>/checkpoints of an
    # earlier stage); the optimizer starts fresh. "" = random init. Ignored when resuming.
    fi.path = ""
    # Step of that checkpoint; -1 = its newest.
    fi.step = -1
    # A config file ("configs/x.py:arg=...") whose run makes the starting checkpoint: with
    # init_from.path empty, it trains first in <workdir>/init (resumed if cut short) and its
    # checkpoints start this run (jaxlm/run/start_run.py). "" = none.
    fi.config = ""
    return fi


def check_init_from(config: ml_collections.ConfigDict) -> None:
    if config.init_from.step < -1:
        raise errors.config_error("init_from.step", f"must be >= 0, or -1 for the newest, got "
                                  f"{config.init_from.step}")


INIT_FROM = Section("init_from", default_init_from_config, check_init_from)
