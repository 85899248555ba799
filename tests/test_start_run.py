"""init_from.config: the run a run starts from is trained first in <workdir>/init, and its
checkpoints start this run (jaxlm/run/start_run.py)."""

import pytest

from jaxlm.run import config as config_lib
from jaxlm.run import start_run


def test_a_named_starting_run_trains_first_in_the_init_directory(tmp_path):
    c = config_lib.load_config_file("configs/grpo_tiny.py")
    assert c.init_from.config.endswith("grpo_tiny.py:phase=sft") and not c.init_from.path
    config_lib.validate(c)  # the KL reference is the starting run's
    work = str(tmp_path / "run")
    resolved = start_run.with_start_path(c, work)
    assert resolved.init_from.path == f"{work}/init/checkpoints"
    assert not c.init_from.path  # the config given is left alone
    calls = []
    start_run.train_start(resolved, work, lambda config, workdir: calls.append(
        (config.stage, workdir)))
    assert calls == [("sft", f"{work}/init")]
    # A run given init_from.path (or no init_from.config) trains nothing first.
    given = config_lib.load_config_file("configs/grpo_tiny.py", "init=/elsewhere/checkpoints")
    assert start_run.with_start_path(given, work) is given
    start_run.train_start(given, work, lambda *a: pytest.fail("trained a starting run"))
