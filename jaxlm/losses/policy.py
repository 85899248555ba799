"""Policy-gradient objectives on per-token log-probs: the clipped ratio surrogate, the k3 KL
estimator, and how token terms are averaged into one loss.

All arrays are [N, T]: N completions, T completion tokens, `mask` 1 on the tokens generated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.run.errors import ConfigError


def clipped_surrogate(logp_NxT: jax.Array, old_logp_NxT: jax.Array, adv_NxT: jax.Array, *,
                      clip_low: float, clip_high: float) -> tuple[jax.Array, jax.Array]:
    """Per-token loss -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A) with
    ratio = exp(logp - old_logp), and whether the clipped term was the one taken (and differs)."""
    ratio_NxT = jnp.exp(logp_NxT - old_logp_NxT)
    unclipped_NxT = ratio_NxT * adv_NxT
    clipped_NxT = jnp.clip(ratio_NxT, 1.0 - clip_low, 1.0 + clip_high) * adv_NxT
    return -jnp.minimum(unclipped_NxT, clipped_NxT), clipped_NxT < unclipped_NxT


def k3_kl(logp_NxT: jax.Array, ref_logp_NxT: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(policy || reference) from samples of the policy:
    exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0; Schulman 2020)."""
    d_NxT = ref_logp_NxT - logp_NxT
    return jnp.exp(d_NxT) - d_NxT - 1.0


def token_weights(mask_NxT: jax.Array, loss_norm: str) -> jax.Array:
    """Weights w with loss = sum(w * per-token loss) for one batch:

    sequence: 1 / (N |o_i|), the mean over a completion's tokens, then over completions
      (DeepSeekMath's GRPO);
    token: 1 / sum |o_i|, every generated token of the batch counts the same (DAPO);
    constant: 1 / (N T), a length-independent constant (Dr. GRPO).
    """
    mask = mask_NxT.astype(jnp.float32)
    n, t = mask.shape
    if loss_norm == "sequence":
        return mask / (n * jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0))
    if loss_norm == "token":
        return mask / jnp.maximum(mask.sum(), 1.0)
    if loss_norm == "constant":
        return mask / (n * t)
    raise ConfigError(f"config key rl.loss_norm: unknown {loss_norm!r}")
