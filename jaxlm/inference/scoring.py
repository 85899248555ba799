"""Per-token log-probabilities of given texts: what evaluation and parity checks build on."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def token_logprobs(model: nn.Module, params: Any, tokens_BxL: jax.Array,
                   valid_BxL: jax.Array) -> jax.Array:
    """log p(token[t+1] | tokens[..t]) for right-padded rows, [B, L-1]; 0 where t+1 is padding.

    One full forward pass (no cache); padding is its own segment, so it never affects the real
    tokens.
    """
    logits_BxLxV = model.apply({"params": params}, tokens_BxL,
                               segment_ids_BxL=valid_BxL.astype(jnp.int32))
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1], axis=-1)
    target_BxL = tokens_BxL[:, 1:]
    logp_BxL = jnp.take_along_axis(logp_BxLxV, target_BxL[..., None], axis=-1)[..., 0]
    return jnp.where(valid_BxL[:, 1:], logp_BxL, 0.0)
