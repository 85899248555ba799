"""Exact resume of a PPO run with an adaptive KL coefficient (ppo.kl_target > 0): a run cut back
to its step-2 checkpoint and restarted logs, step by step, the kl_coef and every other metric of
the run never stopped, and ends with bitwise its params (the host's beta is restored from the
checkpoint, not restarted from rl.kl_coef)."""

import jax
import numpy as np
import pytest

from jaxlm.run import trainer
from jaxlm.run.checkpoint import Checkpointer, read_json_items
from jaxlm.stages import ppo
from tests.data_fixtures import train_tiny_tokenizer
from tests.rl_fixtures import grpo_config, reward_config
from tests.run_metrics import by_step, cut_back, measured, state

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

STEPS, STOP = 4, 2
KL_COEF = 0.1


def _config(base, tokenizer: str):
    c = grpo_config("ppo", num_epochs=2, max_new_tokens=6, chat=True)
    c.data.seq_len = 40  # the chat prompt
    # The tiny tokenizer's two special tokens serve as the chat markers.
    c.chat.update(turn_start="<|user|>", turn_end="<|assistant|>")
    c.model.vocab_size = 0  # the tokenizer's
    c.data.tokenizer_path = tokenizer
    c.train.steps = STEPS
    c.eval.every_steps = 0
    c.optim.learning_rate = 1e-2
    c.checkpoint.update(every_steps=STOP, keep_last=4, async_save=False)
    c.log.update(every_steps=1, tensorboard=False)
    c.init_from.path = str(base / "init")
    c.rl.update(reward_model=str(base / "rm"), kl_coef=KL_COEF)
    c.ppo.update(kl_target=0.5, kl_horizon=64)
    return c


def _save(directory, program, params, config=None) -> None:
    ckpt = Checkpointer(str(directory), save_every=1, keep_last=1, async_save=False)
    ckpt.save(1, program.state_from_params(params), config=config)
    ckpt.close()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run, from random init_from params and a random reward model."""
    base = tmp_path_factory.mktemp("ppo_resume")
    config = _config(base, train_tiny_tokenizer(str(base / "tok")).path)
    # The reward model is saved first: the PPO Program reads its architecture from it.
    rm_config = reward_config(config)
    rm_program = trainer.setup(rm_config, str(base / "rm_setup")).program
    rm = rm_program.init_params(jax.random.key(7))
    rm["reward_head"] = jax.random.normal(jax.random.key(8), rm["reward_head"].shape)
    _save(base / "rm", rm_program, rm, rm_config)
    program = trainer.setup(config, str(base / "full")).program
    _save(base / "init", program, program.init_params(jax.random.key(0)))
    trainer.run(config, str(base / "full"))
    return base, config


def test_ppo_adaptive_kl_stopped_and_resumed_equals_uninterrupted(full):
    base, config = full
    rows = by_step(base / "full", "kl_coef")
    assert sorted(rows) == list(range(1, STEPS + 1))
    betas = [rows[step]["kl_coef"] for step in range(1, STEPS + 1)]
    assert betas[0] == KL_COEF and len(set(betas)) == STEPS  # beta adapts every step

    cut_back(base / "full", base / "resumed", STOP)
    trainer.run(config, str(base / "resumed"))
    got = by_step(base / "resumed", "kl_coef")
    assert [got[step]["kl_coef"] for step in range(1, STEPS + 1)] == betas
    for step in range(1, STEPS + 1):
        assert measured(got[step]) == measured(rows[step]), step
    a, b = state(base / "resumed", STEPS), state(base / "full", STEPS)
    assert a.keys() == b.keys() and int(a["step"]) == STEPS
    for name, value in b.items():
        np.testing.assert_array_equal(a[name], value, err_msg=name)
    # The checkpoint holds the beta after its step's update: the next step's.
    saved = read_json_items(str(base / "full" / "checkpoints"), STOP)["extra"]
    assert saved["host_state"] == {"kl_coef": rows[STOP + 1]["kl_coef"]}


class _Extra:
    """A checkpointer whose step has the given `extra` item (None: saved without one)."""

    def __init__(self, extra):
        self.extra = extra

    def read_json(self, step, name):
        assert name == "extra"
        if self.extra is None:
            raise FileNotFoundError(step)
        return self.extra


def test_host_state_restore_and_checkpoints_from_before_it():
    host = ppo.PpoLoop.__new__(ppo.PpoLoop)  # only its config and beta are used here
    host.config = grpo_config("ppo")
    host.config.ppo.kl_target = 0.5
    host.kl_coef = KL_COEF
    trainer.restore_host_state(host, _Extra({"host_state": {"kl_coef": 0.25}}), 3)
    assert host.kl_coef == 0.25 and host.host_state() == {"kl_coef": 0.25}
    for old in ({"tokens_seen": 10}, None):  # saved before host state: beta stays as it is
        trainer.restore_host_state(host, _Extra(old), 3)
        assert host.kl_coef == 0.25
    host.config.ppo.kl_target = 0.0  # a fixed beta is rl.kl_coef whatever was saved
    trainer.restore_host_state(host, _Extra({"host_state": {"kl_coef": 0.5}}), 3)
    assert host.kl_coef == 0.25
