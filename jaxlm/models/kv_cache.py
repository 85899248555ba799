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

Sliding windows (`window` W > 0) add a `pos` [B, M] entry, the position of each slot, and a
query at position p sees only slots with position > p - W. When every layer uses the window the
cache is a ring buffer of M = min(W, max_len) slots (memory O(W), not O(max_len)): slot
`index mod M` is written next, and each call attends over the ring and its own new tokens
together, so a prefill longer than the ring still sees every key in its window. A ring cache
cannot invalidate slots after the fact (speculative decoding): `set_valid` raises.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models.softcap import softcap

CACHE_KV_AXES = ("act_batch", None, "act_kv_heads", None)
# the batch axis of each entry, from the end
_BATCH_AXIS_FROM_END = {"k": 4, "v": 4, "valid": 2, "pos": 2}


def attend(q_BxLxHxK: jax.Array, k_BxMxNxK: jax.Array, v_BxMxNxK: jax.Array,
           valid_BxM: jax.Array, start: jax.Array, visible_BxLxM: jax.Array | None = None,
           logit_softcap: float = 0.0) -> jax.Array:
    """Attention of L new queries (slots start..start+L-1) over M cached slots; float32 softmax.
    `visible_BxLxM` replaces the slot-causal mask (ring buffers, sliding windows);
    `logit_softcap` > 0 soft-caps the scores (`jaxlm.models.softcap`)."""
    b, length, h, k = q_BxLxHxK.shape
    m, n = k_BxMxNxK.shape[1], k_BxMxNxK.shape[2]
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k) * jnp.asarray(k**-0.5,
                                                                           q_BxLxHxK.dtype)
    scores_BxNxGxLxM = jnp.einsum("blngk,bmnk->bnglm", q_BxLxNxGxK, k_BxMxNxK,
                                  preferred_element_type=jnp.float32)
    scores_BxNxGxLxM = softcap(scores_BxNxGxLxM, logit_softcap)
    if visible_BxLxM is None:
        causal_LxM = jnp.arange(m)[None, :] <= (start + jnp.arange(length))[:, None]
        visible_BxLxM = causal_LxM[None]
    mask_Bx1x1xLxM = (valid_BxM[:, None, :] & visible_BxLxM)[:, None, None]
    scores_BxNxGxLxM = jnp.where(mask_Bx1x1xLxM, scores_BxNxGxLxM, jnp.finfo(jnp.float32).min)
    probs_BxNxGxLxM = jax.nn.softmax(scores_BxNxGxLxM, axis=-1).astype(v_BxMxNxK.dtype)
    out_BxLxNxGxK = jnp.einsum("bnglm,bmnk->blngk", probs_BxNxGxLxM, v_BxMxNxK)
    return out_BxLxNxGxK.reshape(b, length, h, k)


def _in_window(q_pos_BxL: jax.Array, k_pos_BxM: jax.Array, window: Any) -> jax.Array:
    """[B, L, M]: key position within (q - W, q]; a traced window <= 0 means no window."""
    diff_BxLxM = q_pos_BxL[:, :, None] - k_pos_BxM[:, None, :]
    return (diff_BxLxM >= 0) & ((diff_BxLxM < window) | (jnp.asarray(window) <= 0))


def update_and_attend(module: nn.Module, q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array,
                      v_BxLxNxK: jax.Array, segment_ids_BxL: jax.Array,
                      positions_BxL: jax.Array | None = None, window: Any = None,
                      ring: bool = False) -> jax.Array:
    """Writes the new keys/values at the cache index, advances it, attends over the cache.

    Called from `Attention` with decode=True. At init the cache is created with the input's
    length as its size M (see `init_cache`); `ring` (a static window in every layer) makes it
    a ring buffer of min(window, M) slots.
    """
    if ring:
        return _ring_update_and_attend(module, q_BxLxHxK, k_BxLxNxK, v_BxLxNxK,
                                       segment_ids_BxL, positions_BxL, window)
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
    visible_BxLxM = None
    if window is not None:  # positions of the slots, for the window
        pos_var = module.variable("cache", "pos", jnp.zeros, (b, length), jnp.int32)
        pos_BxM = jax.lax.dynamic_update_slice(pos_var.value, positions_BxL.astype(jnp.int32),
                                               (0, start))
        slot_causal_LxM = (jnp.arange(pos_BxM.shape[1])[None, :]
                           <= (start + jnp.arange(length))[:, None])
        visible_BxLxM = slot_causal_LxM[None] & _in_window(positions_BxL, pos_BxM, window)
        if not module.is_initializing():
            pos_var.value = pos_BxM
    if not module.is_initializing():
        k_var.value, v_var.value, valid_var.value = k_BxMxNxK, v_BxMxNxK, valid_BxM
        index_var.value = start + length
    return attend(q_BxLxHxK, k_BxMxNxK, v_BxMxNxK, valid_BxM, start, visible_BxLxM,
                  module.cfg.attn_logit_softcap)


def _ring_update_and_attend(module: nn.Module, q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array,
                            v_BxLxNxK: jax.Array, segment_ids_BxL: jax.Array,
                            positions_BxL: jax.Array, window: int) -> jax.Array:
    """The ring-buffer cache of a sliding-window model: the new queries attend over the ring
    (earlier tokens) and the new keys together; then the last min(L, S) new keys overwrite
    the ring slots (index + j) mod S."""
    b, length, n, k = k_BxLxNxK.shape
    dtype = k_BxLxNxK.dtype
    size = min(window, length) if module.is_initializing() else None
    k_var = module.variable("cache", "k", jnp.zeros, (b, size, n, k), dtype)
    v_var = module.variable("cache", "v", jnp.zeros, (b, size, n, k), dtype)
    valid_var = module.variable("cache", "valid", jnp.zeros, (b, size), jnp.bool_)
    pos_var = module.variable("cache", "pos", jnp.zeros, (b, size), jnp.int32)
    index_var = module.variable("cache", "index", jnp.zeros, (), jnp.int32)
    module.variable("cache", "ring", jnp.ones, (), jnp.bool_)  # marks the cache as a ring
    size = k_var.value.shape[1]
    positions_BxL = positions_BxL.astype(jnp.int32)
    new_valid_BxL = segment_ids_BxL != 0
    k_BxTxNxK = jnp.concatenate([k_var.value, k_BxLxNxK], axis=1)  # T = S + L
    v_BxTxNxK = jnp.concatenate([v_var.value, v_BxLxNxK], axis=1)
    valid_BxT = jnp.concatenate([valid_var.value, new_valid_BxL], axis=1)
    pos_BxT = jnp.concatenate([pos_var.value, positions_BxL], axis=1)
    # Ring slots hold earlier tokens only; among the new ones, causal by index.
    new_causal_LxL = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    order_LxT = jnp.concatenate([jnp.ones((length, size), jnp.bool_), new_causal_LxL], axis=1)
    visible_BxLxT = order_LxT[None] & _in_window(positions_BxL, pos_BxT, window)
    out = attend(q_BxLxHxK, k_BxTxNxK, v_BxTxNxK, valid_BxT, index_var.value, visible_BxLxT,
                 module.cfg.attn_logit_softcap)
    if not module.is_initializing():
        keep = min(length, size)
        slots_T = (index_var.value + length - keep + jnp.arange(keep)) % size
        tail = lambda x: x[:, length - keep:]
        k_var.value = k_var.value.at[:, slots_T].set(tail(k_BxLxNxK))
        v_var.value = v_var.value.at[:, slots_T].set(tail(v_BxLxNxK))
        valid_var.value = valid_var.value.at[:, slots_T].set(tail(new_valid_BxL))
        pos_var.value = pos_var.value.at[:, slots_T].set(tail(positions_BxL))
        index_var.value = index_var.value + length
    return out


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
    if is_ring(cache):
        raise ValueError("speculative decoding cannot drop tokens from the ring-buffer KV cache "
                         "of a sliding-window model (model.sliding_window); decode without "
                         "--draft_workdir")

    def one(path, x):
        if _leaf_name(path) != "valid":
            return x
        update = jnp.broadcast_to(valid_BxL, x.shape[:-1] + valid_BxL.shape[-1:])
        return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=x.ndim - 1)

    return jax.tree_util.tree_map_with_path(one, cache)


def is_ring(cache: Any) -> bool:
    """Whether `cache` is the ring buffer of a sliding-window model (its slots wrap around)."""
    return any(_leaf_name(p) == "ring" for p, _ in jax.tree_util.tree_flatten_with_path(cache)[0])


def cache_length(cache: Any) -> int:
    """M, the number of slots."""
    for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]:
        if _leaf_name(path) == "valid":
            return x.shape[-1]
    raise ValueError("not a KV cache: no 'valid' entry")
