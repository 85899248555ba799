"""Greedy decoding by full recomputation: the independent reference the KV-cache decoder
(`jaxlm.inference`) is tested against.

Every new token reruns the whole forward pass over the buffer (no cache), which is simple and
exact at test sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def make_greedy_sampler(model: nn.Module,
                        total_len: int) -> Callable[[Any, Sequence[int]], list[int]]:
    """Returns `sample(params, prompt_ids) -> new_ids` that greedily fills up to `total_len`.

    One compiled program serves every prompt shorter than `total_len`.
    """

    @jax.jit
    def fill(params: Any, buffer_T: jax.Array, start: jax.Array) -> jax.Array:
        def body(pos: jax.Array, buf_T: jax.Array) -> jax.Array:
            logits_1xTxV = model.apply({"params": params}, buf_T[None])
            next_token = jnp.argmax(logits_1xTxV[0, pos - 1]).astype(jnp.int32)
            return buf_T.at[pos].set(next_token)

        return jax.lax.fori_loop(start, total_len, body, buffer_T)

    def sample(params: Any, prompt_ids: Sequence[int]) -> list[int]:
        prompt = list(prompt_ids)[: total_len - 1] or [0]
        buffer_T = jnp.zeros((total_len,), jnp.int32).at[: len(prompt)].set(jnp.asarray(prompt))
        out_T = fill(params, buffer_T, jnp.asarray(len(prompt), jnp.int32))
        return jax.device_get(out_T).tolist()[len(prompt):]

    return sample
