"""The pretrain step's guard against NaN/Inf: skip the update, count it, recover."""

import functools

import jax
import numpy as np
import pytest

from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from jaxlm.run.config import base_config
from jaxlm.run.optim import learning_rate_schedule, make_optimizer
from jaxlm.run.train_state import init_sharded_state
from jaxlm.stages.pretrain import pretrain_step
from tests.model_fixtures import LLAMA_TINY, packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def test_nonfinite_step_is_skipped_counted_and_reset():
    optim = base_config().optim
    optim.warmup_steps = 0
    model = Transformer(LLAMA_TINY)
    tx = make_optimizer(optim, 10)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "pipeline": 1},
                              devices=jax.devices()[:1])
    state, _ = init_sharded_state(model, tx, mesh, jax.random.key(0), 16)
    step = jax.jit(functools.partial(pretrain_step, model=model, tx=tx,
                                     lr_schedule=learning_rate_schedule(optim, 10)))
    good = packed_batch(2, 16, 250)
    bad = dict(good, loss_mask=np.where(good["loss_mask"] > 0, np.nan, 0).astype(np.float32))
    before = jax.device_get(state.params)
    with sharding.activate(mesh):
        state, m1 = step(state, bad)
        state, m2 = step(state, bad)
        skipped = jax.device_get(state.params)
        state, m3 = step(state, good)
    assert (int(m1["nonfinite"]), int(m2["nonfinite"]), int(m3["nonfinite"])) == (1, 2, 0)
    jax.tree.map(np.testing.assert_array_equal, skipped, before)
    assert int(state.step) == 3
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params),
                           before)
    assert all(jax.tree.leaves(changed))
