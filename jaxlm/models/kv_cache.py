"""The key/value cache of autoregressive decoding, and attention over it.

Each attention layer keeps, in the Flax "cache" collection:

    k, v    [B, M, N, K]  keys (after RoPE) and values of every slot written so far
    valid   [B, M]        whether a slot holds a real token (False: padding, a rejected draft
                          token of speculative decoding, or a row that has finished)
    index   []            the next slot to write; shared by the whole batch

With scanned layers every entry gets a leading `layers` axis. Slots are not positions: a row's
token positions (for RoPE or the learned table) are passed in by the caller, so rows of different
prompt lengths share one write index (prompts are left-padded) and a slot can be invalidated
after it was written (speculative decoding) without moving anything. A query at slot s sees the
valid slots m <= s.

All shapes are static: one compiled prefill per prompt length and one compiled decode step serve
a whole generation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding

CACHE_KV_AXES = ("act_batch", None, "act_kv_heads", None)
_BATCH_AXIS_FROM_END = {"k": 4, "v": 4, "valid": 2}  # the batch axis of each entry, from the end


def attend(q_BxLxHxK: jax.Array, k_BxMxNxK: jax.Array, v_BxMxNxK: jax.Array,
           valid_BxM: jax.Array, start: jax.Array) -> jax.Array:
    """Attention of L new queries (slots start..start+L-1) over M cached slots; float32 softmax."""
    b, length, h, k = q_BxLxHxK.shape
    m, n = k_BxMxNxK.shape[1], k_BxMxNxK.shape[2]
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k) * jnp.asarray(k**-0.5,
                                                                           q_BxLxHxK.dtype)
    scores_BxNxGxLxM = jnp.einsum("blngk,bmnk->bnglm", q_BxLxNxGxK, k_BxMxNxK,
                                  preferred_element_type=jnp.float32)
    causal_LxM = jnp.arange(m)[None, :] <= (start + jnp.arange(length))[:, None]
    mask_Bx1x1xLxM = (valid_BxM[:, None, :] & causal_LxM[None])[:, None, None]
    scores_BxNxGxLxM = jnp.where(mask_Bx1x1xLxM, scores_BxNxGxLxM, jnp.finfo(jnp.float32).min)
    probs_BxNxGxLxM = jax.nn.softmax(scores_BxNxGxLxM, axis=-1).astype(v_BxMxNxK.dtype)
    out_BxLxNxGxK = jnp.einsum("bnglm,bmnk->blngk", probs_BxNxGxLxM, v_BxMxNxK)
    return out_BxLxNxGxK.reshape(b, length, h, k)


def update_and_attend(module: nn.Module, q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array,
                      v_BxLxNxK: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """Writes the new keys/values at the cache index, advances it, attends over the cache.

    Called from `Attention` with decode=True. At init the cache is created with the input's
    length as its size M (see `init_cache`).
    """
    b, length, n, k = k_BxLxNxK.shape
    dtype = k_BxLxNxK.dtype
    k_var = module.variable("cache", "k", jnp.zeros, (b, length, n, k), dtype)
    v_var = module.variable("cache", "v", jnp.zeros, (b, length, n, k), dtype)
    valid_var = module.variable("cache", "valid", jnp.zeros, (b, length), jnp.bool_)
    index_var = module.variable("cache", "index", jnp.zeros, (), jnp.int32)
    start = index_var.value
    k_BxMxNxK = jax.lax.dynamic_update_slice(k_var.value, k_BxLxNxK, (0, start, 0, 0))
    v_BxMxNxK = jax.lax.dynamic_update_slice(v_var.value, v_BxLxNxK, (0, start, 0, 0))
    valid_BxM = jax.lax.dynamic_update_slice(valid_var.value, segment_ids_BxL != 0, (0, start))
    k_BxMxNxK = sharding.constrain(k_BxMxNxK, CACHE_KV_AXES)
    v_BxMxNxK = sharding.constrain(v_BxMxNxK, CACHE_KV_AXES)
    if not module.is_initializing():
        k_var.value, v_var.value, valid_var.value = k_BxMxNxK, v_BxMxNxK, valid_BxM
        index_var.value = start + length
    return attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, valid_BxM, start)


def init_cache(decode_model: nn.Module, batch: int, max_len: int) -> Any:
    """An empty cache for `batch` rows of `max_len` slots (zeros; index 0).

    `decode_model` is a `Transformer(cfg, decode=True)`; its "cache" collection is created by
    an init on a [batch, max_len] input, traced abstractly (no FLOPs, no params kept).
    """
    tokens_BxM = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)

    def make(tokens):
        return decode_model.init(jax.random.key(0), tokens, tokens)["cache"]

    shapes = jax.eval_shape(make, tokens_BxM)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _leaf_name(path: tuple[Any, ...]) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def reorder(cache: Any, rows_B: jax.Array) -> Any:
    """The cache with its batch rows gathered by `rows_B` (beam search reorders beams)."""

    def one(path, x):
        name = _leaf_name(path)
        if name not in _BATCH_AXIS_FROM_END:
            return x
        return jnp.take(x, rows_B, axis=x.ndim - _BATCH_AXIS_FROM_END[name])

    return jax.tree_util.tree_map_with_path(one, cache)


def set_valid(cache: Any, start: jax.Array, valid_BxL: jax.Array) -> Any:
    """Overwrites the validity of slots start..start+L-1 (e.g. to drop rejected draft tokens)."""

    def one(path, x):
        if _leaf_name(path) != "valid":
            return x
        update = jnp.broadcast_to(valid_BxL, x.shape[:-1] + valid_BxL.shape[-1:])
        return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=x.ndim - 1)

    return jax.tree_util.tree_map_with_path(one, cache)


def cache_length(cache: Any) -> int:
    """M, the number of slots."""
    for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if _leaf_name(path) == "valid":
            return x.shape[-1]
    raise ValueError("not a KV cache: no 'valid' entry")
