"""Token-level losses shared by the stages."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array,
                      z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sum over masked tokens of -log p(target) (+ z_loss * log(Z)^2), in float32.

    Returns (loss_sum, aux) with aux = {nll_sum, z_loss_sum, num_tokens, correct}; divide by
    num_tokens for means. Summing (not averaging) keeps microbatches and hosts exact to combine.
    """
    logits = logits_BxLxV.astype(jnp.float32)
    mask = mask_BxL.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    nll_sum = jnp.sum((log_z_BxL - target_logit_BxL) * mask)
    z_sum = jnp.sum(jnp.square(log_z_BxL) * mask)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets_BxL) * mask)
    aux = {"nll_sum": nll_sum, "z_loss_sum": z_sum, "num_tokens": jnp.sum(mask),
           "correct": correct}
    return nll_sum + z_loss * z_sum, aux
