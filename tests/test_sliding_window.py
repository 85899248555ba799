"""Sliding-window attention: every implementation against the reference mask, traced per-layer
windows, and the KV-cache decoder (ring buffer, and full cache for alternating local/global
layers) against greedy decoding by full recomputation."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.inference.sampler import Request, Sampler
from jaxlm.models import Transformer, kv_cache
from jaxlm.models.attention import fused_attention, xla_attention
from jaxlm.models.chunked_attention import chunked_attention
from jaxlm.models.kernel_attention import cudnn_attention, splash_attention
from tests.greedy_reference import make_greedy_sampler
from tests.model_fixtures import LLAMA_TINY, attention_inputs, init_params
from tests.test_attention_impls import _assert_close, _jit_value_and_grads

WINDOW = 5


def _numpy_reference(q, k, v, seg, window):
    """Attention by explicit loops over (query, key) pairs: the definition of the window."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, h, kd = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(length):
            keys = [j for j in range(length) if j <= i and i - j < window
                    and seg[bi, i] == seg[bi, j]]
            for hi in range(h):
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // group] for j in keys]) / kd**0.5
                p = np.exp(s - s.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, keys, hi // group]
    return out


@pytest.mark.slow
def test_xla_window_is_the_definition():
    args, seg, _ = attention_inputs(2, 12, 4, 2, 8, seed=3)
    got = xla_attention(*args, seg, WINDOW)
    np.testing.assert_allclose(got, _numpy_reference(*args, np.asarray(seg), WINDOW), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blocked", "chunked", "cudnn_reference", "splash"])
def test_implementations_match_xla_with_a_window(name):
    """Values and gradients; chunked with tiles (8) smaller and larger than the window."""
    length = 128 if name == "splash" else 64
    args, seg, ct = attention_inputs(2, length, 4, 2, 128 if name == "splash" else 8, seed=5)
    attend = {"blocked": fused_attention,
              "chunked": functools.partial(chunked_attention, block=8),
              # jax's own reference of the cuDNN call (local_window_size); cuDNN needs a GPU.
              "cudnn_reference": functools.partial(cudnn_attention, implementation="xla"),
              "splash": functools.partial(splash_attention, interpret=True)}[name]
    for window in (WINDOW, 19):
        ref = _jit_value_and_grads(lambda *a, w=window: xla_attention(*a, w), args, seg, ct)
        got = _jit_value_and_grads(lambda *a, w=window: attend(*a, window=w), args, seg, ct)
        _assert_close(got, ref, 2e-5)


@pytest.mark.slow
def test_traced_windows_in_xla_blocked_chunked_and_a_clear_kernel_error():
    args, seg, ct = attention_inputs(1, 32, 4, 2, 8, seed=7)
    for attend in (xla_attention, fused_attention, functools.partial(chunked_attention, block=8)):
        for window in (0, WINDOW):  # 0: a global layer
            got = jax.jit(lambda w, a=attend: a(*args, seg, w))(jnp.int32(window))
            _assert_close(got, xla_attention(*args, seg, window or None), 2e-5)
    with pytest.raises(ValueError, match="model.scan_layers=False"):
        jax.jit(lambda w: splash_attention(*args, seg, w, interpret=True))(jnp.int32(WINDOW))


CFG = dataclasses.replace(LLAMA_TINY, max_seq_len=64, sliding_window=WINDOW)


@pytest.mark.slow
@pytest.mark.parametrize("global_every,scan", [(0, True), (2, True), (2, False)])
def test_decoder_matches_full_recomputation(global_every, scan):
    """Prompts longer and shorter than the window; 0 = a ring-buffer cache of WINDOW slots."""
    cfg = dataclasses.replace(CFG, global_every=global_every, scan_layers=scan)
    model = Transformer(cfg)
    params = init_params(model.cfg, 1)
    params = jax.tree.map(lambda x: x * 8, params)  # peaky logits: no near-ties in argmax
    sampler = Sampler(cfg, params, pad_id=0)
    prompts = [list(range(3, 15)), [7, 8, 9]]
    got = [c.tokens for c in sampler.generate([Request(p, 20) for p in prompts])]
    reference = make_greedy_sampler(model, 32 + 20)
    assert got == [reference(params, p)[:20] for p in prompts]
    cache = kv_cache.init_cache(Transformer(cfg, decode=True), 2, 48)
    k_shapes = {x.shape for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]
                if kv_cache._leaf_name(path) == "k"}
    assert k_shapes == ({(2, 2, WINDOW, 2, 8)} if global_every == 0 else
                        {(2, 2, 48, 2, 8)} if scan else {(2, 48, 2, 8)})
    assert kv_cache.is_ring(cache) == (global_every == 0)
    if global_every == 0:
        with pytest.raises(ValueError, match="sliding_window"):
            kv_cache.set_valid(cache, jnp.int32(0), jnp.ones((2, 1), bool))


@pytest.mark.slow
def test_scanned_and_unscanned_alternating_windows_agree():
    cfg = dataclasses.replace(CFG, global_every=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 250, (2, 24)))
    scanned = Transformer(cfg)
    params = nn.meta.unbox(jax.jit(scanned.init)(jax.random.key(2), tokens)["params"])
    unstacked = {f"block_{i}": jax.tree.map(lambda x, i=i: x[i], params["blocks"])
                 for i in range(cfg.num_layers)}
    flat = {**{k: v for k, v in params.items() if k != "blocks"}, **unstacked}
    a = jax.jit(scanned.apply)({"params": params}, tokens)
    b = jax.jit(Transformer(dataclasses.replace(cfg, scan_layers=False)).apply)(
        {"params": flat}, tokens)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # and the window changes the function (positions past it see fewer keys)
    c = jax.jit(Transformer(dataclasses.replace(cfg, sliding_window=0)).apply)(
        {"params": params}, tokens)
    assert np.allclose(a[:, :WINDOW], c[:, :WINDOW], atol=1e-5)
    assert not np.allclose(a[:, WINDOW + 1:], c[:, WINDOW + 1:], atol=1e-3)
