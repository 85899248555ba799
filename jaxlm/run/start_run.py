"""The run a run starts from, trained first: `init_from.config`.

`init_from.config = "configs/x.py:arg=..."` names the config file (with its argument) of the
run whose params this run starts from. With `init_from.path` empty, the starting run trains in
`<workdir>/init` before this one (resumed if it was cut short; a finished one only reads its
newest checkpoint and stops), and `init_from.path` becomes its checkpoints. The starting run's
own `init_from.config` is handled the same way one directory down, so a chain (SFT -> GRPO,
pretrain -> SFT -> ...) is one command and one workdir.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import ml_collections
from absl import logging

from jaxlm.run import config as config_lib

# The starting run's workdir inside this run's.
START_DIR = "init"


def _join(workdir: str, *parts: str) -> str:
    return "/".join([workdir.rstrip("/"), *parts])


def with_start_path(config: ml_collections.ConfigDict, workdir: str
                    ) -> ml_collections.ConfigDict:
    """`config` with init_from.path pointing at the starting run's checkpoints when
    init_from.config names one and init_from.path is empty (unchanged otherwise)."""
    if not config.init_from.config or config.init_from.path:
        return config
    out = copy.deepcopy(config)
    out.init_from.path = _join(workdir, START_DIR, "checkpoints")
    return out


def start_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The starting run's config: `get_config(arg)` of init_from.config's file."""
    path, _, arg = config.init_from.config.partition(":")
    return config_lib.load_config_file(path, arg or None)


def train_start(config: ml_collections.ConfigDict, workdir: str,
                run: Callable[[ml_collections.ConfigDict, str], object]) -> None:
    """Trains (or resumes, or finds finished) the starting run of `config` in
    <workdir>/init with `run` (the trainer's), when init_from.config names one and
    init_from.path is that run's checkpoints (`with_start_path`)."""
    spec = config.init_from.config
    if not spec or config.init_from.path != _join(workdir, START_DIR, "checkpoints"):
        return
    start_dir = _join(workdir, START_DIR)
    logging.info("init_from.config: the starting run %s trains in %s", spec, start_dir)
    run(start_config(config), start_dir)
