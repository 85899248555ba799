"""RMSNorm (Llama) and LayerNorm (GPT-2), computed in float32 whatever the compute dtype."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models.config import ModelConfig


def _stats(x_BxLxD: jax.Array, centered: bool, eps: float):
    """float32 mean (0 for RMSNorm) and 1/rms of the centered input, each [B, L, 1]."""
    x = x_BxLxD.astype(jnp.float32)
    mean_BxLx1 = jnp.mean(x, axis=-1, keepdims=True) if centered else jnp.zeros_like(x[..., :1])
    x = x - mean_BxLx1
    return mean_BxLx1, jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _normalize(x_BxLxD, scale_D, bias_D, mean_BxLx1, rstd_BxLx1, dtype):
    y = (x_BxLxD.astype(jnp.float32) - mean_BxLx1) * rstd_BxLx1 * scale_D.astype(jnp.float32)
    if bias_D is not None:
        y = y + bias_D.astype(jnp.float32)
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize(x_BxLxD: jax.Array, scale_D: jax.Array, bias_D: jax.Array | None,
              centered: bool, eps: float, dtype) -> jax.Array:
    """(x - mean) / rms * scale + bias over the last axis, in float32, cast to `dtype`.

    centered=True is LayerNorm, False (mean taken as 0) is RMSNorm. The backward pass keeps
    only x and two [B, L] statistics and recomputes the normalised x, where autodiff keeps
    several [B, L, D] float32 intermediates per norm.
    """
    return _normalize(x_BxLxD, scale_D, bias_D, *_stats(x_BxLxD, centered, eps), dtype)


def _normalize_fwd(x_BxLxD, scale_D, bias_D, centered, eps, dtype):
    mean_BxLx1, rstd_BxLx1 = _stats(x_BxLxD, centered, eps)
    y = _normalize(x_BxLxD, scale_D, bias_D, mean_BxLx1, rstd_BxLx1, dtype)
    return y, (x_BxLxD, scale_D, bias_D, mean_BxLx1, rstd_BxLx1)


def _normalize_bwd(centered, eps, dtype, res, dy_BxLxD):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale (no mean(g) term
    for RMSNorm)."""
    x_BxLxD, scale_D, bias_D, mean_BxLx1, rstd_BxLx1 = res
    dy = dy_BxLxD.astype(jnp.float32)
    xhat = (x_BxLxD.astype(jnp.float32) - mean_BxLx1) * rstd_BxLx1
    g = dy * scale_D.astype(jnp.float32)
    dx = g - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    if centered:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    dscale_D = jnp.sum(dy * xhat, axis=(0, 1)).astype(scale_D.dtype)
    dbias_D = None if bias_D is None else jnp.sum(dy, axis=(0, 1)).astype(bias_D.dtype)
    return (dx * rstd_BxLx1).astype(x_BxLxD.dtype), dscale_D, dbias_D


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class Norm(nn.Module):
    """Normalises the last axis; `cfg.norm` picks RMSNorm or LayerNorm (with bias);
    `cfg.norm_plus_one` scales by (1 + scale) with scale initialised to 0 (Gemma)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = x_BxLxD.shape[-1]
        init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
        scale_D = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                             (d,), cfg.weight_dtype)
        if cfg.norm_plus_one:
            scale_D = 1.0 + scale_D.astype(jnp.float32)
        bias_D = None
        if cfg.norm == "layernorm":
            bias_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     ("norm",)),
                                (d,), cfg.weight_dtype)
        return normalize(x_BxLxD, scale_D, bias_D, cfg.norm == "layernorm", cfg.norm_eps,
                         cfg.dtype)
