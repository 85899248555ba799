"""LoRA: B = 0 is the base model exactly; a step changes only adapters (which alone have
optimizer state); merged weights give the logits of base + adapters."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.models import Transformer, lora
from jaxlm.optim import state_bytes, train_only
from jaxlm.stages.sft import sft_step
from jaxlm.train_state import TrainState
from tests.model_fixtures import LLAMA_TINY, packed_batch

LORA_CFG = dataclasses.replace(LLAMA_TINY, lora_rank=4, lora_alpha=8.0,
                               lora_targets=lora.ATTENTION_TARGETS + lora.MLP_TARGETS)


@pytest.fixture(scope="module")
def setup():
    model = Transformer(LORA_CFG)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, jnp.zeros((1, 16), jnp.int32))[
        "params"]))(jax.random.key(0))
    batch = packed_batch(4, 16, LLAMA_TINY.vocab_size)
    apply = jax.jit(lambda m, p, b: m.apply({"params": p}, b["inputs"], b["positions"],
                                            b["segment_ids"]), static_argnums=0)
    return model, params, batch, apply


def test_zero_b_reproduces_the_base_logits_exactly(setup):
    model, params, batch, apply = setup
    base, adapters = lora.split(params)
    assert {k for k in adapters["blocks"]["attn"]} == {f"{n}{s}" for n in lora.ATTENTION_TARGETS
                                                       for s in ("_lora_a", "_lora_b")}
    np.testing.assert_array_equal(apply(model, params, batch),
                                  apply(Transformer(LLAMA_TINY), base, batch))


def test_a_step_changes_only_adapters_and_only_they_have_optimizer_state(setup):
    model, params, batch, _ = setup
    tx = train_only(optax.adamw(1e-2), lora.adapter_mask)
    step = jax.jit(functools.partial(sft_step, model=model, tx=tx, lr_schedule=lambda s: 0.0))
    new, _ = step(TrainState.create(params, tx), batch)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                           params, new.params)
    flat = jax.tree_util.tree_flatten_with_path(changed)[0]
    for path, did_change in flat:
        assert did_change == lora.is_adapter_path(path), path
    n = lora.count(params)
    # Adam keeps two float32 moments per trainable value, nothing for the frozen ones.
    assert state_bytes(tx, params) == pytest.approx(2 * 4 * n["trainable"], abs=64)
    assert state_bytes(optax.adamw(1e-2), params) >= 2 * 4 * n["total"]


def test_merged_weights_equal_base_plus_adapters(setup):
    model, params, batch, apply = setup
    rng = np.random.default_rng(0)
    trained = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
        if lora.is_adapter_path(p) else x, params)
    merged = lora.merge(trained, LORA_CFG.lora_rank, LORA_CFG.lora_alpha)
    assert not lora.split(merged)[1]
    want = apply(model, trained, batch)
    assert not np.allclose(want, apply(model, params, batch), atol=1e-4)  # adapters matter
    np.testing.assert_allclose(apply(Transformer(LLAMA_TINY), merged, batch), want,
                               rtol=1e-5, atol=1e-5)
