"""LoRA: B = 0 is the base model exactly; a step changes only adapters (which alone have
optimizer state); merged weights give the logits of base + adapters; frozen weights get no
gradient computation; adapter dropout is inverted dropout on the adapter input, off in eval."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxlm.models import Transformer, lora
from jaxlm.run.optim import state_bytes, train_only
from jaxlm.run.train_state import TrainState, microbatched_grads
from jaxlm.stages.pretrain import loss_fn
from jaxlm.stages.sft import sft_step
from tests.model_fixtures import LLAMA_TINY, packed_batch

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds

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
    tx = train_only(optax.adamw(1e-2), lora.trainable_mask)
    step = jax.jit(functools.partial(sft_step, model=model, tx=tx, lr_schedule=lambda s: 0.0,
                                     freeze=lora.freeze))
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


def _trained(params, scale=0.05, seed=0):
    """Adapters moved off their init (B != 0), base untouched."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + scale * rng.standard_normal(x.shape).astype(x.dtype)
        if lora.is_adapter_path(p) else x, params)


def _sft_flops(model, params, batch, freeze):
    tx = optax.sgd(1e-2)
    step = functools.partial(sft_step, model=model, tx=tx, lr_schedule=lambda s: 0.0,
                             freeze=freeze)
    compiled = jax.jit(step).lower(TrainState.create(params, tx), batch).compile()
    return compiled.cost_analysis()["flops"]


def test_frozen_base_gets_zero_gradients_and_costs_no_weight_gradient(setup):
    model, params, batch, _ = setup
    params = _trained(params)
    loss = lambda p, b: loss_fn(p, b, model=model)
    grads, _ = jax.jit(lambda p: microbatched_grads(loss, p, batch, 1, freeze=lora.freeze))(
        params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert bool(np.any(np.asarray(g) != 0)) == lora.is_adapter_path(path), path
    # Without freezing, every base matrix's weight gradient (2 T in out FLOPs each) is computed
    # and thrown away by the optimizer mask; with it XLA never builds them.
    frozen, full = (_sft_flops(model, params, batch, f) for f in (lora.freeze, None))
    cfg, tokens = LORA_CFG, batch["inputs"].size
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    base_matrices = cfg.num_layers * (2 * d * q + 2 * d * kv + 3 * d * f)
    assert full - frozen >= 0.9 * 2 * tokens * base_matrices, (full, frozen)


class _Delta(nn.Module):
    cfg: object

    @nn.compact
    def __call__(self, x):
        pair = lora.adapter(self, "wq", (x.shape[-1], 2, 3), ("embed", "heads", "head_dim"))
        return lora.delta(self, x, pair)


def test_adapter_dropout_is_inverted_dropout_on_the_adapter_input():
    cfg = dataclasses.replace(LORA_CFG, lora_dropout=0.5)
    module = _Delta(cfg)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 32)), jnp.float32)
    params = _trained(nn.meta.unbox(module.init(jax.random.key(0), x)["params"]), scale=0.5)
    apply = jax.jit(lambda key: module.apply({"params": params}, x, rngs={"dropout": key}))
    plain = module.apply({"params": params}, x)  # no rng: evaluation, no dropout
    np.testing.assert_allclose(plain, _Delta(LORA_CFG).apply({"params": params}, x), rtol=1e-6)
    one, again, other = (apply(jax.random.key(k)) for k in (7, 7, 8))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, other) and not np.allclose(one, plain)
    # The output is linear in the masked input, so inverted dropout keeps its expectation.
    mean = np.mean([np.asarray(apply(jax.random.key(k))) for k in range(400)], axis=0)
    np.testing.assert_allclose(mean, plain, atol=0.15 * float(np.abs(plain).max()))


def test_dropout_steps_are_reproducible_and_differ_from_eval_mode(setup):
    _, params, batch, _ = setup
    model = Transformer(dataclasses.replace(LORA_CFG, lora_dropout=0.3))
    params = _trained(params)
    tx = train_only(optax.sgd(1e-1), lora.trainable_mask)
    state = TrainState.create(params, tx)
    step = lambda seed: jax.jit(functools.partial(
        sft_step, model=model, tx=tx, lr_schedule=lambda s: 0.0, freeze=lora.freeze,
        dropout_seed=seed))(state, batch)[1]["loss"]
    assert float(step(0)) == float(step(0))
    assert len({float(step(0)), float(step(1)), float(step(None))}) == 3


def test_reward_head_trains_with_adapters():
    cfg = dataclasses.replace(LORA_CFG, reward_head=True)
    params = jax.eval_shape(lambda r: nn.meta.unbox(Transformer(cfg).init(
        r, jnp.zeros((1, 16), jnp.int32))["params"]), jax.random.key(0))
    mask = traverse_util.flatten_dict(lora.trainable_mask(params), sep="/")
    assert mask["reward_head"] and not mask["embed"]
    assert all(v == k.endswith(("_lora_a", "_lora_b")) for k, v in mask.items()
               if k != "reward_head")


def test_mlp_adapters_on_a_mixture_of_experts_are_refused_by_name():
    """The experts take no adapters: model.lora.mlp on an MoE model is an error, not a no-op."""
    from jaxlm.run import config as config_lib

    c = config_lib.base_config()
    c.model.lora.rank, c.model.moe.num_experts, c.model.vocab_size = 4, 4, 256
    config_lib.model_config(c)  # attention adapters on an MoE model are fine
    c.model.lora.mlp = True
    with pytest.raises(ValueError, match=r"config key model.lora.mlp: .* 4 experts of "
                                         "model.moe unadapted"):
        config_lib.model_config(c)
    c.model.moe.num_experts = 0
    assert "w_in" in config_lib.model_config(c).lora_targets  # dense MLPs are adapted
