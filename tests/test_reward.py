"""Reward model: Bradley-Terry loss vs numpy, log 2 at a zero head, and it learns a separable
synthetic preference set."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.models import Transformer
from jaxlm.run.train_state import TrainState
from jaxlm.stages import reward
from tests.model_fixtures import LLAMA_TINY

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

CFG = dataclasses.replace(LLAMA_TINY, reward_head=True)


def _pairs(rng, b=16, length=16):
    """Random prompts and answers; chosen answers end in a token from 10-19, rejected in 20-29
    (then padding), so a reward reading the last token separates them."""
    inputs = rng.integers(30, CFG.vocab_size, size=(b, 2, length)).astype(np.int32)
    seg = np.zeros((b, 2, length), np.int32)
    for i in range(b):
        for j in range(2):
            n = int(rng.integers(8, length + 1))
            seg[i, j, :n] = 1
            inputs[i, j, n - 1] = rng.integers(10, 20) if j == 0 else rng.integers(20, 30)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), seg.shape).copy()
    return {"inputs": inputs, "segment_ids": seg, "positions": pos}


def test_bradley_terry_matches_numpy():
    r = np.array([[1.0, -0.5], [0.2, 0.9], [3.0, 2.5]], np.float32)
    for m in (0.0, 0.7):
        want = np.log1p(np.exp(-(r[:, 0] - r[:, 1] - m)))
        np.testing.assert_allclose(reward.bradley_terry(jnp.asarray(r), m), want, rtol=1e-6)


def test_reward_model_learns_a_separable_preference_set():
    model = Transformer(CFG)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 16), jnp.int32))[
        "params"]))(jax.random.key(0))
    tx = optax.adam(3e-3)
    step = jax.jit(functools.partial(reward.reward_step, model=model, tx=tx,
                                     lr_schedule=lambda s: 3e-3))
    evaluate = jax.jit(functools.partial(reward.eval_step, model=model))
    rng = np.random.default_rng(0)
    held_out = _pairs(np.random.default_rng(99), b=64)
    state = TrainState.create(params, tx)
    state, first = step(state, _pairs(rng))
    # The head starts at zero: every margin is 0 and the loss is log 2 (to float32 rounding).
    assert float(first["loss"]) == pytest.approx(np.log(2.0), rel=1e-6)
    before = reward.means(evaluate(state.params, held_out))
    for _ in range(40):
        state, metrics = step(state, _pairs(rng))
    after = reward.means(evaluate(state.params, held_out))
    assert float(after["accuracy"]) >= 0.9, (before, after)
    assert float(after["margin"]) > 0 and float(after["loss"]) < float(before["loss"]) - 0.2


def test_eval_sums_leave_out_the_empty_rows_that_fill_a_batch():
    """The last held-out batch is filled with rows without tokens: they add nothing to any
    sum and are not counted as pairs."""
    model = Transformer(CFG)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 16), jnp.int32))[
        "params"]))(jax.random.key(0))
    params["reward_head"] = jax.random.normal(jax.random.key(1), params["reward_head"].shape)
    evaluate = jax.jit(functools.partial(reward.eval_step, model=model))
    pairs = _pairs(np.random.default_rng(3), b=6)
    filled = {k: np.concatenate([v, np.zeros((2, *v.shape[1:]), v.dtype)]) for k, v in
              pairs.items()}
    got, want = evaluate(params, filled), evaluate(params, pairs)
    assert float(got["num_pairs"]) == float(want["num_pairs"]) == 6
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5, abs=1e-6), k
