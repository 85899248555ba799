"""Rotary position embeddings, half-split convention (the layout of Llama checkpoints on HF)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (i, i + K/2) of each head by angle position * theta^(-2i/K)."""
    k = x_BxLxHxK.shape[-1]
    inv_freq_F = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    angle_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_F
    sin_BxLx1xF = jnp.sin(angle_BxLxF)[:, :, None, :]
    cos_BxLx1xF = jnp.cos(angle_BxLxF)[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate([x1 * cos_BxLx1xF - x2 * sin_BxLx1xF,
                           x2 * cos_BxLx1xF + x1 * sin_BxLx1xF], axis=-1)
    return out.astype(x_BxLxHxK.dtype)
