"""token_logps: values, entropy and gradients against log_softmax on full logits; the greedy
hits of token_logps_and_hits against argmax; the DPO loss and scoring built on it never hold a
[B, L, V] float32 array."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.inference import scoring
from jaxlm.losses.cross_entropy import token_logps, token_logps_and_hits
from jaxlm.models import Transformer
from jaxlm.stages import dpo
from tests.model_fixtures import LLAMA_TINY, init_params

B, L, D, V, VOCAB = 3, 10, 16, 40, 33  # V rows in the head, the last V - VOCAB are padding


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (B, L, D), jnp.float32)
    head = jax.random.normal(k[1], (V, D), jnp.float32)
    targets = jax.random.randint(k[2], (B, L), 0, VOCAB)
    return hidden, head, targets, jax.random.normal(k[3], (B, L)), jax.random.normal(k[4], (B, L))


def _reference(hidden, head, targets):
    """log p(target) and entropy from the whole float32 logits, padded vocab at -1e9."""
    logits = jnp.einsum("bld,vd->blv", hidden, head).astype(jnp.float32)
    logits = jnp.where(jnp.arange(V) < VOCAB, logits, -1e9)
    logp_BxLxV = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp_BxLxV, targets[..., None], axis=-1)[..., 0]
    p = jnp.exp(logp_BxLxV)
    entropy = -jnp.sum(p * jnp.where(p > 0, logp_BxLxV, 0.0), axis=-1)
    return target, entropy


# chunk_tokens -> chunk length: 3 (1 per row), 6 (2), 15 (5, divides L), 12 (4, does not:
# 3 chunks of 4 with 2 padded positions), 21 (7 -> 2 chunks of 5), 64 (the whole sequence).
CHUNKS = [3, 6, 15, 12, 21, 64]


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
def test_values_match_log_softmax_of_full_logits(chunk_tokens):
    hidden, head, targets, _, _ = _inputs()
    want_logp, want_entropy = _reference(hidden, head, targets)
    fn = jax.jit(lambda h, w: token_logps(h, w, targets, vocab_size=VOCAB,
                                          chunk_tokens=chunk_tokens, with_entropy=True))
    logp, entropy = fn(hidden, head)
    assert logp.shape == entropy.shape == (B, L) and logp.dtype == jnp.float32
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    plain = jax.jit(lambda h, w: token_logps(h, w, targets, vocab_size=VOCAB,
                                             chunk_tokens=chunk_tokens))(hidden, head)
    np.testing.assert_array_equal(plain, logp)


@pytest.mark.parametrize("chunk_tokens", [6, 12, 64])
def test_hits_are_argmax_of_full_logits_and_logps_unchanged(chunk_tokens):
    hidden, head, targets, _, _ = _inputs(4)
    hidden = hidden.at[2, :2].set(0.0)  # row 2: all logits tie, argmax is id 0
    head = head.at[VOCAB:].set(100.0 * hidden[0, 0])  # padded rows would win the argmax
    logits = jnp.where(jnp.arange(V) < VOCAB, jnp.einsum("bld,vd->blv", hidden, head), -1e9)
    targets = targets.at[0].set(jnp.argmax(logits[0], axis=-1))  # row 0: every target greedy
    targets = targets.at[2, 0].set(0).at[2, 1].set(3)
    logp, hits = jax.jit(lambda h, w: token_logps_and_hits(
        h, w, targets, vocab_size=VOCAB, chunk_tokens=chunk_tokens))(hidden, head)
    np.testing.assert_allclose(logp, _reference(hidden, head, targets)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(hits, jnp.argmax(logits, axis=-1) == targets)
    assert bool(jnp.all(hits[0])) and not bool(jnp.all(hits[1:]))
    assert bool(hits[2, 0]) and not bool(hits[2, 1])  # a tie goes to the lower id


def test_padded_vocab_gets_no_probability():
    """A head whose padding rows would dominate: the answer is the real-vocab softmax."""
    hidden, head, targets, _, _ = _inputs(1)
    head = head.at[VOCAB:].set(100.0 * hidden[0, 0])  # huge logits in the padded rows
    want, _ = _reference(hidden, head, targets)
    got = jax.jit(lambda h, w: token_logps(h, w, targets, vocab_size=VOCAB, chunk_tokens=6))(
        hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(got)) < 0.0


@pytest.mark.parametrize("chunk_tokens", [6, 12, 64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradients_match_autodiff_of_full_logits(chunk_tokens, with_entropy):
    """d/d hidden and d/d head of sum(ct * logp) (+ sum(ct_h * entropy)) under jit."""
    hidden, head, targets, ct, ct_h = _inputs(2)

    def objective(fn):
        def f(h, w):
            out = fn(h, w)
            logp, entropy = out if with_entropy else (out, None)
            return jnp.sum(ct * logp) + (jnp.sum(ct_h * entropy) if with_entropy else 0.0)
        return f

    fused = objective(lambda h, w: token_logps(h, w, targets, vocab_size=VOCAB,
                                               chunk_tokens=chunk_tokens,
                                               with_entropy=with_entropy))
    ref = objective(lambda h, w: _reference(h, w, targets) if with_entropy
                    else _reference(h, w, targets)[0])
    got = jax.jit(jax.grad(fused, (0, 1)))(hidden, head)
    want = jax.jit(jax.grad(ref, (0, 1)))(hidden, head)
    for g, w in zip(got, want):
        assert float(jnp.max(jnp.abs(w))) > 1e-2  # the check has something to compare
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(got[1][VOCAB:]))  # padded head rows get no gradient


def _float32_sizes(jaxpr):
    """Element counts of every float32 value a jaxpr (and the jaxprs inside it) produces."""
    sizes = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if getattr(aval, "dtype", None) == jnp.float32:
                sizes.append(int(np.prod(aval.shape)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sizes += _float32_sizes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    sizes += _float32_sizes(sub)
    return sizes


def _full_logits_sequence_logps(params, batch, *, model):
    """What sequence_logps computed before token_logps: log_softmax of the whole logits."""
    b, two, length = batch["inputs"].shape
    flat = {k: v.reshape(b * two, length) for k, v in batch.items()}
    logits = model.apply({"params": params}, flat["inputs"], flat["positions"],
                         flat["segment_ids"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.take_along_axis(logp, flat["targets"][..., None], axis=-1)[..., 0]
    mask = flat["loss_mask"]
    return (token * mask).sum(-1).reshape(b, two), mask.sum(-1).reshape(b, two)


def test_dpo_loss_and_its_gradient_hold_no_full_logits():
    """Walk the jaxpr of the DPO loss's gradient: no float32 value has 2B * L * V elements.
    The same walk over the full-logits formulation finds them (so the check can fail)."""
    cfg = dataclasses.replace(LLAMA_TINY, vocab_size=8000, max_seq_len=128)
    model = Transformer(cfg)
    pairs_, length = 4, 128  # 1024 tokens: two chunks of 512 by default
    full = 2 * pairs_ * length * cfg.padded_vocab_size
    params = jax.eval_shape(lambda r: nn.meta.unbox(
        jax.jit(model.init)(r, jnp.zeros((1, 8), jnp.int32))["params"]), jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (pairs_, 2, length), dtype=np.int32)
    batch = {"inputs": ids, "targets": ids, "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape),
             "loss_mask": np.ones(ids.shape, np.float32)}
    ref_Bx2 = jnp.zeros((pairs_, 2), jnp.float32)

    def loss(p):
        return dpo.loss_fn(p, batch, ref_Bx2, model=model, variant="sigmoid", beta=0.1,
                           label_smoothing=0.0, gamma=0.0)[0]

    def old_loss(p):
        policy, lengths = _full_logits_sequence_logps(p, batch, model=model)
        return dpo.preference_loss(policy, ref_Bx2, lengths, variant="sigmoid", beta=0.1)[0].sum()

    new_sizes = _float32_sizes(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
    old_sizes = _float32_sizes(jax.make_jaxpr(jax.value_and_grad(old_loss))(params).jaxpr)
    assert max(old_sizes) >= full
    assert max(new_sizes) < full, max(new_sizes) / full
    assert max(new_sizes) <= full // 2  # the biggest is one chunk's logits


@pytest.mark.slow
def test_scoring_matches_log_softmax_of_the_model_logits():
    cfg = dataclasses.replace(LLAMA_TINY, max_seq_len=32)
    model = Transformer(cfg)
    params = init_params(model.cfg, 1)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, cfg.vocab_size, (3, 23), dtype=np.int32)  # L - 1 = 22
    valid = np.arange(23)[None, :] < np.array([[23], [15], [4]])
    got = jax.jit(functools.partial(scoring.token_logprobs, model))(params, tokens, valid)
    logits = jax.jit(model.apply)({"params": params}, tokens,
                                  segment_ids_BxL=valid.astype(np.int32))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    want = np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    want = np.where(valid[:, 1:], want, 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[valid[:, 1:]] < 0) and not np.any(got[~valid[:, 1:]])
