"""Greedy speculative decoding: a small draft model proposes k tokens, the target checks them.

Each round the draft runs k+1 one-token steps from the last emitted token t (proposing
d_1..d_k; its (k+1)-th step only writes d_k into its cache), then the target runs once over
[t, d_1, ..., d_k] and yields its greedy choices g_0..g_k. The longest prefix with d_{i+1} == g_i
is accepted (n tokens) and g_0..g_n are emitted: n + 1 tokens per target call, every one of them
the target's own argmax given the tokens before it, so the output is exactly the target's greedy
decode. Both caches advance by k+1 slots per round; the slots of rejected drafts are marked
invalid (`kv_cache.set_valid`) rather than rewound, so rows that accept different counts still
share one write index. The cache therefore needs P + (k+1) * max_new slots in the worst case.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.inference.decode import LanguageModel, hits_stop, prefill
from jaxlm.models import kv_cache


def speculative_greedy(target: LanguageModel, target_params: Any, draft: LanguageModel,
                       draft_params: Any, tokens_BxP: jax.Array, valid_BxP: jax.Array,
                       max_new_B: jax.Array, stop_BxS: jax.Array, *, num_draft: int,
                       max_new: int, pad_id: int) -> dict[str, jax.Array]:
    """Target-greedy tokens [B, max_new] and lengths [B], plus `accepted` and `proposed` draft
    token counts (acceptance rate = accepted / proposed)."""
    b, p = tokens_BxP.shape
    k = num_draft
    cache_len = p + (k + 1) * max_new
    last_BxV, t_cache, pos_B = prefill(target, target_params, tokens_BxP, valid_BxP, cache_len)
    _, d_cache, _ = prefill(draft, draft_params, tokens_BxP, valid_BxP, cache_len)
    first_B = jnp.argmax(last_BxV, axis=-1).astype(jnp.int32)
    first_B = jnp.where(max_new_B > 0, first_B, pad_id)
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first_B)
    count_B = (max_new_B > 0).astype(jnp.int32)
    state = dict(t_cache=t_cache, d_cache=d_cache, out=out, count=count_B,
                 done=(max_new_B <= 1) | hits_stop(first_B, stop_BxS), last=first_B, pos=pos_B,
                 slot=jnp.asarray(p, jnp.int32), accepted=jnp.zeros((), jnp.int32),
                 proposed=jnp.zeros((), jnp.int32))
    j_K1 = jnp.arange(k + 1)

    def cond(s):
        return ~jnp.all(s["done"]) & (s["slot"] + k + 1 <= cache_len)

    def body(s):
        done, pos = s["done"], s["pos"]
        live_Bx1 = ~done[:, None]

        def draft_step(j, carry):
            cache, tok_B, drafts_BxK1 = carry
            logits_Bx1xV, cache = draft.step(draft_params, cache, tok_B[:, None],
                                             (pos + j)[:, None], live_Bx1)
            tok_B = jnp.argmax(logits_Bx1xV[:, 0], axis=-1).astype(jnp.int32)
            return cache, tok_B, drafts_BxK1.at[:, j].set(tok_B)

        d_cache, _, drafts_BxK1 = jax.lax.fori_loop(
            0, k + 1, draft_step, (s["d_cache"], s["last"], jnp.zeros((b, k + 1), jnp.int32)))
        drafts_BxK = drafts_BxK1[:, :k]
        inputs_BxK1 = jnp.concatenate([s["last"][:, None], drafts_BxK], axis=1)
        logits_BxK1xV, t_cache = target.step(target_params, s["t_cache"], inputs_BxK1,
                                             pos[:, None] + j_K1,
                                             jnp.broadcast_to(live_Bx1, (b, k + 1)))
        greedy_BxK1 = jnp.argmax(logits_BxK1xV, axis=-1).astype(jnp.int32)
        matches_BxK = drafts_BxK == greedy_BxK1[:, :k]
        n_B = jnp.sum(jnp.cumprod(matches_BxK.astype(jnp.int32), axis=1), axis=1)

        # Emit g_0..g_n, cut after the first stop token and at the row's budget.
        emit_BxK1 = (j_K1 <= n_B[:, None]) & live_Bx1
        stop_BxK1 = jnp.any(greedy_BxK1[..., None] == stop_BxS[:, None, :], axis=-1) & emit_BxK1
        first_stop_B = jnp.where(jnp.any(stop_BxK1, axis=1), jnp.argmax(stop_BxK1, axis=1), k)
        emit_BxK1 &= (j_K1 <= first_stop_B[:, None]) & (
            j_K1 < (max_new_B - s["count"])[:, None])
        where_BxK1 = jnp.where(emit_BxK1, s["count"][:, None] + j_K1, max_new)
        rows_BxK1 = jnp.broadcast_to(jnp.arange(b)[:, None], (b, k + 1))
        out = s["out"].at[rows_BxK1, where_BxK1].set(greedy_BxK1, mode="drop")
        count_B = s["count"] + jnp.sum(emit_BxK1, axis=1, dtype=jnp.int32)

        keep_BxK1 = (j_K1 <= n_B[:, None]) & live_Bx1  # t, d_1..d_n stay in both caches
        t_cache = kv_cache.set_valid(t_cache, s["slot"], keep_BxK1)
        d_cache = kv_cache.set_valid(d_cache, s["slot"], keep_BxK1)
        return dict(t_cache=t_cache, d_cache=d_cache, out=out, count=count_B,
                    done=done | jnp.any(stop_BxK1 & emit_BxK1, axis=1) | (count_B >= max_new_B),
                    last=jnp.take_along_axis(greedy_BxK1, n_B[:, None], axis=1)[:, 0],
                    pos=pos + n_B + 1, slot=s["slot"] + k + 1,
                    accepted=s["accepted"] + jnp.sum(jnp.where(done, 0, n_B)),
                    proposed=s["proposed"] + k * jnp.sum(~done))

    s = jax.lax.while_loop(cond, body, state)
    return {"tokens": s["out"], "lengths": s["count"], "accepted": s["accepted"],
            "proposed": s["proposed"]}
