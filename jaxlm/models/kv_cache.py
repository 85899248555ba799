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

An int8 cache (`ModelConfig.kv_cache_dtype="int8"`) stores k and v as int8 with a float32 scale
per (row, slot, kv head), `k_scale` and `v_scale` [B, M, N]: symmetric absmax quantization over
the head dim, done once when a slot is written (`quantize`). Reading folds the scales into the
attention rather than dequantizing the cache: q . (s_m k_m) = s_m (q . k_m), so the key scale
multiplies each slot's score, and sum_m p_m (s_m v_m) = sum_m (p_m s_m) v_m, so the value scale
multiplies each slot's probability. The int8 entries enter the einsums only through an exact
conversion to the compute dtype, an elementwise operand of the dot that XLA may fuse into it;
the extra work is two multiplies on the [B, N, G, L, M] scores (K / (G L) times fewer elements
than the cached keys), where dequantizing first would add a multiply over every cached element
and, unless fused, write a float copy of the whole cache, the traffic int8 is meant to save.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.softcap import softcap
from jaxlm.parallel import sharding

CACHE_KV_AXES = ("act_batch", None, "act_kv_heads", None)
CACHE_SCALE_AXES = ("act_batch", None, "act_kv_heads")  # k_scale, v_scale of an int8 cache
# the batch axis of each entry, from the end
_BATCH_AXIS_FROM_END = {"k": 4, "v": 4, "k_scale": 3, "v_scale": 3, "valid": 2, "pos": 2}
# the entries whose size grows with slots x kv heads x head dim (what `kv_bytes` counts)
_KV_ENTRIES = ("k", "v", "k_scale", "v_scale")


def quantize(x_BxLxNxK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 values [B, L, N, K], float32 scale [B, L, N]) with x ~= values * scale: symmetric
    absmax over the head dim (qwix: scale = absmax / 127.5, values rounded and clipped to
    [-128, 127]; an all-zero head gets scale 1). Computed in float32 whatever x's dtype: x /
    scale in bfloat16 would be off by up to a whole step."""
    import qwix  # here, not at import (jaxlm/models/quant/qarray.py)

    x_BxLxNxK = x_BxLxNxK.astype(jnp.float32)
    q = qwix.quantize(x_BxLxNxK, jnp.int8, channelwise_axes=tuple(range(x_BxLxNxK.ndim - 1)),
                      scale_dtype=jnp.float32)
    return q.qvalue, q.scale[..., 0]


def dequantize(values_BxLxNxK: jax.Array, scale_BxLxN: jax.Array, dtype: Any = jnp.float32
               ) -> jax.Array:
    """values * scale in `dtype`: what an int8 cache entry stands for."""
    return (values_BxLxNxK.astype(jnp.float32) * scale_BxLxN[..., None]).astype(dtype)


def _per_slot(scale_BxMxN: jax.Array) -> jax.Array:
    """A [B, M, N] scale laid out against [B, N, G, L, M] scores or probabilities."""
    return jnp.transpose(scale_BxMxN, (0, 2, 1))[:, :, None, None, :]


def attend(q_BxLxHxK: jax.Array, k_BxMxNxK: jax.Array, v_BxMxNxK: jax.Array,
           valid_BxM: jax.Array, start: jax.Array, visible_BxLxM: jax.Array | None = None,
           logit_softcap: float = 0.0, k_scale_BxMxN: jax.Array | None = None,
           v_scale_BxMxN: jax.Array | None = None) -> jax.Array:
    """Attention of L new queries (slots start..start+L-1) over M cached slots; float32 softmax.
    `visible_BxLxM` replaces the slot-causal mask (ring buffers, sliding windows);
    `logit_softcap` > 0 soft-caps the scores (`jaxlm.models.softcap`). With int8 k and v,
    `k_scale_BxMxN` and `v_scale_BxMxN` are their scales, folded into the scores and the
    probabilities (module docstring)."""
    b, length, h, k = q_BxLxHxK.shape
    m, n = k_BxMxNxK.shape[1], k_BxMxNxK.shape[2]
    if k_scale_BxMxN is not None:  # int8 entries: exact in any float dtype
        k_BxMxNxK = k_BxMxNxK.astype(q_BxLxHxK.dtype)
        v_BxMxNxK = v_BxMxNxK.astype(q_BxLxHxK.dtype)
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k) * jnp.asarray(k**-0.5,
                                                                           q_BxLxHxK.dtype)
    scores_BxNxGxLxM = jnp.einsum("blngk,bmnk->bnglm", q_BxLxNxGxK, k_BxMxNxK,
                                  preferred_element_type=jnp.float32)
    # int8 keys: the true score is q . k_m times slot m's scale, applied before anything else
    # acts on the scores (the soft-cap included)
    if k_scale_BxMxN is not None:
        scores_BxNxGxLxM = scores_BxNxGxLxM * _per_slot(k_scale_BxMxN)
    scores_BxNxGxLxM = softcap(scores_BxNxGxLxM, logit_softcap)
    if visible_BxLxM is None:
        causal_LxM = jnp.arange(m)[None, :] <= (start + jnp.arange(length))[:, None]
        visible_BxLxM = causal_LxM[None]
    mask_Bx1x1xLxM = (valid_BxM[:, None, :] & visible_BxLxM)[:, None, None]
    scores_BxNxGxLxM = jnp.where(mask_Bx1x1xLxM, scores_BxNxGxLxM, jnp.finfo(jnp.float32).min)
    probs_BxNxGxLxM = jax.nn.softmax(scores_BxNxGxLxM, axis=-1)
    if v_scale_BxMxN is not None:  # int8 values: slot m's probability times its scale
        probs_BxNxGxLxM = probs_BxNxGxLxM * _per_slot(v_scale_BxMxN)
    probs_BxNxGxLxM = probs_BxNxGxLxM.astype(v_BxMxNxK.dtype)
    out_BxLxNxGxK = jnp.einsum("bnglm,bmnk->blngk", probs_BxNxGxLxM, v_BxMxNxK)
    return out_BxLxNxGxK.reshape(b, length, h, k)


def _in_window(q_pos_BxL: jax.Array, k_pos_BxM: jax.Array, window: Any) -> jax.Array:
    """[B, L, M]: key position within (q - W, q]; a traced window <= 0 means no window."""
    diff_BxLxM = q_pos_BxL[:, :, None] - k_pos_BxM[:, None, :]
    return (diff_BxLxM >= 0) & ((diff_BxLxM < window) | (jnp.asarray(window) <= 0))


def _kv_variables(module: nn.Module, shape_BxMxNxK: tuple[Any, ...], dtype: Any
                  ) -> dict[str, Any]:
    """The cache variables of keys and values: k, v (and k_scale, v_scale for int8)."""
    if module.cfg.kv_cache_dtype != "int8":
        return {name: module.variable("cache", name, jnp.zeros, shape_BxMxNxK, dtype)
                for name in ("k", "v")}
    kv = {name: module.variable("cache", name, jnp.zeros, shape_BxMxNxK, jnp.int8)
          for name in ("k", "v")}
    for name in ("k_scale", "v_scale"):
        kv[name] = module.variable("cache", name, jnp.zeros, shape_BxMxNxK[:3], jnp.float32)
    return kv


def _to_entries(module: nn.Module, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array
                ) -> dict[str, jax.Array]:
    """New keys and values as the cache stores them (quantized for an int8 cache)."""
    if module.cfg.kv_cache_dtype != "int8":
        return {"k": k_BxLxNxK, "v": v_BxLxNxK}
    (k_q, k_scale), (v_q, v_scale) = quantize(k_BxLxNxK), quantize(v_BxLxNxK)
    return {"k": k_q, "v": v_q, "k_scale": k_scale, "v_scale": v_scale}


def _constrain(kv: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: sharding.constrain(x, CACHE_KV_AXES if x.ndim == 4 else CACHE_SCALE_AXES)
            for name, x in kv.items()}


def _attend_entries(q_BxLxHxK: jax.Array, kv: dict[str, jax.Array], valid_BxM: jax.Array,
                    start: jax.Array, visible_BxLxM: jax.Array | None,
                    logit_softcap: float) -> jax.Array:
    return attend(q_BxLxHxK, kv["k"], kv["v"], valid_BxM, start, visible_BxLxM, logit_softcap,
                  k_scale_BxMxN=kv.get("k_scale"), v_scale_BxMxN=kv.get("v_scale"))


def update_and_attend(module: nn.Module, q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array,
                      v_BxLxNxK: jax.Array, segment_ids_BxL: jax.Array,
                      positions_BxL: jax.Array | None = None, window: Any = None,
                      ring: bool = False) -> jax.Array:
    """Writes the new keys/values at the cache index, advances it, attends over the cache.

    Called from `Attention` with decode=True (`module.cfg.kv_cache_dtype` picks the stored
    dtype). At init the cache is created with the input's length as its size M (see
    `init_cache`); `ring` (a static window in every layer) makes it a ring buffer of
    min(window, M) slots.
    """
    if ring:
        return _ring_update_and_attend(module, q_BxLxHxK, k_BxLxNxK, v_BxLxNxK,
                                       segment_ids_BxL, positions_BxL, window)
    b, length, n, k = k_BxLxNxK.shape
    kv_vars = _kv_variables(module, (b, length, n, k), k_BxLxNxK.dtype)
    valid_var = module.variable("cache", "valid", jnp.zeros, (b, length), jnp.bool_)
    index_var = module.variable("cache", "index", jnp.zeros, (), jnp.int32)
    start = index_var.value
    new = _to_entries(module, k_BxLxNxK, v_BxLxNxK)
    kv = _constrain({name: jax.lax.dynamic_update_slice_in_dim(var.value, new[name], start,
                                                               axis=1)
                     for name, var in kv_vars.items()})
    valid_BxM = jax.lax.dynamic_update_slice(valid_var.value, segment_ids_BxL != 0, (0, start))
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
        for name, var in kv_vars.items():
            var.value = kv[name]
        valid_var.value = valid_BxM
        index_var.value = start + length
    return _attend_entries(q_BxLxHxK, kv, valid_BxM, start, visible_BxLxM,
                           module.cfg.attn_logit_softcap)


def _ring_update_and_attend(module: nn.Module, q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array,
                            v_BxLxNxK: jax.Array, segment_ids_BxL: jax.Array,
                            positions_BxL: jax.Array, window: int) -> jax.Array:
    """The ring-buffer cache of a sliding-window model: the new queries attend over the ring
    (earlier tokens) and the new keys together; then the last min(L, S) new keys overwrite
    the ring slots (index + j) mod S."""
    b, length, n, k = k_BxLxNxK.shape
    size = min(window, length) if module.is_initializing() else None
    kv_vars = _kv_variables(module, (b, size, n, k), k_BxLxNxK.dtype)
    valid_var = module.variable("cache", "valid", jnp.zeros, (b, size), jnp.bool_)
    pos_var = module.variable("cache", "pos", jnp.zeros, (b, size), jnp.int32)
    index_var = module.variable("cache", "index", jnp.zeros, (), jnp.int32)
    module.variable("cache", "ring", jnp.ones, (), jnp.bool_)  # marks the cache as a ring
    size = valid_var.value.shape[1]
    positions_BxL = positions_BxL.astype(jnp.int32)
    new_valid_BxL = segment_ids_BxL != 0
    new = _to_entries(module, k_BxLxNxK, v_BxLxNxK)
    kv_T = {name: jnp.concatenate([var.value, new[name]], axis=1)  # T = S + L
            for name, var in kv_vars.items()}
    valid_BxT = jnp.concatenate([valid_var.value, new_valid_BxL], axis=1)
    pos_BxT = jnp.concatenate([pos_var.value, positions_BxL], axis=1)
    # Ring slots hold earlier tokens only; among the new ones, causal by index.
    new_causal_LxL = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    order_LxT = jnp.concatenate([jnp.ones((length, size), jnp.bool_), new_causal_LxL], axis=1)
    visible_BxLxT = order_LxT[None] & _in_window(positions_BxL, pos_BxT, window)
    out = _attend_entries(q_BxLxHxK, kv_T, valid_BxT, index_var.value, visible_BxLxT,
                          module.cfg.attn_logit_softcap)
    if not module.is_initializing():
        keep = min(length, size)
        slots_T = (index_var.value + length - keep + jnp.arange(keep)) % size
        tail = lambda x: x[:, length - keep:]
        for name, var in kv_vars.items():
            var.value = var.value.at[:, slots_T].set(tail(new[name]))
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


def kv_bytes(cache: Any) -> int:
    """Bytes of the cached keys and values (with their int8 scales), every layer; works on
    arrays and on `jax.eval_shape` results alike."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize
               for path, x in jax.tree_util.tree_flatten_with_path(cache)[0]
               if _leaf_name(path) in _KV_ENTRIES)


# --kv_cache values of generate and eval -> ModelConfig.kv_cache_dtype ("" keeps the run's)
KV_CACHE_FLAG = {"compute": "", "int8": "int8"}


def with_kv_cache(model_cfg: Any, kv_cache: str) -> Any:
    """The model config (a `ModelConfig`) with the KV cache a `--kv_cache` flag asks for: ""
    keeps the run's model.kv_cache_dtype, "compute" stores k and v in the compute dtype, "int8"
    as int8."""
    if kv_cache and kv_cache not in KV_CACHE_FLAG:
        raise ValueError(f"--kv_cache={kv_cache!r} is not one of {list(KV_CACHE_FLAG)} (or "
                         "empty: the run's model.kv_cache_dtype)")
    if not kv_cache:
        return model_cfg
    return dataclasses.replace(model_cfg, kv_cache_dtype=KV_CACHE_FLAG[kv_cache])
