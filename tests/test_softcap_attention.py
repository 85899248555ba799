"""Attention-logit soft-capping (model.attn_logit_softcap): every attention implementation
equals a plain einsum reference of softmax(mask(C * tanh(q k^T / sqrt(K) / C))) v, values and
gradients (the hand-written backward passes of the blocked and chunked paths included); a cap
of 0 adds nothing to the computation; cuDNN refuses a cap naming the key."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import Transformer
from jaxlm.models.attention import attention_mask, fused_attention, resolve_attention, xla_attention
from jaxlm.models.chunked_attention import chunked_attention
from jaxlm.models.kernel_attention import cudnn_attention, splash_attention
from jaxlm.models.kv_cache import attend
from jaxlm.run.errors import ConfigError
from jaxlm.stages import pretrain
from jaxlm.tools.aot import all_eqns
from tests.model_fixtures import LLAMA_TINY, attention_inputs, packed_batch

CAP = 2.0  # scores are ~N(0, 9) below, so the cap bends most of them


def _inputs(b, length, heads, kv_heads, k, seed=0):
    return attention_inputs(b, length, heads, kv_heads, k, seed, q_scale=3.0)


def _reference(q, kk, v, seg, window=None, cap=CAP):
    """Soft-capped attention written out per query head, independent of the implementations."""
    group = q.shape[2] // kk.shape[2]
    kk, v = jnp.repeat(kk, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("blhk,bmhk->bhlm", q, kk) / np.sqrt(q.shape[-1])
    s = cap * jnp.tanh(s / cap)
    s = jnp.where(attention_mask(seg, window)[:, None], s, -1e30)
    return jnp.einsum("bhlm,bmhk->blhk", jax.nn.softmax(s, axis=-1), v)


def _value_and_grads(fn, args, seg, ct):
    def f(q, kk, v):
        return jnp.sum(fn(q, kk, v, seg) * ct)
    return jax.jit(lambda *a: (fn(*a, seg), jax.grad(f, argnums=(0, 1, 2))(*a)))(*args)


def _assert_close(got, ref, tol):
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=tol, atol=tol)


IMPLS = {"xla": xla_attention, "blocked": fused_attention,
         "chunked": functools.partial(chunked_attention, block=8)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IMPLS))
@pytest.mark.parametrize("window", [None, 5])
def test_capped_attention_matches_reference_values_and_grads(name, window):
    """GQA, packed documents with padding, several query blocks (blocked: 256 rows -> 4
    blocks; chunked: 8-row tiles), with and without a sliding window."""
    length = 256 if name == "blocked" else 32
    args, seg, ct = _inputs(2, length, 4, 2, 8, seed=length)
    fn = functools.partial(IMPLS[name], window=window, softcap=CAP)
    ref = _value_and_grads(lambda *a: _reference(*a, window=window), args, seg, ct)
    _assert_close(_value_and_grads(fn, args, seg, ct), ref, 2e-5)
    # the cap matters here: the uncapped function is far from the reference
    plain = _value_and_grads(functools.partial(IMPLS[name], window=window), args, seg, ct)
    assert np.max(np.abs(np.asarray(plain[0]) - np.asarray(ref[0]))) > 0.1


def test_capped_attention_with_a_traced_window():
    """The per-layer window of scanned alternating local/global layers is a traced scalar."""
    args, seg, ct = _inputs(2, 32, 4, 2, 8, seed=3)
    ref = _value_and_grads(lambda *a: _reference(*a, window=6), args, seg, ct)
    for fn in IMPLS.values():
        got = jax.jit(lambda w, f=fn: _value_and_grads(
            lambda *a: f(*a, window=w, softcap=CAP), args, seg, ct))(jnp.int32(6))
        _assert_close(got, ref, 2e-5)


def test_capped_splash_matches_reference_in_interpret_mode():
    args, seg, ct = _inputs(2, 128, 4, 2, 128, seed=1)
    args = (args[0] / 4.0,) + args[1:]  # head dim 128: keep the scores near the cap's scale
    splash = functools.partial(splash_attention, softcap=CAP, interpret=True)
    ref = _value_and_grads(_reference, args, seg, ct)
    _assert_close(_value_and_grads(splash, args, seg, ct), ref, 2e-5)


@pytest.mark.slow
def test_capped_kv_cache_attend_matches_reference():
    """The decoder's attention over its cache (a prefill of L queries into L slots)."""
    args, _, _ = _inputs(2, 16, 4, 2, 8, seed=5)
    seg = jnp.ones((2, 16), jnp.int32)
    got = attend(*args, jnp.ones((2, 16), bool), jnp.int32(0), logit_softcap=CAP)
    _assert_close(got, _reference(*args, seg), 2e-5)


def test_cudnn_refuses_a_cap_naming_the_key():
    args, seg, _ = _inputs(1, 16, 4, 2, 8)
    with pytest.raises(ConfigError, match="model.attn_logit_softcap"):
        cudnn_attention(*args, seg, softcap=CAP, implementation="xla")
    with pytest.raises(ConfigError, match="model.attention"):
        dataclasses.replace(LLAMA_TINY, attention="cudnn", attn_logit_softcap=CAP).check()
    assert resolve_attention("auto", "gpu", softcap=CAP) == "chunked"
    assert resolve_attention("auto", "gpu") == "cudnn"
    assert resolve_attention("auto", "tpu", softcap=CAP) == "splash"


@pytest.mark.parametrize("key", ["attn_logit_softcap", "final_logit_softcap"])
def test_negative_cap_is_refused(key):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        dataclasses.replace(LLAMA_TINY, **{key: -1.0}).check()


def _primitives(fn, args, seg, ct):
    jaxpr = jax.make_jaxpr(lambda *a: _value_and_grads(fn, a, seg, ct))(*args)
    return {eqn.primitive.name for eqn in all_eqns(jaxpr.jaxpr)}


@pytest.mark.parametrize("name", list(IMPLS))
def test_cap_zero_adds_nothing(name):
    """softcap=0 runs the uncapped program (no tanh anywhere, forward or backward); a cap
    puts tanh into it."""
    args, seg, ct = _inputs(1, 16, 2, 1, 8)
    assert "tanh" not in _primitives(functools.partial(IMPLS[name], softcap=0.0), args, seg, ct)
    assert "tanh" in _primitives(functools.partial(IMPLS[name], softcap=CAP), args, seg, ct)


@pytest.mark.slow
def test_model_attention_impls_agree_with_a_cap():
    """A capped model's loss and gradients are the same with xla, blocked and chunked."""
    cfg = dataclasses.replace(LLAMA_TINY, attn_logit_softcap=0.5, attention="xla")
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0),
                                                 jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda p: 4.0 * p, params)  # larger scores, so the cap bites
    batch = {k: jnp.asarray(v) for k, v in packed_batch(2, 16, 250, seed=3).items()}

    def run(c):
        fn = functools.partial(pretrain.loss_fn, model=Transformer(c))
        return jax.jit(jax.value_and_grad(fn, has_aux=True))(params, batch)

    ref = run(cfg)
    for impl in ("blocked", "chunked"):
        got = run(dataclasses.replace(cfg, attention=impl))
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):  # float32 rounding of
            scale = float(jnp.max(jnp.abs(r)))                       # large activations
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5 * scale)
    uncapped = run(dataclasses.replace(cfg, attn_logit_softcap=0.0))
    assert abs(float(uncapped[0][0]) - float(ref[0][0])) > 1e-3
