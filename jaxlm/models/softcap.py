"""Logit soft-capping: x -> C * tanh(x / C), a smooth clip of x to (-C, C) (Gemma 2).

Applied to the attention scores (`ModelConfig.attn_logit_softcap`) and to the vocab logits
(`ModelConfig.final_logit_softcap`); a cap of 0 means off and leaves x untouched (the same
array, so models without a cap compute exactly what they did before caps existed).
Hand-written backward passes use `softcap_grad`, the derivative written in the capped value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softcap(x: jax.Array, cap: float | jax.Array) -> jax.Array:
    """C * tanh(x / C) for a cap C > 0; x itself for a static cap of 0."""
    if isinstance(cap, (int, float)) and not cap:
        return x
    return cap * jnp.tanh(x / cap)


def softcap_grad(capped: jax.Array, cap: float | jax.Array) -> jax.Array:
    """d softcap(x) / d x = 1 - tanh(x / C)^2, from capped = softcap(x); 1 for a cap of 0."""
    if isinstance(cap, (int, float)) and not cap:
        return jnp.ones_like(capped)
    t = capped / cap
    return 1.0 - t * t
