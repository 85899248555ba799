"""DPO family: losses and metrics vs the published formulas in numpy; the step at policy ==
reference; precomputed and in-step reference agree; a few steps raise the reward margin."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm.models import Transformer
from jaxlm.run.train_state import TrainState
from jaxlm.stages import dpo
from tests.model_fixtures import LLAMA_TINY

pytestmark = pytest.mark.slow  # each test trains or compiles for many seconds


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _numpy_loss(variant, pi, ref, lengths, beta, eps, gamma, ipo_normalize=True):
    """Per-pair losses and rewards as written in the papers (B pairs, [:, 0] chosen); label
    smoothing on the sigmoid loss as TRL applies it; IPO per token as TRL (ipo_normalize) or
    summed as Azar et al."""
    if variant == "simpo":
        r = beta * pi / lengths
        return -_log_sigmoid(r[:, 0] - r[:, 1] - gamma), r
    ratio = pi - ref
    if variant == "ipo" and ipo_normalize:
        ratio = ratio / lengths
    h = ratio[:, 0] - ratio[:, 1]
    r = beta * ratio
    if variant in ("sigmoid", "conservative"):
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h), r
    return (h - 1 / (2 * beta)) ** 2, r  # ipo


@pytest.mark.parametrize("variant,eps,ipo_normalize", [
    ("sigmoid", 0.0, True), ("sigmoid", 0.2, True), ("conservative", 0.2, True),
    ("ipo", 0.0, True), ("ipo", 0.0, False), ("simpo", 0.0, True)])
def test_losses_and_metrics_match_numpy(variant, eps, ipo_normalize):
    rng = np.random.default_rng(1)
    pi = -rng.uniform(5, 40, size=(6, 2))
    ref = pi + rng.normal(0, 2, size=(6, 2))
    lengths = rng.integers(3, 20, size=(6, 2)).astype(np.float64)
    beta, gamma = 0.3, 0.4
    want_loss, want_r = _numpy_loss(variant, pi, ref, lengths, beta, eps, gamma, ipo_normalize)
    loss, chosen, rejected = dpo.preference_loss(
        jnp.asarray(pi, jnp.float32), jnp.asarray(ref, jnp.float32),
        jnp.asarray(lengths, jnp.float32), variant=variant, beta=beta, label_smoothing=eps,
        gamma=gamma, ipo_normalize=ipo_normalize)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(chosen, want_r[:, 0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rejected, want_r[:, 1], rtol=1e-5, atol=1e-5)
    valid = np.array([1, 1, 1, 1, 1, 0], bool)  # the last pair is padding
    metrics = dpo.means(dpo.pair_sums(loss, chosen, rejected, jnp.asarray(pi, jnp.float32),
                                      jnp.asarray(valid)))
    v = valid
    expected = {"loss": want_loss[v].mean(),
                "reward_accuracy": (want_r[v, 0] > want_r[v, 1]).mean(),
                "chosen_reward": want_r[v, 0].mean(), "rejected_reward": want_r[v, 1].mean(),
                "reward_margin": (want_r[v, 0] - want_r[v, 1]).mean(),
                "chosen_logp": pi[v, 0].mean(), "rejected_logp": pi[v, 1].mean()}
    for k, want in expected.items():
        np.testing.assert_allclose(metrics[k], want, rtol=1e-5, atol=1e-5, err_msg=k)


def test_label_smoothing_changes_sigmoid_and_ipo_conventions_differ():
    """Smoothing is applied, not ignored; summed and per-token IPO are different losses; a
    smoothing that would do nothing is refused."""
    pi = jnp.asarray([[-10.0, -30.0], [-12.0, -8.0]])
    ref, lengths = pi + jnp.asarray([[1.0, -2.0], [0.5, 0.5]]), jnp.asarray([[5.0, 9.0]] * 2)
    kw = dict(beta=0.1, gamma=0.0)
    plain = dpo.preference_loss(pi, ref, lengths, variant="sigmoid", **kw)[0]
    smooth = dpo.preference_loss(pi, ref, lengths, variant="sigmoid", label_smoothing=0.1, **kw)
    assert not np.allclose(plain, smooth[0])
    summed = dpo.preference_loss(pi, ref, lengths, variant="ipo", ipo_normalize=False, **kw)
    per_token = dpo.preference_loss(pi, ref, lengths, variant="ipo", **kw)
    assert not np.allclose(summed[0], per_token[0])
    for variant in ("ipo", "simpo"):
        with pytest.raises(ValueError, match="dpo.label_smoothing: 0.1 has no effect"):
            dpo.preference_loss(pi, ref, lengths, variant=variant, label_smoothing=0.1, **kw)


def _pair_batch(b=4, length=16, vocab=250, seed=0):
    """Pairs sharing a prompt: [B, 2, L] fields, mask on the answer tokens."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(4, vocab, size=(b, 2, length + 1)).astype(np.int32)
    inputs[:, 1, :6] = inputs[:, 0, :6]  # same 6 prompt tokens
    mask = np.zeros((b, 2, length), np.float32)
    mask[:, :, 5:12] = 1.0
    mask[:, 1, 12:14] = 1.0  # rejected answers are longer
    seg = np.ones((b, 2, length), np.int32)
    seg[:, :, 14:] = 0
    mask[seg == 0] = 0
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, 2, length)).copy()
    return {"inputs": inputs[..., :-1], "targets": inputs[..., 1:], "loss_mask": mask,
            "segment_ids": seg, "positions": pos}


@pytest.fixture(scope="module")
def model_and_params():
    model = Transformer(LLAMA_TINY)
    init = jax.jit(lambda rng: nn.meta.unbox(
        jax.jit(model.init)(rng, jnp.zeros((1, 16), jnp.int32))["params"]))
    return model, init(jax.random.key(0))


def test_sequence_logps_sum_the_answer_tokens(model_and_params):
    model, params = model_and_params
    batch = _pair_batch()
    logps, lengths, _ = jax.jit(functools.partial(dpo.sequence_logps, model=model))(params, batch)
    logits = jax.jit(model.apply)({"params": params}, batch["inputs"][:, 0],
                                  batch["positions"][:, 0], batch["segment_ids"][:, 0])
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                               keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    tgt = batch["targets"][:, 0]
    want = (np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * batch["loss_mask"][:, 0]).sum(-1)
    np.testing.assert_allclose(logps[:, 0], want, rtol=1e-5)
    np.testing.assert_array_equal(lengths, batch["loss_mask"].sum(-1))


def test_policy_equal_to_reference_gives_log2_and_precompute_agrees(model_and_params):
    model, params = model_and_params
    tx = optax.sgd(0.1)
    batch = _pair_batch()
    step = jax.jit(functools.partial(dpo.dpo_step, model=model, tx=tx,
                                     lr_schedule=lambda s: 0.1, variant="conservative", beta=0.1,
                                     label_smoothing=0.1))
    state_jit, m_jit = step(TrainState.create(params, tx), batch, params)
    assert float(m_jit["loss"]) == pytest.approx(np.log(2.0), abs=1e-6)
    assert float(m_jit["reward_margin"]) == pytest.approx(0.0, abs=1e-6)
    ref = jax.jit(functools.partial(dpo.reference_step, model=model))(params, batch)
    state_pre, m_pre = step(TrainState.create(params, tx), dict(batch, ref_logps=ref))
    for k in set(m_jit) - {"reward_accuracy"}:  # accuracy of exact ties is rounding noise
        np.testing.assert_allclose(m_jit[k], m_pre[k], rtol=1e-5, atol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state_jit.params,
                 state_pre.params)


def test_steps_raise_the_margin_and_microbatches_agree(model_and_params):
    model, params = model_and_params
    tx = optax.adam(1e-2)
    batch = _pair_batch(seed=3)
    make = lambda n: jax.jit(functools.partial(
        dpo.dpo_step, model=model, tx=tx, lr_schedule=lambda s: 0.0, variant="sigmoid",
        beta=0.5, grad_accum_steps=n))
    one, two = make(1), make(2)
    _, m1 = one(TrainState.create(params, tx), batch, params)
    _, m2 = two(TrainState.create(params, tx), batch, params)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    state = TrainState.create(params, tx)
    for _ in range(5):
        state, m = one(state, batch, params)
    assert float(m["loss"]) < np.log(2.0) - 0.05
    assert float(m["reward_margin"]) > 0 and float(m["reward_accuracy"]) == 1.0


def test_pair_stages_add_the_moe_router_losses_per_pair():
    """DPO and reward losses of a mixture-of-experts model carry the weighted router losses
    (the same stats pretraining adds), averaged per pair after the step's division."""
    import dataclasses

    from jaxlm.models.config import MoeConfig
    from jaxlm.stages import reward

    moe = MoeConfig(num_experts=4, top_k=2, capacity_factor=1.0, aux_loss_weight=0.5,
                    router_z_loss_weight=0.1)
    batch = {k: jnp.asarray(v) for k, v in _pair_batch().items()}
    for cfg, loss in (
            (dataclasses.replace(LLAMA_TINY, moe=moe), functools.partial(
                dpo.loss_fn, reference_Bx2=None, variant="simpo", beta=2.0,
                label_smoothing=0.0, gamma=0.5)),
            (dataclasses.replace(LLAMA_TINY, moe=moe, reward_head=True),
             functools.partial(reward.loss_fn, margin=0.0))):
        model = Transformer(cfg)
        params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(1),
                                                   jnp.zeros((1, 16), jnp.int32))[
            "params"])
        total, aux = jax.jit(functools.partial(loss, model=model))(params, batch)
        n = float(aux["num_pairs"])
        balance = float(aux["moe_balance_loss_sum"]) / n
        z = float(aux["moe_router_z_loss_sum"]) / n
        assert balance > 0 and z > 0
        np.testing.assert_allclose(float(total) - float(aux["loss_sum"]),
                                   n * (0.5 * balance + 0.1 * z), rtol=1e-4)
