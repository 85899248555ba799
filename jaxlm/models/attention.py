"""Multi-head attention with grouped-query heads, RoPE and packed-sequence (segment) masking."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.models.config import ModelConfig
from jaxlm.models.rope import apply_rope


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
    """[B, L, L] boolean: query l may see key m iff m <= l and both lie in the same document."""
    length = segment_ids_BxL.shape[1]
    causal_LxL = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return causal_LxL[None] & same_doc_BxLxL


def xla_attention(q_BxLxHxK: jax.Array, k_BxLxNxK: jax.Array, v_BxLxNxK: jax.Array,
                  segment_ids_BxL: jax.Array) -> jax.Array:
    """Reference attention in plain XLA ops; softmax in float32.

    H query heads share N key/value heads in groups of G = H / N.
    """
    b, length, h, k = q_BxLxHxK.shape
    n = k_BxLxNxK.shape[2]
    q_BxLxNxGxK = q_BxLxHxK.reshape(b, length, n, h // n, k) * jnp.asarray(k**-0.5,
                                                                           q_BxLxHxK.dtype)
    scores_BxNxGxLxM = jnp.einsum("blngk,bmnk->bnglm", q_BxLxNxGxK, k_BxLxNxK,
                                  preferred_element_type=jnp.float32)
    mask_Bx1x1xLxM = attention_mask(segment_ids_BxL)[:, None, None]
    scores_BxNxGxLxM = jnp.where(mask_Bx1x1xLxM, scores_BxNxGxLxM, jnp.finfo(jnp.float32).min)
    probs_BxNxGxLxM = jax.nn.softmax(scores_BxNxGxLxM, axis=-1).astype(v_BxLxNxK.dtype)
    out_BxLxNxGxK = jnp.einsum("bnglm,bmnk->blngk", probs_BxNxGxLxM, v_BxLxNxK)
    return out_BxLxNxGxK.reshape(b, length, h, k)


class Attention(nn.Module):
    """Self-attention: q/k/v projections, RoPE (if configured), attention, output projection."""

    cfg: ModelConfig

    def _proj(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        init = nn.initializers.normal(self.cfg.init_std)
        return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                          self.cfg.weight_dtype).astype(self.cfg.dtype)

    def _bias(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> jax.Array:
        return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape,
                          self.cfg.weight_dtype).astype(self.cfg.dtype)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
                 segment_ids_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, h, n, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq_DxHxK = self._proj("wq", (d, h, k), ("embed", "heads", "head_dim"))
        wk_DxNxK = self._proj("wk", (d, n, k), ("embed", "kv_heads", "head_dim"))
        wv_DxNxK = self._proj("wv", (d, n, k), ("embed", "kv_heads", "head_dim"))
        wo_HxKxD = self._proj("wo", (h, k, d), ("heads", "head_dim", "embed"))

        q_BxLxHxK = jnp.einsum("bld,dhk->blhk", x_BxLxD, wq_DxHxK)
        k_BxLxNxK = jnp.einsum("bld,dnk->blnk", x_BxLxD, wk_DxNxK)
        v_BxLxNxK = jnp.einsum("bld,dnk->blnk", x_BxLxD, wv_DxNxK)
        if cfg.use_bias:
            q_BxLxHxK += self._bias("bq", (h, k), ("heads", "head_dim"))
            k_BxLxNxK += self._bias("bk", (n, k), ("kv_heads", "head_dim"))
            v_BxLxNxK += self._bias("bv", (n, k), ("kv_heads", "head_dim"))
        q_BxLxHxK = sharding.constrain(q_BxLxHxK, ("act_batch", "act_length", "act_heads", None))
        k_BxLxNxK = sharding.constrain(k_BxLxNxK, ("act_batch", "act_length", "act_kv_heads",
                                                   None))
        if cfg.position_embedding == "rope":
            q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, cfg.rope_theta)
            k_BxLxNxK = apply_rope(k_BxLxNxK, positions_BxL, cfg.rope_theta)

        out_BxLxHxK = xla_attention(q_BxLxHxK, k_BxLxNxK, v_BxLxNxK, segment_ids_BxL)
        out_BxLxD = jnp.einsum("blhk,hkd->bld", out_BxLxHxK, wo_HxKxD)
        if cfg.use_bias:
            out_BxLxD += self._bias("bo", (d,), ("norm",))
        return out_BxLxD
