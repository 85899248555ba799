"""Memory-efficient attention in plain XLA: blockwise online softmax (FlashAttention's algorithm).

Queries are processed in blocks of `block` rows; for each query block a loop runs over the key
blocks at or before it (causal: later ones are skipped, not masked), keeping a running row
maximum, softmax denominator and output. The backward pass is hand-written and recomputes each
block's probabilities from the saved log-sum-exp, so neither pass ever holds more than a
[block, block] tile of scores per head: memory is O(L) in the sequence length instead of the
[L, L] score matrix of `xla_attention`. Runs on any backend; on GPU/TPU the fused kernels
(`kernel_attention.py`) are faster, this is the portable long-sequence fallback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.models.softcap import softcap as apply_softcap
from jaxlm.models.softcap import softcap_grad

DEFAULT_BLOCK = 512


def block_size(length: int, target: int = DEFAULT_BLOCK) -> int:
    """The largest divisor of `length` that is <= `target` (the query and key block size)."""
    size = max(1, min(target, length))
    while length % size:
        size -= 1
    return size


def _tile_mask(seg_q_BxR, seg_k_BxC, q0, k0, window):
    """[B, 1, 1, R, C]: causal (by index, within the window if > 0) and same document, for the
    tile at (q0, k0)."""
    rows, cols = seg_q_BxR.shape[1], seg_k_BxC.shape[1]
    q_R1, k_1C = (q0 + jnp.arange(rows))[:, None], (k0 + jnp.arange(cols))[None, :]
    causal_RxC = (q_R1 >= k_1C) & ((window <= 0) | (q_R1 - k_1C < window))
    same_BxRxC = seg_q_BxR[:, :, None] == seg_k_BxC[:, None, :]
    return (causal_RxC[None] & same_BxRxC)[:, None, None]


def _tile_scores(q_BxNxGxRxK, k_BxNxCxK, cap):
    """Soft-capped q k^T of one tile, float32, before masking."""
    s = jnp.einsum("bngrk,bnck->bngrc", q_BxNxGxRxK, k_BxNxCxK,
                   preferred_element_type=jnp.float32)
    return apply_softcap(s, cap)


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _key_tile(k, v, seg, seg_i, i, j, block, window):
    """Keys and values of key block j, and its visibility mask from query block i."""
    k_j, v_j = _slice(k, j * block, block, 2), _slice(v, j * block, block, 2)
    mask = _tile_mask(seg_i, _slice(seg, j * block, block, 1), i * block, j * block, window)
    return k_j, v_j, mask


def _first_key_block(i, block, window):
    """The first key block query block i can see: all from 0, or from the window's start."""
    return jnp.where(window > 0, jnp.maximum(0, (i * block - window + 1) // block), 0)


def _forward(q, k, v, seg, window, block, cap):
    """Output [B, N, G, L, K] and log-sum-exp [B, N, G, L] (float32)."""
    b, n, g, length, kd = q.shape
    nblocks = length // block

    def query_block(i):
        q_i = _slice(q, i * block, block, 3)
        seg_i = _slice(seg, i * block, block, 1)

        def key_block(j, carry):
            m, denom, acc = carry
            k_j, v_j, mask = _key_tile(k, v, seg, seg_i, i, j, block, window)
            s = jnp.where(mask, _tile_scores(q_i, k_j, cap), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            # Rows with no visible key in this tile keep m = -inf; exp must not see inf - inf.
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            l_new = denom * corr + jnp.sum(p, axis=-1)
            acc_new = acc * corr[..., None] + jnp.einsum(
                "bngrc,bnck->bngrk", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
            return m_new, l_new, acc_new

        init = (jnp.full((b, n, g, block), -jnp.inf, jnp.float32),
                jnp.zeros((b, n, g, block), jnp.float32),
                jnp.zeros((b, n, g, block, kd), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(_first_key_block(i, block, window), i + 1, key_block,
                                          init)
        # Every row sees at least itself (causal diagonal, own document), so denom > 0.
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out_blocks, lse_blocks = jax.lax.map(query_block, jnp.arange(nblocks))
    # [nblocks, B, N, G, block, ...] -> [B, N, G, L, ...]
    out = jnp.moveaxis(out_blocks, 0, 3).reshape(b, n, g, length, kd)
    lse = jnp.moveaxis(lse_blocks, 0, 3).reshape(b, n, g, length)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked_core(q, k, v, seg, window, block, cap):
    return _forward(q, k, v, seg, window, block, cap)[0]


def _core_fwd(q, k, v, seg, window, block, cap):
    out, lse = _forward(q, k, v, seg, window, block, cap)
    return out, (q, k, v, seg, window, out, lse)


def _core_bwd(block, cap, res, dout):
    """FlashAttention-2 backward: per tile p = exp(s - lse), ds = p * (dout v^T - D), D =
    rowsum(dout * out), times 1 - tanh^2 under a soft-cap; dq accumulates over key tiles,
    dk/dv over query tiles."""
    q, k, v, seg, window, out, lse = res
    length = q.shape[3]
    nblocks = length // block
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def query_block(i, carry):
        dk, dv, dq = carry
        rows = (i * block, block, 3)
        q_i, do_i = _slice(q, *rows), _slice(dout, *rows)
        lse_i, delta_i = _slice(lse, *rows), _slice(delta, *rows)
        seg_i = _slice(seg, i * block, block, 1)

        def key_block(j, inner):
            dk, dv, dq_i = inner
            k_j, v_j, mask = _key_tile(k, v, seg, seg_i, i, j, block, window)
            s = _tile_scores(q_i, k_j, cap)
            p = jnp.exp(jnp.where(mask, s, -jnp.inf) - lse_i[..., None])
            dp = jnp.einsum("bngrk,bnck->bngrc", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_i[..., None])
            if cap:
                ds = ds * softcap_grad(s, cap)
            ds = ds.astype(q.dtype)
            dq_i = dq_i + jnp.einsum("bngrc,bnck->bngrk", ds, k_j,
                                     preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("bngrc,bngrk->bnck", ds, q_i, preferred_element_type=jnp.float32)
            dv_j = jnp.einsum("bngrc,bngrk->bnck", p.astype(dout.dtype), do_i,
                              preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, _slice(dk, j * block, block, 2) + dk_j, j * block, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, _slice(dv, j * block, block, 2) + dv_j, j * block, 2)
            return dk, dv, dq_i

        dq_i = jnp.zeros(q_i.shape, jnp.float32)
        dk, dv, dq_i = jax.lax.fori_loop(_first_key_block(i, block, window), i + 1, key_block,
                                         (dk, dv, dq_i))
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * block, 3)
        return dk, dv, dq

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32),
             jnp.zeros(q.shape, jnp.float32))
    dk, dv, dq = jax.lax.fori_loop(0, nblocks, query_block, zeros)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_chunked_core.defvjp(_core_fwd, _core_bwd)


def chunked_attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array,
                      segment_ids_BxL: jax.Array, window: int | jax.Array | None = None,
                      softcap: float = 0.0, block: int = DEFAULT_BLOCK) -> jax.Array:
    """Causal, segment-masked grouped-query attention; same function as `xla_attention`.

    `block` is the target tile size; the one used is the largest divisor of L not above it.
    With a sliding `window` (> 0) only the key blocks that reach into the window are visited,
    so the work is O(L * window). `softcap` > 0 soft-caps the scores before masking.
    """
    b, length, h, kd = q_BxLxHxK.shape
    n = k_BxLxNxK.shape[2]
    scale = jnp.asarray(kd**-0.5, q_BxLxHxK.dtype)
    q_BxNxGxLxK = jnp.transpose((q_BxLxHxK * scale).reshape(b, length, n, h // n, kd),
                                (0, 2, 3, 1, 4))
    k_BxNxLxK = jnp.transpose(k_BxLxNxK, (0, 2, 1, 3))
    v_BxNxLxK = jnp.transpose(v_BxLxNxK, (0, 2, 1, 3))
    out_BxNxGxLxK = _chunked_core(q_BxNxGxLxK, k_BxNxLxK, v_BxNxLxK, segment_ids_BxL,
                                  jnp.asarray(0 if window is None else window, jnp.int32),
                                  block_size(length, block), float(softcap))
    return jnp.transpose(out_BxNxGxLxK, (0, 3, 1, 2, 4)).reshape(b, length, h, kd)
