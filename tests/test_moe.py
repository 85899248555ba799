"""Mixture of experts: the dense limit, capacity and dropping against a numpy reference, the
router losses against their formulas, expert parallelism against one device, and training."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.linen import meta
from jax.sharding import PartitionSpec as P

from jaxlm.models import MoeConfig, Transformer
from jaxlm.models.mlp import Mlp
from jaxlm.models.moe import MoeMlp, route
from jaxlm.parallel import sharding
from jaxlm.run import config as config_lib
from jaxlm.run.optim import learning_rate_schedule, make_optimizer
from jaxlm.run.train_state import init_sharded_state
from jaxlm.stages import pretrain
from tests.model_fixtures import GPT2_TINY, LLAMA_TINY, packed_batch

MOE_TINY = dataclasses.replace(LLAMA_TINY, moe=MoeConfig(num_experts=4, top_k=2,
                                                         capacity_factor=1.0))


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _np_route(logits, top_k, capacity, valid):
    """Reference routing with explicit per-expert counters: (gates, experts, kept) [B, L, K]."""
    probs = _softmax(np.asarray(logits, np.float64))
    experts = np.argsort(-probs, axis=-1)[..., :top_k]
    gates = np.take_along_axis(probs, experts, -1)
    gates = gates / gates.sum(-1, keepdims=True) if top_k > 1 else gates
    kept = np.zeros(experts.shape, bool)
    for b in range(logits.shape[0]):
        counts = np.zeros(logits.shape[-1], int)
        for j in range(top_k):  # all first choices before any second choice
            for t in range(logits.shape[1]):
                e = experts[b, t, j]
                if valid[b, t] and counts[e] < capacity:
                    kept[b, t, j] = True
                    counts[e] += 1
    return gates, experts, kept


def _np_moe(params, x, cfg, valid):
    """The MoE layer in numpy (SwiGLU experts): sum over kept assignments of gate * expert(x)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)
    gates, experts, kept = _np_route(x @ p["router"], cfg.moe.top_k,
                                     cfg.moe.capacity(x.shape[1]), valid)
    out = np.zeros_like(x)
    for b, t, j in zip(*np.nonzero(kept)):
        e, xt = experts[b, t, j], x[b, t]
        gate = xt @ p["w_gate"][e]
        hidden = gate / (1 + np.exp(-gate)) * (xt @ p["w_in"][e])
        out[b, t] += gates[b, t, j] * (hidden @ p["w_out"][e])
    return out, kept


def _init(module, x):
    return meta.unbox(jax.jit(module.init)(jax.random.key(1), x)["params"])


@pytest.mark.slow
@pytest.mark.parametrize("base", [LLAMA_TINY, GPT2_TINY], ids=["swiglu", "gelu_bias"])
def test_one_expert_top1_equals_dense_mlp(base):
    cfg = dataclasses.replace(base, moe=MoeConfig(num_experts=1, top_k=1, capacity_factor=1.0))
    x = jax.random.normal(jax.random.key(0), (2, 16, cfg.d_model))
    dense = Mlp(cfg)
    dense_params = _init(dense, x)
    moe = MoeMlp(cfg)
    moe_params = dict(_init(moe, x), **{k: v[None] for k, v in dense_params.items()})
    cot = jax.random.normal(jax.random.key(2), x.shape)

    def out_and_grads(apply, params, x):  # output, and d(sum(out * cot))/d(params, x)
        out, vjp = jax.vjp(apply, params, x)
        return out, vjp(cot)

    dense_out, dense_grads = jax.jit(functools.partial(out_and_grads, dense.apply))(
        {"params": dense_params}, x)
    moe_out, moe_grads = jax.jit(functools.partial(
        out_and_grads, lambda p, x: moe.apply(p, x)[0]))({"params": moe_params}, x)
    np.testing.assert_allclose(moe_out, dense_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(moe_grads[1], dense_grads[1], rtol=1e-5, atol=1e-6)
    for name, grad in dense_grads[0]["params"].items():
        np.testing.assert_allclose(moe_grads[0]["params"][name][0], grad, rtol=1e-5, atol=1e-6)


def _skewed_logits(seed=0):
    logits = np.random.default_rng(seed).normal(size=(3, 16, 4)).astype(np.float32)
    logits[..., 0] += 1.5  # expert 0 is everyone's favourite and overflows
    valid = np.ones((3, 16), bool)
    valid[1, -3:] = False  # padding
    return logits, valid


def test_routing_respects_capacity_in_priority_order():
    logits, valid = _skewed_logits()
    capacity, e = 3, 4
    r = jax.device_get(jax.jit(route, static_argnums=(1, 2))(logits, 2, capacity, valid))
    gates, experts, kept = _np_route(logits, 2, capacity, valid)
    none = e * capacity
    np.testing.assert_array_equal(r.slot_BxLxK < none, kept)
    np.testing.assert_allclose(r.gate_BxLxK, np.where(kept, gates, 0.0), rtol=1e-6)
    filled_BxE = np.sum(r.slot_token_BxExC < logits.shape[1], axis=-1)
    np.testing.assert_array_equal(filled_BxE, [np.bincount(experts[b][kept[b]], minlength=e)
                                               for b in range(3)])
    assert filled_BxE.max() == capacity and kept.sum() < valid.sum() * 2  # some were dropped
    for b, t, j in zip(*np.nonzero(kept)):  # each kept assignment sits in its expert's slot
        slot = r.slot_BxLxK[b, t, j]
        assert slot // capacity == experts[b, t, j]
        assert r.slot_token_BxExC[b, slot // capacity, slot % capacity] == t
    assert not (r.slot_BxLxK[~valid] < none).any()  # padding takes no slot


def test_router_losses_match_their_formulas():
    logits, valid = _skewed_logits(seed=1)
    top_k, e = 2, 4
    stats = jax.device_get(jax.jit(route, static_argnums=(1, 2))(logits, top_k, 3, valid).stats)
    probs = _softmax(logits.astype(np.float64))
    _, experts, kept = _np_route(logits, top_k, 3, valid)
    n = valid.sum()
    fraction = np.bincount(experts[valid].ravel(), minlength=e) / (n * top_k)
    mean_prob = probs[valid].mean(0)
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(stats["balance_loss"], e * np.sum(fraction * mean_prob),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["router_z_loss"], np.mean(log_z[valid] ** 2), rtol=1e-6)
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept.sum() / (n * top_k),
                               rtol=1e-6)


@pytest.fixture(scope="module")
def skewed_layer():
    """x and params of a 4-expert top-2 layer whose router sends most tokens to expert 0."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 32)) + 1.0
    params = _init(MoeMlp(MOE_TINY), x)
    params["router"] = params["router"].at[:, 0].add(0.2)
    return x, params


def test_dropped_tokens_get_zero_output_and_the_rest_match_numpy(skewed_layer):
    x, params = skewed_layer
    out, stats = jax.jit(MoeMlp(MOE_TINY).apply)({"params": params}, x)
    expected, kept = _np_moe(params, x, MOE_TINY, np.ones(x.shape[:2], bool))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    fully_dropped = ~kept.any(-1)
    assert fully_dropped.any()
    assert np.all(np.asarray(out)[fully_dropped] == 0.0)
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)


def test_dropless_drops_nothing(skewed_layer):
    x, params = skewed_layer
    cfg = dataclasses.replace(MOE_TINY, moe=dataclasses.replace(MOE_TINY.moe, dropless=True))
    out, stats = jax.jit(MoeMlp(cfg).apply)({"params": params}, x)
    expected, kept = _np_moe(params, x, cfg, np.ones(x.shape[:2], bool))
    assert kept.all() and float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_router_losses_reach_the_training_loss():
    batch = packed_batch(2, 16, 250, seed=1)
    cfg = dataclasses.replace(MOE_TINY, num_layers=1)
    params = meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0),
                                                        batch["inputs"]))["params"]
    no_aux = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, aux_loss_weight=0.0, router_z_loss_weight=0.0))

    @jax.jit
    def both(params, batch):
        return (pretrain.loss_fn(params, batch, model=Transformer(cfg)),
                pretrain.loss_fn(params, batch, model=Transformer(no_aux))[0])

    (loss, aux), bare = both(params, batch)
    moe = cfg.moe
    expected = bare + moe.aux_loss_weight * aux["moe_balance_loss_sum"] + \
        moe.router_z_loss_weight * aux["moe_router_z_loss_sum"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(aux["moe_balance_loss_sum"]) > 0 and float(aux["moe_router_z_loss_sum"]) > 0


def _compiled_step(mesh, batch, total_steps=30):
    config = ml_collections.ConfigDict({"optim": dict(
        learning_rate=1e-2, warmup_steps=0, min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-3,
        weight_decay=0.1, decay_embeddings=False, clip_norm=1.0)})
    model = Transformer(MOE_TINY)
    tx = make_optimizer(config.optim, total_steps=total_steps)
    state, shardings = init_sharded_state(model, tx, mesh, jax.random.key(0), 16)
    step = functools.partial(pretrain.pretrain_step, model=model, tx=tx,
                             lr_schedule=learning_rate_schedule(config.optim, total_steps))
    with sharding.activate(mesh):
        batch = sharding.global_batch(batch, mesh)
        compiled = jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                           out_shardings=(shardings, sharding.replicated(mesh)),
                           donate_argnums=0).lower(state, batch).compile()
    return compiled, state, batch


@pytest.fixture(scope="module")
def single_device():
    batch = packed_batch(8, 16, 250, seed=4)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    step, state, global_batch = _compiled_step(mesh, batch)
    state, metrics = step(state, global_batch)
    return batch, step, state, global_batch, jax.device_get(metrics), \
        jax.device_get(state.params)


def _layer_run(mesh, params, x, valid, cot):
    """Output, router stats and gradients of the MoE layer with params/batch sharded on mesh."""
    layer = MoeMlp(MOE_TINY)

    def loss(p, x):
        out, stats = layer.apply({"params": p}, x, valid)
        return jnp.sum(out * cot) + stats["balance_loss"] + stats["router_z_loss"], (out, stats)

    boxed = jax.eval_shape(layer.init, jax.random.key(1), x, valid)["params"]
    act = sharding.batch_sharding(mesh, 3)
    with sharding.activate(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                     in_shardings=(sharding.logical_shardings(boxed, mesh), act))
        compiled = fn.lower(params, x).compile()
    return jax.device_get(compiled(params, x)), compiled.as_text()


@pytest.fixture(scope="module")
def layer_reference():
    x = jax.random.normal(jax.random.key(5), (8, 16, 32))
    valid = np.ones((8, 16), bool)
    valid[1::2, -3:] = False
    cot = jax.random.normal(jax.random.key(6), x.shape)
    params = _init(MoeMlp(MOE_TINY), x)
    single = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return params, x, valid, cot, _layer_run(single, params, x, valid, cot)[0]


@pytest.mark.slow
def test_expert_parallel_layer_equals_unsharded(layer_reference):
    params, x, valid, cot, ref = layer_reference
    got, hlo = _layer_run(sharding.make_mesh({"data": 2, "expert": 4}), params, x, valid, cot)
    # tokens move with all-to-all; nothing is all-gathered (the params are replicated here)
    assert "all-to-all" in hlo and "all-gather" not in hlo
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, got, ref)  # loss, output, stats, grads of params and of x


@pytest.mark.slow
def test_expert_parallel_step_equals_single_device(single_device):
    """The whole train step with experts, embed and mlp split 2 ways each (fsdp, tensor)."""
    batch, _, _, _, ref_metrics, ref_params = single_device
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    step, state, global_batch = _compiled_step(mesh, batch)
    assert "all-to-all" in step.as_text()
    state, metrics = step(state, global_batch)
    for key in ("loss", "grad_norm", "moe_balance_loss", "moe_router_z_loss",
                "moe_dropped_fraction"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state.params), ref_params)
    w_in = state.params["blocks"]["moe"]["w_in"]  # [layers, experts, embed, mlp]
    assert w_in.sharding.spec == P(None, "expert", "fsdp", "tensor")


@pytest.mark.slow
def test_tiny_moe_model_trains(single_device):
    _, step, state, global_batch, first, _ = single_device
    for _ in range(20):
        state, metrics = step(state, global_batch)
    last = jax.device_get(metrics)
    assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])
    assert 1.0 <= last["moe_balance_loss"] < 2.0  # E * sum f P: 1 = balanced, 4 = collapsed
    assert np.isfinite(last["moe_router_z_loss"]) and 0 <= last["moe_dropped_fraction"] < 0.5


def test_config_builds_moe_and_names_bad_keys():
    c = config_lib.base_config()
    c.data.vocab_size = 512
    c.model.moe.num_experts = 8
    c.model.moe.top_k = 1
    c.mesh.data, c.mesh.expert = 2, 4
    assert config_lib.model_config(c, 256).moe == MoeConfig(num_experts=8, top_k=1)
    assert config_lib.check_devices(c, 8)["expert"] == 4
    c.model.moe.top_k = 3
    with pytest.raises(ValueError, match="model.moe.top_k"):
        config_lib.validate(c)
    c.model.moe.top_k, c.model.moe.every = 2, 3
    with pytest.raises(ValueError, match="model.moe.every"):
        config_lib.validate(c)
    c.model.moe.every, c.model.moe.num_experts = 1, 6
    with pytest.raises(ValueError, match="mesh.expert"):
        config_lib.check_devices(c, 8)
    c.model.moe.num_experts, c.train.global_batch_size = 8, 4
    with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp \* mesh.expert"):
        config_lib.check_devices(c, 8)
    assert config_lib.model_config(config_lib.base_config(), 256).moe is None
