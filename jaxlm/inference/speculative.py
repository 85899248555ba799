"""Speculative decoding: a small draft model proposes k tokens, the target checks them at once.

Each round the draft runs k+1 one-token steps from the last emitted token t (proposing
d_1..d_k from its distributions q_0..q_{k-1}; its (k+1)-th step only writes d_k into its
cache), then the target runs once over [t, d_1, ..., d_k] and gives p_0..p_k. Both p and q are
the distributions plain sampling would draw from: the same `processing` filters (repetition
penalty on the tokens emitted so far, temperature, top-k, top-p, min-p) applied to each model's
logits. Draft i+1 is accepted with probability min(1, p_i(d) / q_i(d)); at the first rejection
a token is drawn from norm(max(0, p_i - q_i)) instead, and when all k are accepted a bonus token
comes from p_k (the modified rejection sampling of Leviathan et al., 2023 and Chen et al.,
2023): every emitted token is distributed exactly as plain sampling from the target would give
it. At temperature 0 the distributions are one-hot at the penalised argmax, so acceptance is
"draft == target's argmax" and the output is exactly the target's greedy decode.

Both caches advance by k+1 slots per round; the slots of rejected drafts are marked invalid
(`kv_cache.set_valid`) rather than rewound, so rows that accept different counts still share one
write index (the rollback). The cache therefore needs P + (k+1) * max_new slots in the worst
case.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlm.inference.decode import LanguageModel, _seen, hits_stop, prefill
from jaxlm.inference.processing import SamplingParams, process, repetition_penalty
from jaxlm.models import kv_cache


def token_probs(logits_NxV: jax.Array, seen_NxV: jax.Array, sampling: SamplingParams
                ) -> jax.Array:
    """The distribution plain sampling draws from [N, V] float32: softmax of the processed
    logits, or (temperature 0) one-hot at the argmax of the penalised logits."""
    logits_NxV = logits_NxV.astype(jnp.float32)

    def greedy():
        penalised = repetition_penalty(logits_NxV, seen_NxV, sampling.repetition_penalty)
        return jax.nn.one_hot(jnp.argmax(penalised, axis=-1), logits_NxV.shape[-1])

    def sampled():
        return jax.nn.softmax(process(logits_NxV, seen_NxV, sampling), axis=-1)

    # A real branch: greedy decoding skips the sorts of top-k / top-p.
    return jax.lax.cond(sampling.temperature > 0, sampled, greedy)


def _draw(rng: jax.Array, probs_NxV: jax.Array) -> jax.Array:
    """One token per row from (unnormalised) probabilities."""
    return jax.random.categorical(rng, jnp.log(probs_NxV), axis=-1).astype(jnp.int32)


def speculative_decode(target: LanguageModel, target_params: Any, draft: LanguageModel,
                       draft_params: Any, tokens_BxP: jax.Array, valid_BxP: jax.Array,
                       max_new_B: jax.Array, stop_BxS: jax.Array, sampling: SamplingParams,
                       rng: jax.Array, *, num_draft: int, max_new: int,
                       pad_id: int) -> dict[str, jax.Array]:
    """Tokens [B, max_new] distributed as `decode.sample` from the target with `sampling` (its
    greedy decode at temperature 0) and lengths [B], plus `accepted` and `proposed` draft
    token counts (acceptance rate = accepted / proposed)."""
    b, p = tokens_BxP.shape
    k = num_draft
    cache_len = p + (k + 1) * max_new
    last_BxV, t_cache, pos_B = prefill(target, target_params, tokens_BxP, valid_BxP, cache_len)
    _, d_cache, _ = prefill(draft, draft_params, tokens_BxP, valid_BxP, cache_len)
    vocab = last_BxV.shape[-1]
    seen_BxV = _seen(tokens_BxP, valid_BxP, vocab)
    rng, key = jax.random.split(rng)
    first_B = _draw(key, token_probs(last_BxV, seen_BxV, sampling))
    first_B = jnp.where(max_new_B > 0, first_B, pad_id)
    seen_BxV |= jax.nn.one_hot(first_B, vocab, dtype=jnp.bool_) & (max_new_B > 0)[:, None]
    out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first_B)
    count_B = (max_new_B > 0).astype(jnp.int32)
    state = dict(t_cache=t_cache, d_cache=d_cache, out=out, count=count_B, seen=seen_BxV,
                 done=(max_new_B <= 1) | hits_stop(first_B, stop_BxS), last=first_B, pos=pos_B,
                 slot=jnp.asarray(p, jnp.int32), accepted=jnp.zeros((), jnp.int32),
                 proposed=jnp.zeros((), jnp.int32), rng=rng)
    j_K1 = jnp.arange(k + 1)

    def cond(s):
        return ~jnp.all(s["done"]) & (s["slot"] + k + 1 <= cache_len)

    def body(s):
        done, pos, seen_BxV = s["done"], s["pos"], s["seen"]
        live_Bx1 = ~done[:, None]
        rng, draft_key, accept_key, final_key = jax.random.split(s["rng"], 4)

        def draft_step(j, carry):
            cache, tok_B, seen_BxV, drafts_BxK1, q_BxK1xV = carry
            logits_Bx1xV, cache = draft.step(draft_params, cache, tok_B[:, None],
                                             (pos + j)[:, None], live_Bx1)
            q_BxV = token_probs(logits_Bx1xV[:, 0], seen_BxV, sampling)
            tok_B = _draw(jax.random.fold_in(draft_key, j), q_BxV)
            seen_BxV |= jax.nn.one_hot(tok_B, vocab, dtype=jnp.bool_)
            return (cache, tok_B, seen_BxV, drafts_BxK1.at[:, j].set(tok_B),
                    q_BxK1xV.at[:, j].set(q_BxV))

        d_cache, _, _, drafts_BxK1, q_BxK1xV = jax.lax.fori_loop(
            0, k + 1, draft_step, (s["d_cache"], s["last"], seen_BxV,
                                   jnp.zeros((b, k + 1), jnp.int32),
                                   jnp.zeros((b, k + 1, vocab), jnp.float32)))
        drafts_BxK, q_BxKxV = drafts_BxK1[:, :k], q_BxK1xV[:, :k]
        inputs_BxK1 = jnp.concatenate([s["last"][:, None], drafts_BxK], axis=1)
        logits_BxK1xV, t_cache = target.step(target_params, s["t_cache"], inputs_BxK1,
                                             pos[:, None] + j_K1,
                                             jnp.broadcast_to(live_Bx1, (b, k + 1)))
        # The target's distribution after [t, d_1..d_j] sees d_1..d_j too.
        onehot_BxKxV = jax.nn.one_hot(drafts_BxK, vocab, dtype=jnp.int32)
        prior_BxKxV = jnp.cumsum(onehot_BxKxV, axis=1) > 0
        seen_BxK1xV = seen_BxV[:, None] | jnp.concatenate(
            [jnp.zeros((b, 1, vocab), bool), prior_BxKxV], axis=1)
        p_BxK1xV = token_probs(logits_BxK1xV.reshape(b * (k + 1), vocab),
                               seen_BxK1xV.reshape(b * (k + 1), vocab),
                               sampling).reshape(b, k + 1, vocab)

        # Accept d_{i+1} with probability min(1, p_i(d) / q_i(d)): u * q < p, u ~ U[0, 1).
        p_d_BxK = jnp.take_along_axis(p_BxK1xV[:, :k], drafts_BxK[..., None], axis=-1)[..., 0]
        q_d_BxK = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], axis=-1)[..., 0]
        u_BxK = jax.random.uniform(accept_key, (b, k))
        accept_BxK = u_BxK * q_d_BxK < p_d_BxK
        n_B = jnp.sum(jnp.cumprod(accept_BxK.astype(jnp.int32), axis=1), axis=1)
        # The token after the accepted drafts: from norm(max(0, p_n - q_n)) after a rejection,
        # from p_k after k acceptances.
        p_n_BxV = jnp.take_along_axis(p_BxK1xV, n_B[:, None, None], axis=1)[:, 0]
        q_pad_BxK1xV = jnp.concatenate([q_BxKxV, jnp.zeros((b, 1, vocab))], axis=1)
        q_n_BxV = jnp.take_along_axis(q_pad_BxK1xV, n_B[:, None, None], axis=1)[:, 0]
        residual_BxV = jnp.maximum(p_n_BxV - q_n_BxV, 0.0)
        residual_BxV = jnp.where(jnp.sum(residual_BxV, axis=-1, keepdims=True) > 0,
                                 residual_BxV, p_n_BxV)
        extra_B = _draw(final_key, residual_BxV)
        # Emitted: d_1..d_n then the extra token, cut after a stop token and at the budget.
        emitted_BxK1 = jnp.concatenate([drafts_BxK, jnp.zeros((b, 1), jnp.int32)], axis=1)
        emitted_BxK1 = jnp.where(j_K1 == n_B[:, None], extra_B[:, None], emitted_BxK1)
        emit_BxK1 = (j_K1 <= n_B[:, None]) & live_Bx1
        stop_BxK1 = jnp.any(emitted_BxK1[..., None] == stop_BxS[:, None, :], axis=-1) & emit_BxK1
        first_stop_B = jnp.where(jnp.any(stop_BxK1, axis=1), jnp.argmax(stop_BxK1, axis=1), k)
        emit_BxK1 &= (j_K1 <= first_stop_B[:, None]) & (
            j_K1 < (max_new_B - s["count"])[:, None])
        where_BxK1 = jnp.where(emit_BxK1, s["count"][:, None] + j_K1, max_new)
        rows_BxK1 = jnp.broadcast_to(jnp.arange(b)[:, None], (b, k + 1))
        out = s["out"].at[rows_BxK1, where_BxK1].set(emitted_BxK1, mode="drop")
        count_B = s["count"] + jnp.sum(emit_BxK1, axis=1, dtype=jnp.int32)
        seen_BxV = seen_BxV | jnp.any(jax.nn.one_hot(emitted_BxK1, vocab, dtype=jnp.bool_)
                                      & emit_BxK1[..., None], axis=1)

        keep_BxK1 = (j_K1 <= n_B[:, None]) & live_Bx1  # t, d_1..d_n stay in both caches
        t_cache = kv_cache.set_valid(t_cache, s["slot"], keep_BxK1)
        d_cache = kv_cache.set_valid(d_cache, s["slot"], keep_BxK1)
        return dict(t_cache=t_cache, d_cache=d_cache, out=out, count=count_B, seen=seen_BxV,
                    done=done | jnp.any(stop_BxK1 & emit_BxK1, axis=1) | (count_B >= max_new_B),
                    last=extra_B, pos=pos + n_B + 1, slot=s["slot"] + k + 1,
                    accepted=s["accepted"] + jnp.sum(jnp.where(done, 0, n_B)),
                    proposed=s["proposed"] + k * jnp.sum(~done), rng=rng)

    s = jax.lax.while_loop(cond, body, state)
    return {"tokens": s["out"], "lengths": s["count"], "accepted": s["accepted"],
            "proposed": s["proposed"]}
