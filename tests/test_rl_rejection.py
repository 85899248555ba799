"""Rejection sampling: the best completion per prompt, the SFT loss on kept rows only, and no
optimizer update from a step that keeps nothing (its held-out learning run: docs/rl.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run import program as program_lib
from jaxlm.stages import rejection
from jaxlm.stages.rl.loop import place
from jaxlm.stages.rl.prompts import make_prompt_iterator
from jaxlm.stages.rl.rollout import sequence_logps
from tests.rl_fixtures import CharTokenizer, grpo_config

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def _program(config):
    config_lib.validate(config)
    mesh = sharding.make_mesh(config_lib.check_devices(config, 1, 1), devices=jax.devices()[:1])
    return program_lib.build(config, mesh)


def test_best_of_group_keeps_each_prompts_top_completion():
    rng = np.random.default_rng(0)
    b, g, p, t = 3, 4, 5, 3
    rolled = {"prompt": rng.integers(4, 20, (b, p)).astype(np.int32),
              "prompt_valid": np.ones((b, p), np.int32),
              "completion": rng.integers(4, 20, (b, g, t)).astype(np.int32),
              "lengths": rng.integers(1, t + 1, (b, g)).astype(np.int32)}
    rewards = np.array([[0.1, 1.1, 0.3, 1.1], [0.0, 0.2, 0.9, 0.1], [1.0, 0.0, 0.0, 0.0]])
    rows = rejection.best_of_group(rolled, rewards, min_reward=1.0)
    for i, j in enumerate([1, 2, 0]):  # argmax, the first of ties
        np.testing.assert_array_equal(rows["tokens"][i, p:], rolled["completion"][i, j])
        assert rows["mask"][i].sum() == rolled["lengths"][i, j]
    np.testing.assert_array_equal(rows["keep"], [1.0, 0.0, 1.0])


@pytest.fixture(scope="module")
def rejection_host():
    """16 prompts x 8 samples, lr 1e-3."""
    config = grpo_config("rejection")
    config.train.global_batch_size, config.rl.group_size = 16, 8
    config.optim.learning_rate = 1e-3
    program = _program(config)
    return program, program.make_loop(CharTokenizer())


def test_rejection_loss_is_the_mean_nll_of_kept_tokens_only(rejection_host):
    tok = CharTokenizer()
    program, host = rejection_host
    params = program.init_params(jax.random.key(1))
    batch = next(make_prompt_iterator(program.config, tok, split="train", batch_size=16))
    rolled = host.generate(params, batch, rng=jax.random.key(2))
    rewards = np.random.default_rng(3).random((16, 8))
    rows = rejection.best_of_group(rolled, rewards, min_reward=0.9)
    assert 0 < rows["keep"].sum() < 16
    arrays = {k: jnp.asarray(v) for k, v in rows.items()}
    loss, sums = rejection.loss_fn(params, arrays, model=program.model)
    logp = sequence_logps(params, arrays["tokens"], arrays["valid"], 6, model=program.model)
    kept = rows["mask"] * rows["keep"][:, None]
    np.testing.assert_allclose(float(loss), -np.sum(np.asarray(logp) * kept), rtol=1e-5)
    assert float(sums["num_tokens"]) == kept.sum()
    # Rows that are not kept do not move the gradient, whatever their tokens.
    other = dict(arrays, tokens=jnp.where(arrays["keep"][:, None] > 0, arrays["tokens"], 5))
    g1 = jax.grad(lambda p: rejection.loss_fn(p, arrays, model=program.model)[0])(params)
    g2 = jax.grad(lambda p: rejection.loss_fn(p, other, model=program.model)[0])(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_a_step_that_keeps_nothing_takes_no_optimizer_update(rejection_host):
    """No kept completion: no AdamW update (its momentum and weight decay would still move
    the weights). The trainer's step moves on; params, optimizer state (its update count, so
    the schedule) and the non-finite counter do not, and the metrics say `updated` 0."""
    tok = CharTokenizer()
    program, host = rejection_host
    state = program.state_from_params(program.init_params(jax.random.key(1)))
    batch = next(make_prompt_iterator(program.config, tok, split="train", batch_size=16))
    rolled = host.generate(state.params, batch, rng=jax.random.key(2))
    rows = rejection.best_of_group(rolled, np.ones((16, 8)), min_reward=0.5)  # all kept
    none = dict(rows, keep=np.zeros(16, np.float32))
    state, first = program.train_step(state, place(rows, program.mesh))  # Adam has momentum now
    before = jax.device_get(state)
    state, skipped = program.train_step(state, place(none, program.mesh))
    after = jax.device_get(state)
    assert float(first["updated"]) == 1.0 and float(skipped["updated"]) == 0.0
    assert int(after.step) == int(before.step) + 1 and int(after.nonfinite) == 0
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                    jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert float(skipped["kept_tokens"]) == 0.0 and float(skipped["grad_norm"]) == 0.0
    # The next update is the optimizer's second: it takes the rate the skipped one would have.
    state, second = program.train_step(state, place(rows, program.mesh))
    assert float(second["lr"]) == float(skipped["lr"])
    assert float(skipped["lr"]) == pytest.approx(float(program.lr_schedule(1)), rel=1e-6)
    assert float(first["lr"]) == pytest.approx(float(program.lr_schedule(0)), rel=1e-6)
