"""Per-token log-probabilities of given texts: what evaluation and parity checks build on."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.losses.cross_entropy import token_logps


def token_logprobs(model: nn.Module, params: Any, tokens_BxL: jax.Array,
                   valid_BxL: jax.Array) -> jax.Array:
    """log p(token[t+1] | tokens[..t]) for right-padded rows, [B, L-1]; 0 where t+1 is padding.

    One full forward pass (no cache); padding is its own segment, so it never affects the real
    tokens. The log-probs come from the hidden states chunk by chunk (`token_logps`), so long
    texts never hold [B, L, V] logits.
    """
    hidden_BxLxD, head_VxD = model.apply({"params": params}, tokens_BxL,
                                         segment_ids_BxL=valid_BxL.astype(jnp.int32),
                                         return_hidden=True)
    logp_BxL = token_logps(hidden_BxLxD[:, :-1], head_VxD, tokens_BxL[:, 1:],
                           vocab_size=model.cfg.vocab_size,
                           logit_softcap=model.cfg.final_logit_softcap)
    return jnp.where(valid_BxL[:, 1:], logp_BxL, 0.0)
