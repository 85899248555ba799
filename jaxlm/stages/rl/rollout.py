"""Rollouts from the KV-cache decoder, and the per-token log-probs of the same sequences.

`rollout` runs inside one jit with the policy's params as they are sharded for training: each
prompt row is repeated G times (group g of prompt b is row b * G + g), sampled by
`jaxlm.inference.decode.sample`, and the sampling policy's per-token log-probs are kept (of the
model's own distribution, before temperature and top-p, i.e. pi_old of the ratio objectives).

A rollout row is laid out as [P prompt slots (left-padded) | T completion slots (right-padded)],
`valid` 1 on real tokens; `sequence_logps` runs the training model over such rows (segment 0 on
padding, positions counting real tokens only, so a row scores exactly like its unpadded tokens)
and returns log p(token) of the T completion slots.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.inference import decode
from jaxlm.inference.processing import SamplingParams
from jaxlm.losses.cross_entropy import token_logps


def rollout(params: Any, prompt_BxP: jax.Array, valid_BxP: jax.Array, rng: jax.Array,
            sampling: SamplingParams, stop_S: jax.Array, *, lm: decode.LanguageModel,
            group_size: int, max_new: int, pad_id: int) -> dict[str, jax.Array]:
    """G completions per prompt: completion [B, G, T], lengths [B, G] (stop token included),
    logps [B, G, T] (0 after the end)."""
    b = prompt_BxP.shape[0]
    tokens_NxP = jnp.repeat(prompt_BxP, group_size, axis=0)
    valid_NxP = jnp.repeat(valid_BxP, group_size, axis=0).astype(bool)
    n = tokens_NxP.shape[0]
    out = decode.sample(lm, params, tokens_NxP, valid_NxP, jnp.full((n,), max_new, jnp.int32),
                        jnp.tile(stop_S[None], (n, 1)), sampling, rng, max_new=max_new,
                        pad_id=pad_id)
    return {"completion": out["tokens"].reshape(b, group_size, max_new),
            "lengths": out["lengths"].reshape(b, group_size),
            "logps": out["token_logprob"].reshape(b, group_size, max_new)}


def sequences(prompt_BxP: np.ndarray, valid_BxP: np.ndarray, completion_BxGxT: np.ndarray,
              lengths_BxG: np.ndarray) -> dict[str, np.ndarray]:
    """Host-side rows of prompt + completion: tokens and valid [B, G, P + T], and mask
    [B, G, T] (1 on the generated tokens)."""
    g, t = completion_BxGxT.shape[1:]
    mask_BxGxT = (np.arange(t) < lengths_BxG[..., None]).astype(np.int32)
    prompt_BxGxP = np.repeat(prompt_BxP[:, None], g, axis=1)
    pvalid_BxGxP = np.repeat(valid_BxP[:, None], g, axis=1).astype(np.int32)
    return {"tokens": np.concatenate([prompt_BxGxP, completion_BxGxT], -1).astype(np.int32),
            "valid": np.concatenate([pvalid_BxGxP, mask_BxGxT], -1),
            "mask": mask_BxGxT.astype(np.float32)}


def completion_hidden(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array, num_new: int,
                      *, model: nn.Module, rng: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array]:
    """The final hidden states that predict the last `num_new` slots [N, T, D], and the vocab
    head [V, D]. `model` returns hidden states (`return_hidden`), not a score head."""
    valid = valid_NxS.astype(jnp.int32)
    positions_NxS = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    (hidden_NxLxD, head_VxD), _ = model.apply(
        {"params": params}, tokens_NxS[:, :-1], positions_BxL=positions_NxS[:, :-1],
        segment_ids_BxL=valid[:, :-1], return_hidden=True, mutable=["intermediates"],
        rngs=None if rng is None else {"dropout": rng})
    return hidden_NxLxD[:, -num_new:], head_VxD


def sequence_logps(params: Any, tokens_NxS: jax.Array, valid_NxS: jax.Array, num_new: int, *,
                   model: nn.Module, with_entropy: bool = False, rng: jax.Array | None = None
                   ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """log p(token) of the last `num_new` slots of each row [N, T] (and their entropy), from the
    chunked head (`token_logps`: no [N, S, V] logits)."""
    hidden_NxTxD, head_VxD = completion_hidden(params, tokens_NxS, valid_NxS, num_new,
                                               model=model, rng=rng)
    return token_logps(hidden_NxTxD, head_VxD, tokens_NxS[:, -num_new:],
                       vocab_size=model.cfg.vocab_size, with_entropy=with_entropy,
                       logit_softcap=model.cfg.final_logit_softcap)
