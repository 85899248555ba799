"""The optimizer: schedule formula, weight-decay mask, loss going down on a fixed corpus."""

import functools
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxlm.models import Transformer
from jaxlm.parallel import sharding
from jaxlm.run.config import base_config
from jaxlm.run.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from jaxlm.run.train_state import init_sharded_state
from jaxlm.stages.pretrain import pretrain_step
from tests.model_fixtures import GPT2_TINY, packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def _expected_lr(step, peak, warmup, total, min_ratio):
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    end = peak * min_ratio
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("step", [0, 50, 100, 550, 1000])
def test_schedule_matches_warmup_cosine_formula(step):
    optim = base_config().optim
    optim.learning_rate, optim.warmup_steps, optim.min_lr_ratio = 3e-4, 100, 0.1
    schedule = learning_rate_schedule(optim, total_steps=1000)
    expected = _expected_lr(step, 3e-4, 100, 1000, 0.1)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_schedule_peaks_at_warmup_end_and_ends_at_min_ratio():
    optim = base_config().optim
    schedule = learning_rate_schedule(optim, total_steps=1000)
    assert float(schedule(optim.warmup_steps)) == pytest.approx(optim.learning_rate)
    assert float(schedule(1000)) == pytest.approx(optim.learning_rate * optim.min_lr_ratio)


def test_weight_decay_skips_norms_biases_and_embeddings_unless_asked():
    params = jax.eval_shape(
        lambda: Transformer(GPT2_TINY).init(jax.random.key(0), np.zeros((1, 4), np.int32)))
    params = nn.meta.unbox(params["params"])
    mask = weight_decay_mask(params, decay_embeddings=False)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    assert any("wq" in k for k in decayed) and any("w_in" in k for k in decayed)
    assert not any(n in k for k in decayed for n in ("scale", "'bias'", "bq", "b_in", "embed"))
    with_embed = weight_decay_mask(params, decay_embeddings=True)
    assert with_embed["embed"] is True and mask["embed"] is False


def _text_batch(batch, length, offset):
    """Rows of byte tokens of a fixed English text (this module's docstring and source)."""
    text = np.frombuffer(open(__file__, "rb").read(), np.uint8).astype(np.int32) % 250
    rows = np.stack([text[offset + r * length: offset + (r + 1) * length + 1]
                     for r in range(batch)])
    b = packed_batch(batch, length, 250)
    return dict(b, inputs=rows[:, :-1], targets=rows[:, 1:])


def test_loss_goes_down_on_a_fixed_corpus():
    config = base_config()
    config.optim.learning_rate, config.optim.warmup_steps = 3e-3, 5
    model = Transformer(GPT2_TINY)
    tx = make_optimizer(config.optim, total_steps=40)
    schedule = learning_rate_schedule(config.optim, 40)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "pipeline": 1})
    state, shardings = init_sharded_state(model, tx, mesh, jax.random.key(0), 16)
    step = jax.jit(functools.partial(pretrain_step, model=model, tx=tx, lr_schedule=schedule),
                   donate_argnums=0)
    batches = [sharding.global_batch(_text_batch(8, 16, offset=128 * s), mesh) for s in range(4)]
    losses = []
    with sharding.activate(mesh):
        for i in range(40):
            state, metrics = step(state, batches[i % 4])
            losses.append(float(metrics["loss"]))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert all(np.isfinite(losses))
