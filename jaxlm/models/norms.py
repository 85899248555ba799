"""RMSNorm (Llama) and LayerNorm (GPT-2), computed in float32 whatever the compute dtype."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.config import ModelConfig


class Norm(nn.Module):
    """Normalises the last axis; `cfg.norm` picks RMSNorm or LayerNorm (with bias)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = x_BxLxD.shape[-1]
        scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                             (d,), cfg.weight_dtype)
        x = x_BxLxD.astype(jnp.float32)
        if cfg.norm == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
        y = y * scale_D.astype(jnp.float32)
        if cfg.norm == "layernorm":
            bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     ("norm",)),
                                (d,), cfg.weight_dtype)
            y = y + bias_D.astype(jnp.float32)
        return y.astype(cfg.dtype)
