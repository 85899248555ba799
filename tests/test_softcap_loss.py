"""Final-logit soft-capping (model.final_logit_softcap): the chunked losses that rebuild the
logits from hidden states (fused cross-entropy, token_logps, distillation) equal the same
losses on C * tanh(logits / C) materialised whole, values and gradients; the model's head
returns the capped logits; a cap of 0 adds nothing to the computation."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.losses.cross_entropy import cross_entropy_sum, fused_cross_entropy_sum, token_logps
from jaxlm.losses.distill import DistillSpec, distill_sums, divergence_BxL
from jaxlm.models import Transformer
from jaxlm.stages import pretrain
from jaxlm.tools.aot import all_eqns
from tests.model_fixtures import LLAMA_TINY, packed_batch

B, L, D, V, VOCAB = 2, 12, 16, 40, 33  # V rows in the head, the last V - VOCAB are padding
CAP = 3.0  # logits are ~N(0, 16) below, so the cap bends most of them


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (B, L, D), jnp.float32)
    head = jax.random.normal(k[1], (V, D), jnp.float32)
    targets = jax.random.randint(k[2], (B, L), 0, VOCAB)
    mask = (jax.random.uniform(k[3], (B, L)) > 0.2).astype(jnp.float32)
    return hidden, head, targets, mask, jax.random.normal(k[4], (2, B, L))


def _capped_logits(hidden, head, cap=CAP):
    """The whole [B, L, V] logits as the model's head computes them, written out."""
    logits = jnp.einsum("bld,vd->blv", hidden, head)
    logits = cap * jnp.tanh(logits / cap)
    return jnp.where(jnp.arange(head.shape[0]) < VOCAB, logits, -1e9)


def _assert_close(got, ref, tol=2e-5):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [2, 8, 64])
def test_fused_cross_entropy_with_cap_equals_materialised(chunk_tokens):
    """Loss and aux sums, their gradients w.r.t. hidden and head: of the loss alone (the
    in-forward gradient) and of loss + nll_sum + z_sum (the recomputing backward)."""
    hidden, head, targets, mask, _ = _inputs()

    def fused(h, w):
        return fused_cross_entropy_sum(h, w, targets, mask, 1e-2, vocab_size=VOCAB,
                                       chunk_tokens=chunk_tokens, logit_softcap=CAP)

    def ref(h, w):
        return cross_entropy_sum(_capped_logits(h, w), targets, mask, 1e-2)

    def total(fn):
        def f(h, w):
            loss, aux = fn(h, w)
            return loss + 0.5 * aux["nll_sum"] + 2.0 * aux["z_loss_sum"]
        return f

    for fn in (lambda f: f, total):
        want = jax.jit(jax.value_and_grad(fn(ref), argnums=(0, 1), has_aux=fn is not total))
        got = jax.jit(jax.value_and_grad(fn(fused), argnums=(0, 1), has_aux=fn is not total))
        _assert_close(got(hidden, head), want(hidden, head))
    uncapped = cross_entropy_sum(_capped_logits(hidden, head, 1e6), targets, mask)[0]
    assert abs(float(uncapped) - float(ref(hidden, head)[0])) > 1.0  # the cap matters


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [2, 10, 64])
def test_token_logps_with_cap_equals_materialised(chunk_tokens):
    """log p(target) and entropy, and the gradient of a weighted sum of both."""
    hidden, head, targets, _, ct = _inputs(1)

    def fused(h, w):
        return token_logps(h, w, targets, vocab_size=VOCAB, chunk_tokens=chunk_tokens,
                           with_entropy=True, logit_softcap=CAP)

    def ref(h, w):
        logp_BxLxV = jax.nn.log_softmax(_capped_logits(h, w), axis=-1)
        target = jnp.take_along_axis(logp_BxLxV, targets[..., None], axis=-1)[..., 0]
        return target, -jnp.sum(jnp.exp(logp_BxLxV) * logp_BxLxV, axis=-1)

    def weighted(fn):
        return lambda h, w: jnp.sum(fn(h, w)[0] * ct[0]) + jnp.sum(fn(h, w)[1] * ct[1])

    _assert_close(jax.jit(fused)(hidden, head), ref(hidden, head))
    _assert_close(jax.jit(jax.grad(weighted(fused), argnums=(0, 1)))(hidden, head),
                  jax.grad(weighted(ref), argnums=(0, 1))(hidden, head))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_distill_sums_with_caps_equal_materialised(kind):
    """Student and teacher capped by their own caps; the student's gradient."""
    hidden, head, targets, mask, _ = _inputs(2)
    t_hidden, t_head = 1.5 * hidden[..., :10], _inputs(3)[1][:, :10]
    spec = DistillSpec(kind=kind, temperature=2.0)

    def fused(h, w):
        sums = distill_sums(spec, h, w, t_hidden, t_head, targets, mask, vocab_size=VOCAB,
                            alpha=0.3, chunk_tokens=8, logit_softcap=CAP,
                            teacher_logit_softcap=5.0)
        return sums["loss_sum"], sums

    def ref(h, w):
        s, te = _capped_logits(h, w), _capped_logits(t_hidden, t_head, 5.0)
        nll = cross_entropy_sum(s, targets, mask)[1]["nll_sum"]
        kd = jnp.sum(divergence_BxL(spec, s, te) * mask)
        return 0.3 * nll + 0.7 * kd, {"nll_sum": nll, "kd_sum": kd}

    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1), has_aux=True))(hidden, head)
    want = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(hidden, head)
    _assert_close((got[0][0], got[0][1]["nll_sum"], got[0][1]["kd_sum"], got[1]),
                  (want[0][0], want[0][1]["nll_sum"], want[0][1]["kd_sum"], want[1]))


def _model_and_params(cap):
    cfg = dataclasses.replace(LLAMA_TINY, final_logit_softcap=cap, attention="xla")
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0),
                                                 jnp.zeros((1, 8), jnp.int32))["params"])
    return cfg, jax.tree.map(lambda p: 4.0 * p, params)  # logits of a few units: the cap bites


@pytest.mark.slow
def test_model_head_and_pretrain_loss_use_the_cap():
    """The head returns C * tanh(logits / C) on the real vocabulary (padding stays -1e9), and
    the pretrain loss (fused, from hidden states) equals cross-entropy of those logits."""
    cfg, params = _model_and_params(1.0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 16, 250, seed=3).items()}
    model, plain = Transformer(cfg), Transformer(dataclasses.replace(cfg, final_logit_softcap=0))
    logits = jax.jit(model.apply)({"params": params}, batch["inputs"])
    raw = jax.jit(plain.apply)({"params": params}, batch["inputs"])
    real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
    np.testing.assert_allclose(logits, jnp.where(real, jnp.tanh(raw), -1e9), atol=1e-6)
    assert float(jnp.max(jnp.abs(raw[..., :cfg.vocab_size]))) > 2.0

    def direct(p, batch):
        out = model.apply({"params": p}, batch["inputs"], positions_BxL=batch["positions"],
                          segment_ids_BxL=batch["segment_ids"])
        return cross_entropy_sum(out, batch["targets"], batch["loss_mask"])

    fused = functools.partial(pretrain.loss_fn, model=model)
    got = jax.jit(jax.value_and_grad(fused, has_aux=True))(params, batch)
    want = jax.jit(jax.value_and_grad(direct, has_aux=True))(params, batch)
    _assert_close((got[0][0], got[1]), (want[0][0], want[1]), 1e-4)


def test_cap_zero_adds_nothing():
    """final cap 0: no tanh in the fused losses' forward and backward programs."""
    hidden, head, targets, mask, _ = _inputs()

    def prims(cap):
        def f(h, w):
            loss = fused_cross_entropy_sum(h, w, targets, mask, vocab_size=VOCAB,
                                           logit_softcap=cap)[0]
            return loss + jnp.sum(token_logps(h, w, targets, vocab_size=VOCAB,
                                              with_entropy=True, logit_softcap=cap)[1])
        jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, head)
        return {eqn.primitive.name for eqn in all_eqns(jaxpr.jaxpr)}

    assert "tanh" not in prims(0.0)
    assert "tanh" in prims(CAP)
